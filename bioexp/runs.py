"""Run folders read back: their checkpoint, their config, and the model they trained.

One place for what resuming a run (`resume=`, or `bioexp train` into a folder that holds the
same run), `bioexp eval` and `bioexp.load_run` need from a folder: the checkpoint (refused with
one sentence when it is missing, corrupt or of another format), the config it was trained with
(compared key by key with the current one before a resume), and the model rebuilt from that
config with the checkpoint's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.config import RESUME_FREE_KEYS, flatten, model_hyperparameters
from bioexp.data import Dataset, load_dataset
from bioexp.errors import ConfigError
from bioexp.records import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    atomic_write,
    load_checkpoint,
    read_json,
    read_metrics,
)
from bioexp.registry import build_model

# The checkpoint layout; a file without it is refused on resume.
CHECKPOINT_FORMAT = 2  # 2: the scheduler's state and the step metrics' running sums
# Statuses after which re-running into the same folder trains nothing more.
FINISHED = ("completed", "diverged")


@dataclass
class TrainedRun:
    """A finished run read back from its folder: what `bioexp.run` and `bioexp.load_run`
    return, and what `bioexp eval` evaluates.

    Attributes:
        path: The run folder.
        cfg: The config the run was trained with, as its checkpoint holds it (`cfg.model.name`,
            `cfg.data.name`, `cfg.schedule`, ...).
        model: The trained model, rebuilt from `cfg` with the checkpoint's weights, in eval
            mode on the device asked for: `model(images)` gives a score per class (B, classes),
            logits for most families, and `model.predict` of those scores the classes.
        data: The run's dataset on that device (`data.train`, `data.test`, `data.val`), with
            the same subsets, split and pixel scale as in training.
        summary: The run's summary.json (`status`, `test_acc`, `best_test_acc`, timings, ...);
            {} when the run wrote none.
    """

    path: Path
    cfg: DictConfig
    model: nn.Module
    data: Dataset
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        """The model's name and the folder's, for logs and legends:
        `krotov_fc (14-03-12_krotov_fc_mnist)`."""
        return f"{self.cfg.model.name} ({self.path.name})"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of the run's metrics.jsonl, one per evaluation, as the folder holds them."""
        return read_metrics(self.path / METRICS)


def configured_model(cfg: DictConfig, data: Dataset) -> nn.Module:
    """The model `cfg` names, with its hyperparameters, for `data`'s inputs and classes."""
    return build_model(cfg.model.name, data.input_shape, data.num_classes,
                       **model_hyperparameters(cfg))


def load_model_state(model: nn.Module, state: dict, run_dir: Path, name: str) -> None:
    """Load a checkpoint's weights, or ConfigError when they do not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"the checkpoint in {run_dir} does not fit model {name}: {first}"
                          ) from None


def read_weights(path: Path) -> dict[str, Any]:
    """A checkpoint's weights and config. Any bioexp checkpoint has them, including those
    written before the resumable format, so older runs can be evaluated too."""
    checkpoint = load_checkpoint(path, "evaluate")
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise ConfigError(f"{path} is not a bioexp checkpoint (it has no model and config)")
    return checkpoint


def load_run(folder: Path, device: torch.device, test_limit: int | None = None) -> TrainedRun:
    """The trained model of a run folder (its last checkpoint), with the run's test data.

    `bioexp.load_run` is this with a device name; `bioexp eval` passes `test_limit`.

    Args:
        folder: The run folder.
        device: Where the model and the data go.
        test_limit: Evaluate on this many test images (a seeded subset) instead of the run's
            own `data.test_limit`; None keeps the run's.

    Returns:
        The run, its model in eval mode on `device`.

    Raises:
        ConfigError: `folder` is not a folder, holds no bioexp checkpoint, or its weights do
            not fit the model its config names.
        DataError: The run's dataset cannot be found or read.
    """
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    checkpoint = read_weights(folder / CHECKPOINT)
    cfg = OmegaConf.create(checkpoint["config"])
    if test_limit is not None:
        cfg.data.test_limit = test_limit
    data = load_dataset(cfg.data, cfg.model.input_scale, device)
    model = configured_model(cfg, data)
    load_model_state(model, checkpoint["model"], folder, cfg.model.name)
    summary = read_json(folder / SUMMARY) if (folder / SUMMARY).is_file() else {}
    return TrainedRun(folder, cfg, model.to(device).eval(), data, summary)


# ----------------------------------------------------------------------------------------------
# Resuming


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable bioexp checkpoint, or ConfigError naming the file and what is wrong."""
    checkpoint = load_checkpoint(path, "resume from")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a checkpoint of this bioexp version (format "
                          f"{CHECKPOINT_FORMAT}); start the run again in a new folder")
    return checkpoint


