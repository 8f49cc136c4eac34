"""The Python API: `bioexp.run(overrides)` trains the run `bioexp train` would, into a normal run
folder, and `bioexp.load_run(folder)` reads a finished run back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, output_of

import bioexp
from bioexp import api
from bioexp.errors import ConfigError
from bioexp.records import read_json, read_metrics

TIME_FIELDS = ("elapsed_s", "epoch_time_s", "samples_per_s")
# phase 1 and a head, one thread (the CLI's process and pytest's may have different defaults)
KROTOV = (*TINY, "model=krotov_fc", "model.hidden=32", "model.head=[16]", "cache=false",
          "threads=1")


@pytest.fixture(autouse=True)
def keep_threads():
    """`threads=1` sets torch's thread count for the whole process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]


def test_import_bioexp_stays_cheap_and_names_the_api() -> None:
    code = ("import sys, bioexp; assert 'torch' not in sys.modules and 'hydra' not in "
            "sys.modules, sorted(sys.modules); print(bioexp.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, output_of(result)
    assert result.stdout.strip() == bioexp.__version__
    from bioexp import load_run, run

    assert run is api.run and load_run is api.load_run and bioexp.run is api.run
    assert {"run", "load_run"} <= set(dir(bioexp))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        bioexp.nothing  # noqa: B018


@pytest.mark.slow
def test_a_run_through_the_api_equals_the_same_run_through_the_command(bioexp, tmp_path):
    api_dir, cli_dir = tmp_path / "api", tmp_path / "cli"
    result = bioexp("train", *KROTOV, f"hydra.run.dir={cli_dir}")
    assert result.returncode == 0, output_of(result)
    run = api.run(list(KROTOV), run_dir=api_dir)  # bioexp.run (the fixture takes the name)
    assert run.path == api_dir.absolute() and run.summary["status"] == "completed"
    rows = read_metrics(api_dir / "metrics.jsonl")
    assert {row["phase"] for row in rows} == {"unsupervised", "supervised"}
    assert without_time(rows) == without_time(read_metrics(cli_dir / "metrics.jsonl"))
    assert run.metrics == rows
    cli_summary = read_json(cli_dir / "summary.json")
    assert run.summary["test_acc"] == cli_summary["test_acc"]
    for name in ("config.yaml", "overrides.yaml"):  # the same record of what was run
        assert (api_dir / ".hydra" / name).read_text() == (cli_dir / ".hydra" / name).read_text()
    assert yaml.safe_load((api_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["run"][
        "dir"] == str(api_dir)
    for name in ("checkpoints/last.pt", "plots/curves.png", "train.log"):
        assert (api_dir / name).is_file(), name
    assert "completed: test accuracy" in (api_dir / "train.log").read_text()
    cli_weights = torch.load(cli_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(cli_weights[k], v) for k, v in run.model.state_dict().items())


def test_load_run_gives_the_trained_model_in_eval_mode(tmp_path: Path) -> None:
    # dropout: a model left in training mode would score otherwise (and differently each time)
    overrides = [*TINY, "model=bp_mlp", "model.hidden=[64]", "model.dropout=0.5"]
    run = bioexp.run(overrides, run_dir=tmp_path / "run")
    loaded = bioexp.load_run(tmp_path / "run")
    assert loaded.path == run.path and loaded.summary == run.summary
    assert loaded.cfg.model.dropout == 0.5 and loaded.cfg.data.n_train == 256
    for model in (run.model, loaded.model):
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            predicted = model.predict(model(loaded.data.test.x))
        accuracy = (predicted == loaded.data.test.y).float().mean().item()
        assert accuracy == pytest.approx(run.summary["test_acc"], abs=1e-6)
    assert len(loaded.metrics) == 2 and loaded.metrics[-1]["test_acc"] == run.summary["test_acc"]
    # the same overrides into the same folder: the finished run, not trained again
    again = bioexp.run(overrides, run_dir=tmp_path / "run")
    assert again.summary == run.summary
    resumed = bioexp.run([f"resume={tmp_path / 'run'}"])
    assert resumed.summary == run.summary and resumed.path == run.path


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.hidden=[0]"], "model.hidden must be"),  # bioexp's own check
    (["model.k=50", "model=krotov_fc", "model.hidden=20"], "model.k"),  # two keys
    (["model=no_such_model"], "model has no option no_such_model"),
    (["schedule.supervised.nope=1"], "schedule.supervised.nope"),
    (["schedule.supervised.optimizer=sgd"], "optimizer=adam"),  # a retired key
    (["seed=0,1"], "several values"),
    (["-m", "seed=0,1"], "bioexp.run trains one run"),
    (["sweep=seeds"], "sweep=seeds is a multirun"),
    (["resume=somewhere"], "resume= continues the run"),
])
def test_a_mistake_is_one_line_and_leaves_no_folder(tmp_path, overrides, needle) -> None:
    with pytest.raises(ConfigError) as caught:
        bioexp.run([*TINY, *overrides], run_dir=tmp_path / "run")
    message = str(caught.value)
    assert needle.lower() in message.lower() and "\n" not in message, message
    assert not (tmp_path / "run").exists()


def test_a_mistake_reads_as_the_command_says_it(make_cfg) -> None:
    from bioexp.checks import preflight

    with pytest.raises(ConfigError) as command:
        preflight(make_cfg(*TINY, "model.dropout=1.5"))
    with pytest.raises(ConfigError) as api:
        bioexp.run([*TINY, "model.dropout=1.5"])
    assert str(api.value) == str(command.value)


def test_a_diverged_run_raises_and_keeps_its_folder(tmp_path: Path) -> None:
    with pytest.raises(api.RunDiverged, match="diverged") as caught:
        bioexp.run([*TINY, "schedule.supervised.lr=1e6"], run_dir=tmp_path / "run")
    assert caught.value.path == (tmp_path / "run").absolute()
    assert read_json(tmp_path / "run" / "summary.json")["status"] == "diverged"


def test_threads_null_after_a_run_with_threads_gives_the_default_back(tmp_path: Path) -> None:
    """Runs in one process (a notebook's) do not inherit each other's thread count."""
    from bioexp.train import DEFAULT_THREADS

    if DEFAULT_THREADS == 1:
        pytest.skip("this process's default is one thread: nothing to give back")
    one = api.run([*TINY, "model=bp_mlp", "threads=1"], run_dir=tmp_path / "one")
    again = api.run([*TINY, "model=bp_mlp", "threads=null"], run_dir=tmp_path / "default")
    assert one.summary["environment"]["threads"] == 1
    assert again.summary["environment"]["threads"] == DEFAULT_THREADS
