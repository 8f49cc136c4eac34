"""The phase-1 cache key covers every setting of every local-rule family, by construction.

For each registered model with local-rule layers, every hyperparameter of its factory is changed
in turn. Either the key changes, or phase 1 trains the body to exactly the same weights: two
runs may share a cache entry only when sharing it cannot change a result.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from conftest import TINY

from bioexp.cache import phase1_key
from bioexp.engine import local_layers, local_learning
from bioexp.registry import build_model, get_model_entry, list_models
from bioexp.train import seed_everything

SHAPE, CLASSES = (1, 6, 6), 3


def small(name: str) -> dict[str, Any]:
    """Small widths of the same kind as the defaults (a size or a list of sizes)."""
    sizes = {"hidden": 12, "hebbian": [12], "head": [5], "channels": [2, 3], "k": 3}
    defaults = get_model_entry(name).hyperparameters()
    return {k: ([v] * len(defaults[k]) if isinstance(v, int) and isinstance(defaults[k], tuple)
                else v) for k, v in sizes.items() if k in defaults}


def local_models() -> list[str]:
    return [entry.name for entry in list_models()
            if local_layers(build_model(entry.name, SHAPE, CLASSES, **small(entry.name)))]


def alternatives(value: Any, hint: Any) -> list[Any]:
    """Other valid values of a hyperparameter, found from its type hint."""
    if typing.get_origin(hint) is Annotated:
        hint = hint.__origin__
    if typing.get_origin(hint) is Literal:
        return [choice for choice in typing.get_args(hint) if choice != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value * 1.5 if value else 0.25]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [[*value, 4]] + ([[max(2, v // 2) for v in value]] if value else [])
    return []


def key_and_trained_body(name: str, hparams: dict[str, Any]) -> tuple[str, dict]:
    seed_everything(0)
    model = build_model(name, SHAPE, CLASSES, **hparams)
    key = phase1_key(model.body, {})
    x = torch.rand(48, *SHAPE, generator=torch.Generator().manual_seed(1))
    with local_learning(model.body, lambda: 0.05), torch.no_grad():
        for batch in x.split(16):
            model.body(batch)
    return key, model.body.state_dict()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", local_models())
def test_a_shared_key_means_the_same_phase_1(name: str) -> None:
    entry = get_model_entry(name)
    hints = typing.get_type_hints(entry.factory, include_extras=True)
    base = {**entry.hyperparameters(), **small(name)}
    base_key, base_body = key_and_trained_body(name, base)
    changed_key = []
    for param, value in base.items():
        for other in alternatives(value, hints.get(param)):
            key, body = key_and_trained_body(name, {**base, param: other})
            if key != base_key:
                changed_key.append(param)
            else:
                assert same_state(body, base_body), (
                    f"{name}: model.{param}={other!r} trains another phase 1 under the same key")
    assert changed_key, "no setting changed the key: the test exercised nothing"


def test_every_local_rule_setting_changes_the_key() -> None:
    """The settings the issue named, explicitly: each one alone gives a new key."""
    cases = {
        "semihebb": {"rule": ["hebb", "oja", "gupta_local"], "sparsity": [30.0, 70.0],
                     "normalize": [False], "activation": ["tanh"], "hebbian": [[12, 6]]},
        "krotov_fc": {"p": [2.0, 4.0], "k": [2, 4], "delta": [0.2], "init": ["normal"],
                      "hidden": [13], "normalize_input": [False]},
    }
    for name, changes in cases.items():
        base = {**small(name)}
        base_key, _ = key_and_trained_body(name, base)
        for param, values in changes.items():
            for value in values:
                key, _ = key_and_trained_body(name, {**base, param: value})
                assert key != base_key, f"{name}: model.{param}={value!r} kept the key"


def test_sparsity_runs_do_not_share_a_cache_entry(tmp_path: Path, make_cfg) -> None:
    """The reported case: gupta at p = 30, then p = 70, must not hit the first run's entry."""
    from bioexp.train import run

    common = (*TINY, "model=semihebb", "model.hebbian=[32]")
    first = run(make_cfg(*common, "model.sparsity=30"), tmp_path / "p30")
    second = run(make_cfg(*common, "model.sparsity=70"), tmp_path / "p70")
    assert first["phase1_cache"]["status"] == second["phase1_cache"]["status"] == "miss"
    assert first["phase1_cache"]["key"] != second["phase1_cache"]["key"]
    again = run(make_cfg(*common, "model.sparsity=70"), tmp_path / "p70_again")
    assert again["phase1_cache"]["status"] == "hit"
    assert again["test_acc"] == second["test_acc"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another_body"])
def test_a_damaged_cache_entry_is_trained_again(tmp_path: Path, make_cfg, caplog,
                                                damage: str) -> None:
    """README: a damaged (or stale) phase-1 cache file is not an error: the next run with its key
    warns, naming the file, trains phase 1 again (`miss`) to the result of a fresh run, and
    overwrites the entry, which the run after it finds."""
    from bioexp.records import read_metrics
    from bioexp.train import run

    common = (*TINY, "model=semihebb", "model.hebbian=[32]")
    fresh = run(make_cfg(*common), tmp_path / "fresh")
    assert fresh["phase1_cache"]["status"] == "miss"
    entry = Path(fresh["phase1_cache"]["file"])
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:len(entry.read_bytes()) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not a torch file\xff" * 50)
    else:  # readable, but the weights of another body
        torch.save({"layer.weight": torch.zeros(3, 3)}, entry)
    with caplog.at_level(logging.WARNING, logger="bioexp.cache"):
        again = run(make_cfg(*common), tmp_path / "again")
    assert again["status"] == "completed", again
    assert again["phase1_cache"] == fresh["phase1_cache"]  # miss, the same key and file
    [warning] = [r.getMessage() for r in caplog.records if str(entry) in r.getMessage()]
    assert "unreadable" in warning and "training phase 1" in warning, warning
    assert again["test_acc"] == fresh["test_acc"]
    assert rows_without_time(read_metrics(tmp_path / "again" / "metrics.jsonl")) == \
        rows_without_time(read_metrics(tmp_path / "fresh" / "metrics.jsonl"))
    third = run(make_cfg(*common), tmp_path / "third")  # the entry was written anew
    assert third["phase1_cache"]["status"] == "hit" and third["test_acc"] == fresh["test_acc"]


def rows_without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("elapsed_s", "epoch_time_s",
                                                        "samples_per_s")} for row in rows]