def given_keys(run_dir: Path) -> list[str]:
    """The config keys set on the command line of the run in `run_dir`, from the overrides
    Hydra recorded there (none for a run made without Hydra)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    # unresolved: an override may hold an interpolation (`data.seed=${seed}`)
    overrides = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return [str(o).split("=", 1)[0].lstrip("+~") for o in overrides]


def config_difference(saved: dict[str, Any], current: dict[str, Any],
                      derived: set[str] = frozenset()) -> str | None:
    """The first config key whose value differs, ignoring RESUME_FREE_KEYS, as a phrase. Keys in
    `derived` (interpolations of other keys, such as the cosine schedule's epochs) are named
    only when nothing else differs: the user changed the key they come from."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b), key=lambda k: (k in derived, k))
    for key in keys:
        if key.split(".")[0] in RESUME_FREE_KEYS or a.get(key) == b.get(key):
            continue
        return f"{key} is {a.get(key)!r} there and {b.get(key)!r} here"
    return None


def interpolated_keys(cfg: DictConfig) -> set[str]:
    """The dotted keys of `cfg` whose values are interpolations (`${...}`)."""
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    return {key for key, value in raw.items() if isinstance(value, str) and "${" in value}


def resumed_config(run_dir: Path, cfg: DictConfig, given: Sequence[str]) -> DictConfig:
    """The config of the run in `run_dir` (`resume=`), with the RESUME_FREE_KEYS that the
    command line `given` sets (the others keep the run's values, threads included, so that
    the resumed run computes exactly what the uninterrupted one would have)."""
    if not run_dir.is_dir():
        raise ConfigError(f"resume={run_dir}: no such run folder")
    path = run_dir / ".hydra" / "config.yaml"
    saved = (OmegaConf.load(path) if path.is_file()
             else OmegaConf.create(read_checkpoint(run_dir / CHECKPOINT)["config"]))
    set_here = {arg.split("=", 1)[0].lstrip("+~") for arg in given}
    for key in RESUME_FREE_KEYS:
        if key in set_here or key not in saved:
            saved[key] = cfg.get(key)
    saved.resume = None
    return saved


def existing_run(run_dir: Path, config: dict[str, Any],
                 derived: set[str]) -> tuple[dict | None, dict[str, str]]:
    """The checkpoint a run folder already holds (None when it holds none), and the .hydra files
    of the run (the checkpoint's own, which Hydra may have overwritten). ConfigError when the
    folder holds a run with another config (see `config_difference`)."""
    hydra_files = {name: (run_dir / ".hydra" / name).read_text()
                   for name in ("config.yaml", "overrides.yaml")
                   if (run_dir / ".hydra" / name).is_file()}
    if not (run_dir / CHECKPOINT).exists():
        return None, hydra_files
    saved = read_checkpoint(run_dir / CHECKPOINT)
    difference = config_difference(saved["config"], config, derived)
    if difference:
        for name, text in saved.get("hydra_files", {}).items():  # Hydra overwrote them
            atomic_write(run_dir / ".hydra" / name, lambda f, t=text: f.write(t))
        raise ConfigError(f"{run_dir} holds a run with another config ({difference}); "
                          "give a new hydra.run.dir, or resume that run as it was")
    return saved, saved.get("hydra_files", hydra_files)
