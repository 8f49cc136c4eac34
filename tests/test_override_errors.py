"""`bioexp train`'s override mistakes that Hydra or OmegaConf find: one line each, in this process.

Each mistake ends in one `bioexp: error:` line on stderr (no Hydra block, no caret diagram, no
traceback), a non-zero exit and no run folder; the line names the override and the closest real
key or the available options. Errors of a job itself keep Hydra's report, and HYDRA_FULL_ERROR=1
keeps Hydra's own behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import train_here
from hydra.errors import ConfigCompositionException
from omegaconf.errors import InterpolationKeyError

from bioexp.errors import ConfigError

SMALL = ("data=synthetic", "data.n_train=64", "data.n_test=32", "schedule.unsupervised.epochs=1",
         "schedule.supervised.epochs=1", "progress=false", "device=cpu", "cache=false",
         "model.hidden=[8]")


def one_error_line(capsys: pytest.CaptureFixture, code: int, root: Path) -> str:
    """The single `bioexp: error:` line of a mistake, after checking the exit and the folder."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("bioexp: error: "), err
    assert "HYDRA_FULL_ERROR" not in err and "^" not in err, err
    left = [p for p in root.rglob("*") if p.name in (".hydra", "summary.json", "train.log")]
    assert left == [] and not (root / "run").exists(), left
    return lines[0]


