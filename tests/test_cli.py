"""The real `bioexp` command in a subprocess: subcommands, Hydra's flags, run folders, errors.

Each `bioexp train` subprocess pays the import of torch (several seconds), so each test checks as
much as one run allows. Runs use the tiny `synthetic` set (conftest.TINY) and land in tmp_path.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    TINY,
    assert_clean_failure,
    needs_fashion,
    output_of,
    tiny,
)
from omegaconf import OmegaConf

from bioexp import __version__
from bioexp.data import load_dataset
from bioexp.data.sources import SOURCES, locate
from bioexp.records import read_json
from bioexp.registry import build_model

MODELS = ("bp_mlp", "cnn")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
SCHEDULES = ("one_phase", "two_phase")
METRIC_KEYS = {"phase", "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
               "elapsed_s", "samples_per_s"}
TINY_EPOCHS = 2
TINY_STEPS_PER_EPOCH = 256 // 64  # data.n_train / schedule.supervised.batch_size in TINY
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

assert "schedule.supervised.epochs=2" in TINY and "data.n_train=256" in TINY
assert "schedule.supervised.batch_size=64" in TINY


# ---------------------------------------------------------------------------------------------
# helpers


def read_metrics(path: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed strictly: a torn line fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_no_run_folder(run_dir: Path, root: Path) -> None:
    """A mistake caught before the run stops before Hydra makes the run folder: neither the
    folder asked for nor any other run folder (`.hydra`, summary.json) under `root`."""
    assert not run_dir.exists(), sorted(str(p.relative_to(root)) for p in run_dir.rglob("*"))
    left = [p for pattern in (".hydra", "summary.json", "train.log") for p in root.rglob(pattern)]
    assert left == [], left


def check_run_folder(run_dir: Path, model: str, dataset: str, seed: int, epochs: int,
                     steps_per_epoch: int) -> tuple[dict, list[dict]]:
    """Everything the run-folder contract promises for a completed supervised run."""
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert (run_dir / ".hydra" / name).is_file(), name
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.model.name == model
    assert config.data.name == dataset
    assert config.seed == seed

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == epochs, rows
    for i, row in enumerate(rows, start=1):
        assert set(row) >= METRIC_KEYS, METRIC_KEYS - set(row)
        assert row["phase"] == "supervised"
        assert row["epoch"] == i
        assert row["step"] == i * steps_per_epoch
        for key in ("train_acc", "test_acc"):
            assert 0.0 <= row[key] <= 1.0, (key, row[key])
        for key in ("train_loss", "test_loss", "lr", "samples_per_s"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row[key])
    elapsed = [row["elapsed_s"] for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0

    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed", summary
    assert summary["model"] == model and summary["dataset"] == dataset
    assert summary["seed"] == seed
    assert summary["device"] == "cpu"
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert summary["best_test_acc"] == max(row["test_acc"] for row in rows)
    assert summary["wall_time_s"] > 0
    supervised = [p for p in summary["phases"] if p["name"] == "supervised"]
    assert len(supervised) == 1, summary["phases"]
    assert supervised[0]["epochs"] == epochs
    assert supervised[0]["wall_time_s"] > 0 and supervised[0]["samples_per_s"] > 0

    png = run_dir / "plots" / "curves.png"
    assert png.is_file() and png.stat().st_size > 1024
    assert png.read_bytes()[:8] == PNG_MAGIC
    log = (run_dir / "train.log").read_text()
    assert f"model {model}" in log, log
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    return summary, rows


# ---------------------------------------------------------------------------------------------
# the dispatcher and `bioexp list`


def test_help_version_and_unknown_command(bioexp):
    result = bioexp("--help")
    assert result.returncode == 0, output_of(result)
    for command in ("train", "list", "data"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), result.stdout

    result = bioexp("--version")
    assert result.returncode == 0, output_of(result)
    assert result.stdout.split() == ["bioexp", __version__], result.stdout

    result = bioexp("frobnicate")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "frobnicate" in result.stderr
    assert "Traceback" not in output_of(result)


def test_list_describes_every_option(bioexp):
    result = bioexp("list")
    assert result.returncode == 0, output_of(result)
    described = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^\s+(\S+)\s+(\S.*)$", line)
        if match:
            described[match.group(1)] = match.group(2)
    for name in (*MODELS, *DATASETS, *SCHEDULES, "baselines"):
        assert name in described, f"{name} not listed:\n{result.stdout}"
        assert len(described[name]) > 10, f"{name} has no description: {described[name]!r}"
    assert not [name for name in described if name.startswith("_")], result.stdout


# ---------------------------------------------------------------------------------------------
# Hydra's own flags keep working behind `bioexp train`


def test_train_help_shows_config_groups(bioexp, tmp_path):
    result = bioexp("train", "--help")
    assert result.returncode == 0, output_of(result)
    out = result.stdout
    assert "bioexp train" in out
    groups = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+): (.*)$", out, re.M)}
    for group in ("model", "data", "schedule"):
        assert group in groups, out
    assert {"bp_mlp", "cnn"} <= set(re.split(r",\s*", groups["model"]))
    assert set(DATASETS) <= set(re.split(r",\s*", groups["data"]))
    assert set(SCHEDULES) <= set(re.split(r",\s*", groups["schedule"]))
    assert not (tmp_path / "outputs").exists(), "--help created a run folder"


def test_train_help_without_overrides_is_hydras_help_without_its_wait(bioexp, tmp_path):
    """`bioexp train --help` is put together by bioexp (app.help_text), fast; with an override
    Hydra prints it: the two agree."""
    fast, hydras = bioexp("train", "--help"), bioexp("train", "--help", "seed=0")
    assert fast.returncode == hydras.returncode == 0, output_of(hydras)
    assert fast.stdout == hydras.stdout


@pytest.mark.parametrize("command", [["list"], ["train", "--help"], ["--version"]])
def test_listing_and_help_import_neither_torch_nor_the_models(command):
    """What keeps `bioexp list` and `bioexp train --help` under half a second
    (scripts/bench_startup.py times them)."""
    code = ("import contextlib, io, sys\nfrom bioexp.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main({command!r})\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m == 'bioexp.models'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_train_cfg_job_prints_config_without_training(bioexp, tmp_path):
    result = bioexp("train", "--cfg", "job", "model=cnn", "data=synthetic")
    assert result.returncode == 0, output_of(result)
    config = yaml.safe_load(result.stdout)
    assert config["model"]["name"] == "cnn"
    assert config["data"]["name"] == "synthetic"
    assert config["schedule"]["supervised"]["epochs"] >= 1
    assert "hydra" not in config  # --cfg job: the job's config only
    assert not (tmp_path / "outputs").exists(), "--cfg job created a run folder"
    assert not list(tmp_path.rglob("summary.json")), "--cfg job trained"


def test_train_info(bioexp, tmp_path):
    result = bioexp("train", "--info")
    assert result.returncode == 0, output_of(result)
    for section in ("Config search path", "Defaults List", "model/bp_mlp"):
        assert section in result.stdout, result.stdout
    assert not list(tmp_path.rglob("summary.json")), "--info trained"


# ---------------------------------------------------------------------------------------------
# end-to-end runs


@pytest.mark.parametrize("model", MODELS)
def test_train_end_to_end_on_synthetic(bioexp, tmp_path, model):
    # bp_mlp names its run folder; cnn takes the default one under ./outputs (cwd is tmp_path)
    args = [f"model={model}", *TINY]
    if model == "bp_mlp":
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    result = bioexp("train", *args)
    assert result.returncode == 0, output_of(result)
    assert "Traceback" not in output_of(result)

    if model == "bp_mlp":
        run_dir = tmp_path / "run"
    else:
        found = list(tmp_path.glob(f"outputs/*/*_{model}_synthetic"))
        assert len(found) == 1, list(tmp_path.rglob("*"))
        run_dir = found[0]
        assert re.match(r"\d{4}-\d{2}-\d{2}$", run_dir.parent.name), run_dir  # date ...
        assert re.match(r"\d{2}-\d{2}-\d{2}_", run_dir.name), run_dir  # ... then time
    summary, rows = check_run_folder(run_dir, model, "synthetic", seed=0, epochs=TINY_EPOCHS,
                                     steps_per_epoch=TINY_STEPS_PER_EPOCH)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], "training did not lower the loss"
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"model={model}" in overrides and "data.n_train=256" in overrides

    # the checkpoint holds the final model: rebuilt from it, it scores the reported accuracy
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["training"]["position"]["epoch"] == TINY_EPOCHS
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    hparams = {k: v for k, v in OmegaConf.to_container(config.model).items()
               if k not in ("name", "input_scale")}
    data = load_dataset(config.data, config.model.input_scale, "cpu")
    net = build_model(model, data.input_shape, data.num_classes, **hparams)
    net.load_state_dict(checkpoint["model"])
    net.eval()
    with torch.no_grad():
        acc = (net.predict(net(data.test.x)) == data.test.y).float().mean().item()
    assert acc == pytest.approx(summary["test_acc"], abs=1e-6)


@needs_fashion
def test_train_on_fashion_mnist_subset(bioexp, tmp_path):
    result = bioexp("train", "model=bp_mlp", "data=fashion_mnist", "data.train_limit=2000",
                    "data.test_limit=500", "schedule.supervised.epochs=1",
                    "schedule.supervised.batch_size=32", "schedule.supervised.lr=0.003",
                    "progress=false", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, output_of(result)
    summary, rows = check_run_folder(tmp_path / "run", "bp_mlp", "fashion_mnist", seed=0,
                                     epochs=1, steps_per_epoch=math.ceil(2000 / 32))
    assert summary["test_acc"] > 0.6, summary["test_acc"]
    assert summary["input_shape"] == [1, 28, 28] and summary["num_classes"] == 10


def test_multirun_writes_one_complete_folder_per_job(bioexp, tmp_path):
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "model=bp_mlp,cnn", "seed=0,1", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    assert "Traceback" not in output_of(result)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4, jobs
    seen, first_losses = set(), {}
    for job in jobs:
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        model, seed = config.model.name, config.seed
        seen.add((model, seed))
        _, rows = check_run_folder(job, model, "synthetic", seed=seed, epochs=TINY_EPOCHS,
                                   steps_per_epoch=TINY_STEPS_PER_EPOCH)
        first_losses[model, seed] = rows[0]["train_loss"]
        log = (job / "train.log").read_text()
        other = next(m for m in MODELS if m != model)
        assert f"model {other}" not in log, "a job's train.log holds another job's lines"
    assert seen == {(m, s) for m in MODELS for s in (0, 1)}
    for model in MODELS:  # the seed reaches the training
        assert first_losses[model, 0] != first_losses[model, 1]


# ---------------------------------------------------------------------------------------------
# bad input: one clear message, non-zero exit, no traceback, nothing marked completed


@pytest.mark.parametrize(("group", "expected"), [
    ("model", MODELS),
    ("data", DATASETS),
    ("schedule", SCHEDULES),
])
def test_unknown_option_lists_the_available_ones(bioexp, tmp_path, group, expected):
    args = [a for a in TINY if not a.startswith(f"{group}=")]
    result = bioexp("train", *args, f"{group}=no_such_thing", f"hydra.run.dir={tmp_path / 'run'}")
    output = assert_clean_failure(result, tmp_path, "no_such_thing", *expected)
    assert not re.search(r"^\s+_\w+$", output, re.M), f"internal files offered:\n{output}"


@pytest.mark.parametrize(("override", "key"), [
    ("schedule.supervised.lr=0", "schedule.supervised.lr"),
    ("schedule.supervised.lr=-1", "schedule.supervised.lr"),
    ("schedule.supervised.lr=abc", "schedule.supervised.lr"),
    ("schedule.supervised.epochs=-1", "schedule.supervised.epochs"),
    ("schedule.supervised.batch_size=0", "schedule.supervised.batch_size"),
    ("data.train_limit=0", "data.train_limit"),
    ("model.hidden=[-5]", "model.hidden"),
    ("model.hidden=[0]", "model.hidden"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_invalid_value_names_the_key(bioexp, tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = bioexp("train", *tiny(override), f"hydra.run.dir={run_dir}")
    assert_clean_failure(result, tmp_path, key)
    value = override.split("=", 1)[1]
    error_lines = [ln for ln in result.stderr.splitlines() if key in ln]
    assert error_lines and value in error_lines[0], result.stderr
    assert not run_dir.exists(), "a mistake caught before training left a run folder"


def test_a_sweep_whose_shared_settings_fail_stops_before_any_job(bioexp, tmp_path):
    """sweep=lr_grid holds out 10,000 images: on 300 it cannot, said once, no folder made."""
    sweep = tmp_path / "sweep"
    result = bioexp("train", *tiny("data.n_train=300"), "sweep=lr_grid",
                    f"hydra.sweep.dir={sweep}")
    assert_clean_failure(result, tmp_path, "data.val_size=10000 leaves no training images")
    assert result.stderr.count("leaves no training images") == 1, result.stderr
    assert not sweep.exists()


def test_an_output_folder_that_cannot_be_made_is_named(bioexp, tmp_path):
    """/proc is a folder even root cannot create folders in; permissions alone do not say so."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    result = bioexp("train", *TINY, "hydra.run.dir=/proc/bioexp_run")
    assert_clean_failure(result, tmp_path, "hydra.run.dir=/proc/bioexp_run cannot be written")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_supervised_epoch_says_so(bioexp, tmp_path):
    result = bioexp("train", *tiny("schedule.supervised.epochs=0"),
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, output_of(result)
    assert "nothing trains the model" in result.stderr
    assert "(no supervised epoch)" in result.stderr and "None" not in result.stderr


def test_unknown_key_is_rejected(bioexp, tmp_path):
    result = bioexp("train", *tiny("schedule.supervised.foo=1"),
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert_clean_failure(result, tmp_path, "schedule.supervised.foo")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(bioexp, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # the fixture's XDG_CACHE_HOME
    monkeypatch.delenv("BIOEXP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    if locate(SOURCES["mnist"], None) is not None:
        pytest.skip("MNIST is installed on this machine")
    run_dir = tmp_path / "run"
    result = bioexp("train", "data=mnist", "data.download=false", "schedule.supervised.epochs=1",
                    "progress=false", "device=cpu", f"hydra.run.dir={run_dir}")
    output = assert_clean_failure(result, tmp_path, "mnist", "/usr/share/datasets",
                                  str(cache / "bioexp" / "data"), "data.download=true")
    assert "data.root" in output or "BIOEXP_DATA" in output, output
    assert not (cache / "bioexp" / "data" / "MNIST").exists(), "it downloaded anyway"
    assert_no_run_folder(run_dir, tmp_path)


def test_cuda_without_cuda(bioexp, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("device=")]
    result = bioexp("train", *args, "device=cuda", f"hydra.run.dir={run_dir}")
    assert_clean_failure(result, tmp_path, "device=cuda", "device=cpu")
    assert_no_run_folder(run_dir, tmp_path)


def test_divergence_is_recorded_and_keeps_the_folder(bioexp, tmp_path):
    # SGD at lr 1.5 with dropout survives the first epoch and explodes in the second, past 100
    # times the untrained model's loss (seed 0, CPU: deterministic)
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("schedule.supervised.epochs=")]
    result = bioexp("train", *args, "schedule.supervised.epochs=4", "model.dropout=0.2",
                    "optimizer=sgd", "schedule.supervised.lr=1.5",
                    "lr_schedule=constant", f"hydra.run.dir={run_dir}")
    assert_clean_failure(result, tmp_path, "diverged", "100 times the untrained model's")

    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "diverged", summary
    where = summary["diverged_at"]
    assert where["phase"] == "supervised"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows, "the epochs before the divergence were not kept"
    assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
    # diverged in the epoch after the last recorded one, at a global step inside that epoch
    assert where["epoch"] == rows[-1]["epoch"] + 1, (where, rows[-1])
    assert rows[-1]["step"] < where["step"] <= rows[-1]["step"] + TINY_STEPS_PER_EPOCH, where
    assert f"epoch {where['epoch']}, step {where['step']}" in summary["error"], summary
    assert summary.get("test_acc") is None
    log = (run_dir / "train.log").read_text()
    assert "diverged" in log, log
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["training"]["position"]["epoch"] == rows[-1]["epoch"]
    assert (run_dir / "plots" / "curves.png").is_file()


def test_nan_after_the_last_step_is_divergence_not_completion(bioexp, tmp_path):
    # one epoch of one step: its loss (before the step) is finite, the step at lr 1e30 sends the
    # weights past float32's range, so the evaluation that follows sees NaN
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("schedule.supervised.epochs=",
                                                  "schedule.supervised.batch_size="))]
    result = bioexp("train", *args, "schedule.supervised.epochs=1",
                    "schedule.supervised.batch_size=256", "optimizer=sgd",
                    "schedule.supervised.lr=1e30", f"hydra.run.dir={run_dir}")
    summary = read_json(run_dir / "summary.json")
    if summary["status"] == "completed":
        rows = read_metrics(run_dir / "metrics.jsonl")
        if not rows or rows[-1]["train_loss"] is None or rows[-1]["test_loss"] is not None:
            pytest.fail(f"these overrides no longer give a finite train loss and a NaN test "
                        f"loss; pick others: {rows}")
    assert_clean_failure(result, tmp_path, "diverged")
    assert summary["status"] == "diverged", summary
    assert summary["diverged_at"]["phase"] == "supervised"
    assert summary["diverged_at"]["epoch"] == 1


def test_list_model_shows_hyperparameters_defaults_and_meanings(capsys):
    from bioexp.cli import main

    main(["list", "model=krotov_fc"])
    out = capsys.readouterr().out
    assert out.startswith("model krotov_fc: Krotov-Hopfield hidden layer")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "2000" in rows["hidden"] and "int at least 2" in rows["hidden"]
    assert "hidden units of the Krotov layer" in rows["hidden"]
    assert "[256, 1024]" in rows["head"] and "float in [0, 1]" in rows["delta"]
    assert "schedule.unsupervised.epochs" in rows and "20" in rows["schedule.unsupervised.epochs"]
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "model=no_such_model"])
    assert exit_info.value.code == 2
    assert "unknown model 'no_such_model'; available: bp_mlp" in capsys.readouterr().err


def test_data_command_names_its_own_download_flag(capsys, monkeypatch, tmp_path):
    from bioexp.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BIOEXP_DATA", raising=False)
    if locate(SOURCES["cifar10"], None) is not None:
        pytest.skip("CIFAR-10 is installed on this machine")
    with pytest.raises(SystemExit):
        main(["data", "cifar10"])
    err = capsys.readouterr().err
    assert "--download was not given" in err and "run with --download where" in err
    assert "data.download" not in err
