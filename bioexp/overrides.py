"""Checks on `bioexp train`'s overrides that need neither Hydra nor torch, shared by the command
(`bioexp.cli`) and the Python API (`bioexp.run`): the Hydra plugin an override asks for, keys of
earlier versions, and what `resume=FOLDER` adds to the command line."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from bioexp.config import RESUME_FREE_KEYS, retired_key
from bioexp.errors import ConfigError


def install_hint(extra: str) -> str:
    """The command that installs this project's `extra`. PyPI's `bioexp` is another project, so
    the hint installs from bioexp's checkout: by its path when bioexp runs from one (an editable
    install), else from wherever the user keeps it."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "bioexp"' in pyproject.read_text(errors="replace"):
        return f"pip install -e '{root}[{extra}]'"
    return f"pip install -e '.[{extra}]' in bioexp's checkout"


# Hydra plugins behind config choices: (override, value) -> (plugin module, pip extra).
PLUGINS = {
    **{("hydra/launcher", name): ("hydra_plugins.hydra_joblib_launcher", "sweep")
       for name in ("parallel", "joblib")},
    **{("hydra/launcher", name): ("hydra_plugins.hydra_submitit_launcher", "slurm")
       for name in ("slurm", "slurm_gpu", "submitit_local", "submitit_slurm")},
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("sweep", "krotov_optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}


def missing_plugin(args: Sequence[str]) -> str | None:
    """A one-line error when an override asks for a Hydra plugin that is not installed."""
    for arg in args:
        key, _, value = arg.partition("=")
        plugin = PLUGINS.get((key.lstrip("+~"), value))
        if plugin and importlib.util.find_spec(plugin[0]) is None:
            package = plugin[0].split(".")[-1].replace("_", "-")
            return (f"{arg} needs the Hydra plugin {package}, which is not installed: "
                    f"{install_hint(plugin[1])}")
    return None


def override_problem(args: Sequence[str]) -> str | None:
    """One sentence for the first override that needs a missing plugin or sets a retired key."""
    return missing_plugin(args) or next(filter(None, map(retired_key, args)), None)


def resume_arguments(args: Sequence[str]) -> list[str]:
    """`resume=FOLDER` continues that run in that folder, with its own config: Hydra is told to
    log there and to leave its .hydra files alone. Anything that would change the run is a
    mistake, named in one line (ConfigError, so that `bioexp.run` can say it too)."""
    folder = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if not folder:
        return list(args)
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if arg in ("-m", "--multirun"):
            raise ConfigError("resume= continues one run; to resume a sweep, run the same "
                              "multirun again with the same hydra.sweep.dir")
        if not (key in RESUME_FREE_KEYS or key.startswith("hydra") or arg.startswith("-")):
            raise ConfigError(f"resume= continues the run with its own config; drop {arg}")
    if not Path(folder).is_dir():
        raise ConfigError(f"resume={folder}: no such run folder")
    return [*args, f"hydra.run.dir={folder}", "hydra.output_subdir=null"]
