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

# control=...: the model's local-rule layers untrained, at their own initial weights or Gaussian.
CONTROLS = ("random_features", "gaussian_features")
INPUT_SCALES = ("unit", "symmetric")
# precision=...: fp32 everywhere; TF32 matmuls and convolutions on CUDA; bf16 autocast of the
# supervised steps (CPU or CUDA). Local rules and evaluation stay fp32 (TF32 under tf32).
PRECISIONS = ("fp32", "tf32", "bf16")
# Settings that exist on CUDA alone: asked for on the CPU, they are a one-line error.
CUDA_ONLY = {"cuda_graphs": True, "precision": "tf32"}
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


def description(text: str) -> str:
    """The first paragraph of a YAML file's leading comment, as one line: the comment lines
    before the first blank comment, indented example (`#   bioexp train ...`) or setting."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if "@package" in body:
            continue
        if not body.strip() or body.startswith("   "):
            break
        lines.append(body.strip())
    return " ".join(lines)


def config_groups() -> list[str]:
    """The config groups a run is composed from (`model`, `data`, ...): the folders of the
    config tree, Hydra's own (`hydra/`) aside."""
    return sorted(p.name for p in config_dir().iterdir()
                  if p.is_dir() and p.name != "hydra" and not p.name.startswith("_"))


def option_names(group: str) -> list[str]:
    """The options of a config group (`model` -> bp_mlp, cnn, ...): its YAML files' names."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def group_options(group: str) -> list[tuple[str, str]]:
    """(option, description) for every YAML file of a config group.

    The description is the file's leading comment, so the YAML itself stays the one place
    where an option is described.
    """
    return [(name, description((config_dir() / group / f"{name}.yaml").read_text()))
            for name in option_names(group)]


# Meanings of the hyperparameters many models share; a model's YAML comment on a key wins.
COMMON_MEANINGS = {
    "input_scale": "pixels in [0, 1] (unit) or [-1, 1] (symmetric)",
    "hidden": "sizes of the hidden fully connected layers",
    "channels": "output channels of the two 5x5 convolutions",
    "activation": "the nonlinearity after each hidden layer",
    "dropout": "dropout rate after each hidden activation",
    "head": "hidden sizes of the head; [] is a linear read-out",
    "feedback_init": "how the random feedback matrices B are drawn (uniform)",
    "feedback_scale": "rescale each B to its W's norm at initialisation",
}
_SETTING = re.compile(r"^(?P<indent>\s*)(?P<key>\w+):(?P<value>[^#]*)(#\s*(?P<note>.*))?$")


def model_options(name: str) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """The hyperparameters `conf/model/<name>.yaml` sets, as (key, default, meaning), and the
    other settings the file makes for that model: config groups it chooses (`optimizer: sgd`)
    and dotted keys (`schedule.supervised.lr`). ConfigError for an unknown model."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(option_names("model"))
        raise ConfigError(f"unknown model {name!r}; available: {known}")
    text = path.read_text()
    node = OmegaConf.load(path)
    nested = "model" in node and "name" not in node
    model = node.model if nested else node
    notes = {}
    for line in text.splitlines():
        match = _SETTING.match(line)
        if match and match["note"] and (len(match["indent"]) == 2) == nested:
            notes.setdefault(match["key"], match["note"].strip())
    rows = [(key, _value_text(model[key]), notes.get(key) or COMMON_MEANINGS.get(key, ""))
            for key in model if key != "name"]
    if not nested:
        return rows, {}
    groups = {entry.split("/")[-1]: choice  # `- override /optimizer: sgd` -> optimizer: sgd
              for item in node.get("defaults", []) if isinstance(item, DictConfig)
              for entry, choice in item.items()}
    others = {k: v for k, v in OmegaConf.to_container(node).items()
              if k not in ("model", "defaults")}
    return rows, {**groups, **flatten(others)}


def _value_text(value: Any) -> str:
    """A config value as it is typed on the command line: [512, 256], true, null, 0.001."""
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


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


def check_strengths(cfg: DictConfig, key: str) -> None:
    """`key` is a list of numbers in [0, 1] (FGSM strengths as fractions of the pixel range)."""
    value = OmegaConf.select(cfg, key, default=[])
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else None
    if values is None or not all(_is_number(v) and 0 <= v <= 1 for v in values):
        raise _fail(key, "a list of numbers in [0, 1], e.g. [0, 0.1]", value)


def check_bool(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


def ignored_settings(cfg: DictConfig, given: Iterable[str]) -> list[str]:
    """A sentence for each setting among `given` (the keys set on the command line) that this
    run does not use, so that a user who set it learns why it changed nothing."""
    given = set(given)
    notes = []
    lr_schedule = OmegaConf.select(cfg, "schedule.unsupervised.lr_schedule")
    if "schedule.unsupervised.lr_decay" in given and lr_schedule != "exponential":
        notes.append(f"schedule.unsupervised.lr_decay is ignored: only lr_schedule exponential "
                     f"uses it, and this run's is {lr_schedule}")
    rule = OmegaConf.select(cfg, "model.rule")
    if "model.sparsity" in given and rule in ("hebb", "oja"):
        notes.append(f"model.sparsity is ignored: only the gupta rules use it, and this run's "
                     f"model.rule is {rule}")
    return notes


# Keys of `model` that are not factory arguments.
MODEL_META_KEYS = ("name", "input_scale")


def model_hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The `model` node's keys that are factory arguments."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
            if k not in MODEL_META_KEYS}


