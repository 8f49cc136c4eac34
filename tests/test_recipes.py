"""Experiment and sweep recipes, and the table that summarises a multirun's folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import TINY, output_of

from bioexp.compare import find_runs, runs_table, varying_overrides
from bioexp.records import read_json, write_json

SPLITS = {  # 784-1000-2000-4000-2000-10 as Hebbian + fully connected layers
    "h1_fc4": ([1000], [2000, 4000, 2000]),
    "h2_fc3": ([1000, 2000], [4000, 2000]),
    "h3_fc2": ([1000, 2000, 4000], [2000]),
    "h4_fc1": ([1000, 2000, 4000, 2000], []),
}


def test_semihebb_depth_is_a_multirun_over_the_four_splits(make_cfg) -> None:
    cfg = make_cfg("experiment=semihebb_depth", hydra=True)
    assert cfg.model.name == "semihebb" and cfg.schedule.name == "one_phase"
    assert cfg.schedule.supervised.epochs == 1
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    options = cfg.hydra.sweeper.params["+hebbian_split"].split(",")
    assert options == list(SPLITS)


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_sets_both_size_lists(make_cfg, split: str) -> None:
    cfg = make_cfg("model=semihebb", f"+hebbian_split={split}")
    hebbian, head = SPLITS[split]
    assert list(cfg.model.hebbian) == hebbian and list(cfg.model.head) == head
    assert len(hebbian) + len(head) + 1 == 5  # four hidden layers and the output layer


def test_sweep_recipes_are_multiruns(make_cfg) -> None:
    cfg = make_cfg("sweep=semihebb_p", hydra=True)
    assert cfg.model.name == "semihebb" and str(cfg.hydra.mode).endswith("MULTIRUN")
    assert cfg.hydra.sweeper.params["model.sparsity"] == "range(10,100,10)"
    seeds = make_cfg("model=fa_mlp", "sweep=seeds", hydra=True)
    assert seeds.model.name == "fa_mlp" and seeds.hydra.sweeper.params.seed == "range(5)"


def fake_run(folder: Path, overrides: list[str], **summary) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    write_json(folder / "summary.json", summary)


def test_runs_table_shows_what_varies_and_keeps_every_status(tmp_path: Path) -> None:
    fake_run(tmp_path / "0_a", ["model=semihebb", "model.sparsity=10"], status="completed",
             test_acc=0.81234, best_test_acc=0.82, wall_time_s=65.43)
    fake_run(tmp_path / "10_a", ["model=semihebb", "model.sparsity=90"], status="diverged")
    fake_run(tmp_path / "2_a", ["model=semihebb", "model.sparsity=50"], status="running")
    (tmp_path / "not_a_run").mkdir()
    runs = find_runs(tmp_path)
    assert [r.path.name for r in runs] == ["0_a", "2_a", "10_a"]  # natural order
    assert varying_overrides(runs) == [{"model.sparsity": v} for v in ("10", "50", "90")]
    lines = runs_table(runs).splitlines()
    assert "model.sparsity" in lines[0] and "model=" not in lines[0]  # shared keys are dropped
    assert len(lines) == 2 + 3
    assert "| 0.8123 " in lines[2] and "| 65.4 " in lines[2]
    assert "diverged" in lines[4] and "running" in lines[3]


def test_a_sweep_recipe_runs_and_writes_its_table(bioexp, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # the command line narrows the recipe's nine values of p to two
    result = bioexp("train", "sweep=semihebb_p", "model.sparsity=20,80", "model.hebbian=[16]",
                    *TINY, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    table = (sweep / "runs.md").read_text()
    assert table.count("completed") == 2 and "model.sparsity" in table
    assert "| 20 " in table and "| 80 " in table
    assert "runs in" in output_of(result)  # the table is in the log too


HYBRID = {  # +hybrid option -> (model, head hidden sizes or None for models without that key)
    "krotov_linear": ("krotov_fc", []),
    "krotov_fc3": ("krotov_fc", [256, 1024]),
    "krotov_fa3": ("krotov_fa", [256, 1024]),
    "biocell_fc": ("krotov_biocell_fc", None),
    "biocell_fa": ("krotov_biocell_fa", None),
    "cnn": ("cnn", None),
}


def test_seed_hybrid_is_a_multirun_over_the_earlier_projects_models(make_cfg) -> None:
    cfg = make_cfg("experiment=seed_hybrid", hydra=True)
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    assert cfg.hydra.sweeper.params["+hybrid"].split(",") == list(HYBRID)
    for option, (model, head) in HYBRID.items():
        job = make_cfg(f"+hybrid={option}")
        assert job.model.name == model, option
        if head is not None:
            assert list(job.model.head) == head, option


def test_seed_hybrid_runs_and_shares_phase_1(bioexp, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = bioexp("train", "experiment=seed_hybrid", "+hybrid=krotov_linear,krotov_fa3",
                    "model.hidden=32", "schedule.unsupervised.batch_size=64", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    table = (sweep / "runs.md").read_text()
    assert table.count("completed") == 2, table
    statuses = [read_json(p)["phase1_cache"]["status"]
                for p in sorted(sweep.glob("*/summary.json"))]
    assert statuses == ["miss", "hit"]  # the FA head reused the linear head's phase 1


def test_compare_groups_runs_and_keeps_failed_ones_visible(bioexp, tmp_path: Path) -> None:
    for i, (model, seed, acc, status) in enumerate([
            ("bp_mlp", 0, 0.80, "completed"), ("bp_mlp", 1, 0.90, "completed"),
            ("fa_mlp", 0, 0.70, "completed"), ("fa_mlp", 1, None, "diverged")]):
        folder = tmp_path / "sweep" / f"{i}_{model}"
        fake_run(folder, [f"model={model}", f"seed={seed}"], status=status, test_acc=acc)
        (folder / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"model": {"name": model}, "seed": seed}))
    result = bioexp("compare", str(tmp_path / "sweep"), "--by", "model",
                    "--md", str(tmp_path / "t.md"))
    assert result.returncode == 0, output_of(result)
    lines = result.stdout.splitlines()
    bp = next(line for line in lines if "| bp_mlp" in line)
    fa = next(line for line in lines if "| fa_mlp" in line)
    assert "0.8500" in bp and "0.0707" in bp and "| 2 " in bp  # mean, std, count of two seeds
    assert "0.7000" in fa and "| 1 " in fa and "completed, diverged" in fa
    assert (tmp_path / "t.md").read_text().strip() == result.stdout.strip()
    plain = bioexp("compare", str(tmp_path / "sweep"), "--sort", "test_acc",
                   "--csv", str(tmp_path / "t.csv"))
    assert plain.returncode == 0 and plain.stdout.count("\n") == 2 + 4  # every run listed
    order = [line.split("|")[1].strip() for line in plain.stdout.splitlines()[2:]]
    assert order == ["1_bp_mlp", "0_bp_mlp", "2_fa_mlp", "3_fa_mlp"]  # best first, empty last
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["run", "model", "seed", "status"] and len(rows) == 5
    bad = bioexp("compare", str(tmp_path / "sweep"), "--sort", "nope")
    assert bad.returncode == 2 and "--sort: no column 'nope'" in bad.stderr


def test_compare_says_when_there_is_nothing_to_compare(bioexp, tmp_path: Path) -> None:
    missing = bioexp("compare", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = bioexp("compare", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no runs" in empty.stderr
    assert "Traceback" not in missing.stderr + empty.stderr
