"""Where the Hydra config tree lives, what each config group offers, and checks on the values.

Hydra itself rejects unknown groups, options and keys (the config is in struct mode). What it
cannot know is which values make sense: `validate` checks those before any data is loaded, so a
typo in a learning rate ends in one sentence that names the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bioexp.errors import ConfigError

GROUPS = ("model", "data", "schedule", "experiment", "sweep", "hebbian_split", "hybrid")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear", "exponential")
INPUT_SCALES = ("unit", "symmetric")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def config_dir() -> Path:
    """The config root: shipped as package data in a wheel, or `conf/` beside the package."""
    packaged = resources.files("bioexp") / "conf"
    if packaged.is_dir() and (packaged / "train.yaml").is_file():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "train.yaml").is_file():
        return source_tree
    raise ConfigError(f"bioexp's config tree is missing (looked in {packaged} and {source_tree})")


def group_options(group: str) -> list[tuple[str, str]]:
    """(option, one-line description) for every YAML file of a config group.

    The description is the file's first comment line, so the YAML itself stays the one place
    where an option is described.
    """
    options = []
    for path in sorted((config_dir() / group).glob("*.yaml")):
        first = path.read_text().splitlines()[:3]
        comments = [ln.lstrip("# ").strip() for ln in first
                    if ln.startswith("#") and "@package" not in ln]
        options.append((path.stem, comments[0] if comments else ""))
    return options


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(cfg: DictConfig, key: str, *, minimum: int | None = None,
              nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    expected += " or null" if nullable else ""
    if not _is_int(value) or (minimum is not None and value < minimum):
        raise _fail(key, expected, value)


def check_number(
    cfg: DictConfig, key: str, *, low: float = float("-inf"), high: float = float("inf"),
    low_inclusive: bool = True,
) -> None:
    value = OmegaConf.select(cfg, key)
    ok = (_is_number(value) and math.isfinite(value)
          and (value >= low if low_inclusive else value > low) and value <= high)
    if not ok:
        if low == 0 and not low_inclusive and high == float("inf"):
            expected = "a positive number"
        elif high == float("inf"):
            expected = f"a number >= {low}"
        else:
            expected = f"a number in {'[' if low_inclusive else '('}{low}, {high}]"
        raise _fail(key, expected, value)


def check_choice(cfg: DictConfig, key: str, choices: Iterable[str]) -> None:
    value = OmegaConf.select(cfg, key)
    choices = tuple(choices)
    if value not in choices:
        raise _fail(key, "one of " + ", ".join(choices), value)


def check_bool(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


# Top-level keys that may differ between a run and its resumption: they change no result.
RESUME_FREE_KEYS = ("resume", "progress", "threads", "checkpoint_every_min")


def validate(cfg: DictConfig) -> None:
    """Check the values the engine and data layer read; ConfigError names the first bad one."""
    check_int(cfg, "seed")
    device = cfg.get("device")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise _fail("device", "auto, cpu, cuda or cuda:N", device)
    check_bool(cfg, "progress")
    check_bool(cfg, "cache")
    check_int(cfg, "eval_batch_size", minimum=1)
    check_int(cfg, "threads", minimum=1, nullable=True)
    check_number(cfg, "checkpoint_every_min", low=0)

    check_int(cfg, "data.train_limit", minimum=1, nullable=True)
    check_int(cfg, "data.test_limit", minimum=1, nullable=True)
    check_int(cfg, "data.val_size", minimum=0)
    check_int(cfg, "data.seed")
    check_bool(cfg, "data.download")
    root = OmegaConf.select(cfg, "data.root")
    if root is not None and not isinstance(root, str):
        raise _fail("data.root", "a folder path or null", root)

    check_choice(cfg, "model.input_scale", INPUT_SCALES)

    for phase in ("unsupervised", "supervised"):
        prefix = f"schedule.{phase}"
        check_int(cfg, f"{prefix}.epochs", minimum=0)
        check_int(cfg, f"{prefix}.batch_size", minimum=1)
        check_number(cfg, f"{prefix}.lr", low=0, low_inclusive=False)
        check_choice(cfg, f"{prefix}.lr_schedule", LR_SCHEDULES)
        check_number(cfg, f"{prefix}.lr_decay", low=0, high=1, low_inclusive=False)
    check_choice(cfg, "schedule.supervised.optimizer", OPTIMIZERS)
    check_number(cfg, "schedule.supervised.momentum", low=0, high=1)
    check_number(cfg, "schedule.supervised.weight_decay", low=0)
    check_number(cfg, "schedule.supervised.grad_clip", low=0)