# Top-level keys that may differ between a run and its resumption: they change no result.
RESUME_FREE_KEYS = ("resume", "progress", "threads", "checkpoint_every_min", "cuda_graphs")


def validate(cfg: DictConfig) -> None:
    """Check the values the engine and data layer read; ConfigError names the first bad one."""
    check_int(cfg, "seed")
    device = cfg.get("device")
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise _fail("device", "auto, cpu, cuda or cuda:N", device)
    check_bool(cfg, "progress")
    check_bool(cfg, "cache")
    if cfg.get("control") is not None:
        check_choice(cfg, "control", CONTROLS)
    check_int(cfg, "eval_batch_size", minimum=1)
    check_int(cfg, "threads", minimum=1, nullable=True)
    check_number(cfg, "checkpoint_every_min", low=0)
    check_strengths(cfg, "fgsm")
    check_numerics(cfg, device)

    check_int(cfg, "data.train_limit", minimum=1, nullable=True)
    check_int(cfg, "data.test_limit", minimum=1, nullable=True)
    check_int(cfg, "data.val_size", minimum=0)
    check_int(cfg, "data.labels_per_class", minimum=1, nullable=True)
    check_int(cfg, "data.seed")
    check_bool(cfg, "data.download")
    root = OmegaConf.select(cfg, "data.root")
    if root is not None and not isinstance(root, str):
        raise _fail("data.root", "a folder path or null", root)
    if OmegaConf.select(cfg, "data.name") == "synthetic":  # the generated set's own settings
        for key, least in (("n_train", 1), ("n_test", 1), ("num_classes", 2), ("channels", 1),
                           ("image_size", 1)):
            check_int(cfg, f"data.{key}", minimum=least)
        check_number(cfg, "data.noise", low=0)

    check_choice(cfg, "model.input_scale", INPUT_SCALES)

    for phase in ("unsupervised", "supervised"):
        prefix = f"schedule.{phase}"
        check_int(cfg, f"{prefix}.epochs", minimum=0)
        check_int(cfg, f"{prefix}.batch_size", minimum=1)
        check_number(cfg, f"{prefix}.lr", low=0, low_inclusive=False)
    from bioexp.engine.schedule import RATE_SCHEDULES  # here: the other checks need no torch

    check_choice(cfg, "schedule.unsupervised.lr_schedule", RATE_SCHEDULES)
    check_number(cfg, "schedule.unsupervised.lr_decay", low=0, high=1, low_inclusive=False)
    check_number(cfg, "schedule.supervised.grad_clip", low=0)
    for group in ("optimizer", "lr_schedule"):
        target = OmegaConf.select(cfg, f"{group}._target_")
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{group} must name a class with _target_ (e.g. {group}="
                              f"{'adam' if group == 'optimizer' else 'cosine'}), got {target!r}")


def check_numerics(cfg: DictConfig, device: str) -> None:
    """`precision` and `cuda_graphs`; the CUDA-only settings are refused for a run on the CPU
    (device=cpu, or auto without CUDA) rather than silently ignored."""
    if "precision" in cfg:
        check_choice(cfg, "precision", PRECISIONS)
    if "cuda_graphs" in cfg:
        check_bool(cfg, "cuda_graphs")
    asked = [f"{key}={cfg.get(key)}".replace("True", "true") for key, value in CUDA_ONLY.items()
             if cfg.get(key) == value]
    if not asked or device.startswith("cuda"):
        return
    if device == "auto":
        import torch  # only here: the rest of the checks need no torch

        if torch.cuda.is_available():
            return
    raise ConfigError(f"{' and '.join(asked)} need{'s' if len(asked) == 1 else ''} CUDA, but "
                      f"this run is on the CPU (device={device}); leave "
                      f"{'it' if len(asked) == 1 else 'them'} out, or use device=cuda")


# Keys of earlier versions, and what replaced them: `bioexp train` names the new key.
RETIRED_KEYS = {
    "schedule.supervised.optimizer": "the config group optimizer: optimizer=adam, adamw, sgd or "
                                     "rmsprop, or any torch optimiser with "
                                     "optimizer._target_=torch.optim.NAME",
    "schedule.supervised.momentum": "optimizer.momentum (with optimizer=sgd or rmsprop)",
    "schedule.supervised.weight_decay": "optimizer.weight_decay",
    "schedule.supervised.lr_schedule": "the config group lr_schedule: lr_schedule=constant, "
                                       "linear, cosine, exponential or step",
    "schedule.supervised.lr_decay": "lr_schedule.lr_lambda.decay (with lr_schedule=exponential)",
}


def retired_key(override: str) -> str | None:
    """One sentence when a command-line override sets a key of an earlier version."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in RETIRED_KEYS:
        return f"{key} is gone: use {RETIRED_KEYS[key]}"
    return None
