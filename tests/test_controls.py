"""Random-feature controls: the same architecture with its local-rule layers left untrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from bioexp.checks import preflight
from bioexp.compare import find_runs, run_table
from bioexp.config import model_hyperparameters
from bioexp.engine import local_layers
from bioexp.errors import ConfigError
from bioexp.records import read_metrics
from bioexp.registry import build_model
from bioexp.train import run, seed_everything

KROTOV = (*TINY, "model=krotov_fc", "model.hidden=32", "schedule.unsupervised.batch_size=64")
HEBB = (*TINY, "model=semihebb", "model.hebbian=[24]")


def initial_weights(cfg) -> torch.Tensor:
    """The local layer's weights as the run builds them (same seed, same factory)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, (1, 28, 28), 10, **model_hyperparameters(cfg))
    return local_layers(model)[0].weight.clone()


def final_weights(run_dir: Path, name: str) -> torch.Tensor:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    return state[name]


@pytest.mark.parametrize(("overrides", "weight"), [
    ((*KROTOV, "schedule=two_phase"), "body.2.weight"),
    ((*HEBB, "schedule=one_phase"), "body.1.weight"),
])
def test_random_features_keep_the_initial_weights(tmp_path: Path, make_cfg, overrides,
                                                  weight) -> None:
    cfg = make_cfg(*overrides, "control=random_features")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["control"] == "random_features"
    assert [r["phase"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["supervised"] * 2
    assert "phase1_cache" not in summary
    assert torch.equal(final_weights(tmp_path, weight), initial_weights(cfg))


def test_the_trained_run_does_move_the_weights(tmp_path: Path, make_cfg) -> None:
    """The other side of the control: the same run without it trains the local layer."""
    cfg = make_cfg(*HEBB, "schedule=one_phase", "schedule.unsupervised.lr=0.01")
    assert run(cfg, tmp_path)["control"] is None
    assert not torch.equal(final_weights(tmp_path, "body.1.weight"), initial_weights(cfg))


@pytest.mark.parametrize(("overrides", "weight"), [(KROTOV, "body.2.weight"),
                                                   (HEBB, "body.1.weight")])
def test_gaussian_features_are_an_untrained_gaussian_projection(tmp_path: Path, make_cfg,
                                                                overrides, weight) -> None:
    summary = run(make_cfg(*overrides, "control=gaussian_features"), tmp_path)
    assert summary["control"] == "gaussian_features"
    w = final_weights(tmp_path, weight)
    assert (w < 0).float().mean() == pytest.approx(0.5, abs=0.05)  # uniform [0, 1) has none
    if weight == "body.1.weight":  # Hebbian units keep unit-length input weights
        torch.testing.assert_close(w.norm(dim=0), torch.ones(w.shape[1]))
    assert [r["phase"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["supervised"] * 2


def test_a_control_needs_local_layers_and_a_known_name(make_cfg) -> None:
    with pytest.raises(ConfigError, match="control=random_features leaves a model's local-rule "
                                          "layers untrained, and bp_mlp has none"):
        preflight(make_cfg(*TINY, "control=random_features"))
    with pytest.raises(ConfigError, match="control must be one of random_features, "
                                          "gaussian_features, got 'fixed'"):
        preflight(make_cfg(*KROTOV, "control=fixed"))


def test_compare_shows_which_runs_are_controls(tmp_path: Path, make_cfg) -> None:
    run(make_cfg(*KROTOV, "control=random_features"), tmp_path / "control")
    run(make_cfg(*KROTOV), tmp_path / "trained")
    table = run_table(find_runs(tmp_path))
    assert table.column("control") == ["random_features", "-"]  # "-": not a control
    plain = run_table([r for r in find_runs(tmp_path) if r.path.name == "trained"])
    assert "control" not in plain.header