@pytest.fixture
def mistake(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `bioexp train` on a mistake (in tmp_path); its one error line."""
    monkeypatch.chdir(tmp_path)

    def _run(*args: str) -> str:
        code = train_here(*args, f"hydra.run.dir={tmp_path / 'run'}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}")
        return one_error_line(capsys, code, tmp_path)

    return _run


@pytest.mark.parametrize(("args", "needles"), [
    # a model's key: the closest one and the model's own settings
    (("model=fa_mlp", "model.hiden=[5]"),
     ("model.hiden", "did you mean model.hidden?", "model fa_mlp", "feedback_init")),
    (("model=fa_mlp", "model.p=3.5"),
     ("model.p is not a setting of model fa_mlp", "hidden, activation, dropout, feedback_init")),
    (("model=krotov_fc", "model.heads=[5]"), ("did you mean model.head?", "model krotov_fc")),
    # other keys: the closest one
    (("seeed=1",), ("seeed", "did you mean seed?")),
    (("schedule.supervised.lrr=0.1",), ("did you mean schedule.supervised.lr?",)),
    (("data.trian_limit=5",), ("did you mean data.train_limit?",)),
    (("schedul.supervised.lr=0.1",), ("did you mean schedule.supervised.lr?",)),
    (("data=fashion_mnist", "data.n_train=5"), ("data.n_train", "data=fashion_mnist")),
    # unparseable values: which override and why
    (("schedule.unsupervised.lr=é",), ("schedule.unsupervised.lr=é", "'é' cannot appear there")),
    (("model.hidden=[5",), ("model.hidden=[5", "brackets")),
    (("seed='3",), ("seed='3", "quote ' is not closed")),
    (("seed",), ("override seed", "no =")),
    (("=3",), ("=3", "no key")),
    # values OmegaConf refuses: the key
    (("hydra.job.chdir=abc",), ("hydra.job.chdir=abc", "not a valid bool")),
    (("model.hidden={a:1}",), ("model.hidden holds a list, not a dict",)),
    (("+seed=3",), ("seed is already in the config", "seed=3")),
    (("seed=0,1",), ("seed=0,1", "add -m", "seed=[0,1]")),
    (("seed=",), ("seed must be an integer",)),
    # options of a config group
    (("model=nosuch",), ("model=nosuch", "bp_mlp, cnn", "softhebb_mlp")),
    (("data=nosuch",), ("data=nosuch", "cifar10, fashion_mnist, mnist, synthetic")),
    (("schedule=nosuch",), ("schedule=nosuch", "one_phase, two_phase")),
    (("schedule=two_phse",), ("did you mean schedule=two_phase?",)),
    (("model=[bp_mlp,nosuch]",), ("model has no option nosuch", "bp_mlp, cnn")),
    (("hydra/launcher=nosuch",), ("hydra/launcher=nosuch", "basic")),
    # the same in a multirun, and with --cfg and --help
    (("-m", "model=fa_mlp,bp_mlp", "model.hiden=[5]"), ("did you mean model.hidden?",)),
    (("-m", "seed=0,1", "seeed=1"), ("did you mean seed?",)),
    (("--cfg", "job", "model=nosuch"), ("model=nosuch", "bp_mlp")),
    (("--help", "seeed=1"), ("did you mean seed?",)),
    (("--cfg", "job", "-m", "seed=0,1"), ("seed=0,1", "--cfg", "one value")),
    (("--run", "-m"), ("only one of",)),
])
def test_a_mistake_is_one_line(mistake, args, needles):
    line = mistake(*args)
    for needle in needles:
        assert needle in line, line


def test_the_line_for_a_model_key_matches_bioexps_own_check(mistake):
    """`model.KEY=` (Hydra finds it) and `+model.KEY=` (the registry finds it) name the same
    model's settings."""
    hydra_line = mistake("model=fa_mlp", "model.hiden=[5]")
    registry_line = mistake(*SMALL, "model=fa_mlp", "+model.hiden=[5]")
    for line in (hydra_line, registry_line):
        assert "model.hiden" in line and "fa_mlp" in line and "feedback_scale" in line, line


def test_multirun_with_cfg_job_shows_the_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_here("-m", "--cfg", "job", "model=cnn") == 0
    out = capsys.readouterr().out
    assert "name: cnn" in out and "seed: 0" in out, out
    assert list(tmp_path.iterdir()) == []


def test_hydra_full_error_keeps_hydras_behaviour(tmp_path, monkeypatch):
    """With HYDRA_FULL_ERROR=1 Hydra raises its own exception; unset, the variable is left
    unset after a run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException, match="Could not override 'seeed'"):
        train_here("seeed=1")
    assert os.environ["HYDRA_FULL_ERROR"] == "1"
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    assert train_here("seeed=1") == 2
    assert "HYDRA_FULL_ERROR" not in os.environ


@pytest.fixture
def failing_run(monkeypatch: pytest.MonkeyPatch):
    """Make the job's `bioexp.train.run` raise the given exception."""

    def _fail(exc: BaseException) -> None:
        def run(cfg, run_dir):
            raise exc

        monkeypatch.setattr("bioexp.train.run", run)

    return _fail


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_an_error_of_the_job_keeps_hydras_report(tmp_path, capsys, monkeypatch, failing_run,
                                                 multirun):
    """A bug in a job (and an OmegaConf error raised there) is reported as Hydra reports it:
    the job's traceback and exit code 1."""
    monkeypatch.chdir(tmp_path)
    for exc in (RuntimeError("boom"), InterpolationKeyError("Interpolation key 'x' not found")):
        failing_run(exc)
        flags = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"] if multirun else []
        assert train_here(*flags, *SMALL, f"hydra.run.dir={tmp_path / 'run'}") == 1
        err = capsys.readouterr().err
        assert "Error executing job with overrides" in err, err
        assert f"{type(exc).__name__}: " in err and "HYDRA_FULL_ERROR=1" in err, err
        assert "bioexp: error:" not in err, err


@pytest.mark.parametrize(("exc", "code"), [(ConfigError("bad"), 2), (KeyboardInterrupt(), 130),
                                           (SystemExit(3), 3)])
def test_a_jobs_own_exit_codes_stay(tmp_path, capsys, monkeypatch, failing_run, exc, code):
    monkeypatch.chdir(tmp_path)
    failing_run(exc)
    assert train_here(*SMALL, f"hydra.run.dir={tmp_path / 'run'}") == code
    assert "Traceback" not in capsys.readouterr().err
