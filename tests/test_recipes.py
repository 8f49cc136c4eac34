"""Experiment and sweep recipes, and the table that summarises a multirun's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, output_of

from bioexp.records import read_json

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
    baselines = make_cfg("experiment=baselines", hydra=True)
    assert str(baselines.hydra.mode).endswith("MULTIRUN")


@pytest.mark.parametrize("recipe, key", [("lr_grid", "schedule.supervised.lr"),
                                         ("unsup_lr_grid", "schedule.unsupervised.lr")])
def test_learning_rate_grids_pick_on_a_validation_split(make_cfg, recipe: str, key: str) -> None:
    cfg = make_cfg("model=krotov_fc", f"sweep={recipe}", hydra=True)
    assert cfg.model.name == "krotov_fc" and str(cfg.hydra.mode).endswith("MULTIRUN")
    assert len(cfg.hydra.sweeper.params[key].split(",")) == 4
    assert cfg.data.val_size == 10000


def test_krotov_optuna_recipe_searches_the_layer_on_validation(make_cfg) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = make_cfg("sweep=krotov_optuna", hydra=True)
    assert cfg.model.name == "krotov_fc" and cfg.data.val_size == 10000
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"model.p", "model.k", "model.delta",
                                             "schedule.unsupervised.lr"}
    assert make_cfg("sweep=krotov_optuna", "model=krotov_fa").model.name == "krotov_fa"


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


def benchmark_rows(make_cfg, experiment: str) -> list[str]:
    cfg = make_cfg(f"experiment={experiment}", hydra=True)
    assert str(cfg.hydra.mode).endswith("MULTIRUN") and list(cfg.fgsm) == [0, 0.1]
    return [row.strip() for row in cfg.hydra.sweeper.params["+bench"].split(",")]


@pytest.mark.parametrize("experiment", ["benchmark", "benchmark_quick"])
def test_every_benchmark_row_is_a_valid_run_and_local_rule_families_have_controls(
        make_cfg, experiment: str) -> None:
    import bioexp.models  # noqa: F401
    from bioexp.config import validate
    from bioexp.engine import local_layers
    from bioexp.registry import build_model

    rows = benchmark_rows(make_cfg, experiment)
    assert len(rows) == len(set(rows))
    for row in rows:
        cfg = make_cfg(f"+bench={row}")
        validate(cfg)
        model = build_model(cfg.model.name, (1, 28, 28), 10)
        controls = {f"{row}_random", f"{row}_gaussian"}
        if cfg.control is None and local_layers(model):
            assert controls <= set(rows), f"{row} is a local-rule family without its controls"
        if cfg.control is not None:
            assert not local_layers(model) or row.startswith(cfg.model.name)


def test_the_full_benchmark_has_every_family_in_three_seeds(make_cfg) -> None:
    cfg = make_cfg("experiment=benchmark", hydra=True)
    rows = benchmark_rows(make_cfg, "benchmark")
    families = {"bp_mlp", "cnn", "fa_mlp", "dfa_mlp", "sign_mlp", "kp_mlp", "fa_cnn", "semihebb",
                "krotov_fc", "krotov_biocell_fc", "softhebb_cnn", "ff_mlp", "pc_mlp", "eqprop_mlp"}
    assert families <= set(rows)
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
