"""The model registry: `@register_model` on a factory, `build_model(name, ...)`, `list_models()`.

It knows nothing of the models package: importing `bioexp.models` registers the built-in
models, and whoever needs the full list (the Hydra task, `bioexp list`, the checks) imports it.

As in timm, a model is a small factory function whose keyword arguments are its hyperparameters;
`conf/model/<name>.yaml` names the factory and sets them. The factory's signature is the schema:
`build_model` rejects unknown keys, values of the wrong type and values out of range with one
sentence that names the key, before anything is built. A range is part of the type hint:
`Annotated[float, Range(0, 1, high_open=True)]` (a dropout rate), `Annotated[Sequence[int],
Range(low=1)]` (layer sizes: every entry at least 1).
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers.local import LocalLayer

# Arguments that the engine supplies from the dataset; configs do not set them.
DATASET_ARGS = ("input_shape", "num_classes")
"""The arguments every factory takes that come from the dataset, not from the config."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name and its factory, and what the factory's signature says.

    Attributes:
        name: The name configs use (`model.name`, `conf/model/<name>.yaml`): the factory's.
        factory: The registered function.
    """

    name: str
    factory: Callable[..., nn.Module]

    @property
    def description(self) -> str:
        """The first paragraph of the factory's docstring, as one line."""
        doc = inspect.getdoc(self.factory) or ""
        return " ".join(doc.split("\n\n")[0].split())

    def hyperparameters(self) -> dict[str, Any]:
        """Name -> default of every configurable argument."""
        params = inspect.signature(self.factory).parameters.values()
        return {p.name: p.default for p in params if p.name not in DATASET_ARGS}

    def kinds(self) -> dict[str, str]:
        """Name -> the accepted values in words ("int at least 2", "one of fc, fa")."""
        hints = typing.get_type_hints(self.factory, include_extras=True)
        return {name: _describe(hints[name]) for name in self.hyperparameters() if name in hints}


@dataclass(frozen=True)
class Range:
    """Bounds on a number, or on every number of a list, and a least length for lists; used as
    `Annotated` metadata on a factory's hyperparameters.

    `Annotated[float, Range(0, 1, high_open=True)]` accepts 0 <= x < 1; `Annotated[Sequence[int],
    Range(low=1, min_len=1)]` a non-empty list of integers each at least 1. `build_model`
    refuses a value outside the range with a ConfigError that names the key and the bounds.

    Attributes:
        low: The least value (-inf: none).
        high: The greatest value (inf: none).
        low_open: Whether `low` itself is excluded.
        high_open: Whether `high` itself is excluded.
        min_len: The least length of a list.
        high_name: An upper bound that is another hyperparameter (`model.hidden`), for the
            description only: the registry cannot check it, the factory does.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    min_len: int = 0
    # an upper bound that is another hyperparameter ("model.hidden"): the factory checks it,
    # `describe` names it
    high_name: str = ""

    def holds(self, value: Any) -> bool:
        """Whether `value` (a number, or a list or tuple of numbers) is within the bounds.

        Args:
            value: A config value.

        Returns:
            True for a number within the bounds, or a list at least `min_len` long whose
                every entry is.
        """
        if isinstance(value, (list, tuple)):
            return len(value) >= self.min_len and all(self.holds(v) for v in value)
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The bounds in words: "at least 1", "in [0, 1)", "above 0", "in [2, model.hidden]"."""
        if self.high_name:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high_name}]"
        if self.high == math.inf:
            return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.low == -math.inf:
            return f"below {self.high:g}" if self.high_open else f"at most {self.high:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


_MODELS: dict[str, ModelEntry] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `factory` under its function name. Its first docstring line describes it.

    A decorator. The factory takes `input_shape` (C, H, W) and `num_classes`, which the engine
    supplies from the dataset, and keyword arguments with defaults, which are the model's
    hyperparameters: `conf/model/<name>.yaml` sets them, and their type hints (with `Range`
    inside `Annotated`, or a `Literal` of choices) are the schema `build_model` checks. It
    returns the model, a `bioexp.models.base.Classifier` (or a module with the same methods).
    The first paragraph of its docstring is the description `bioexp list model=NAME` shows.

    Args:
        factory: The model's factory function.

    Returns:
        `factory` itself, unchanged.

    Raises:
        ValueError: A model of that name is already registered.
    """
    name = factory.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, factory)
    return factory


def list_models() -> list[ModelEntry]:
    """Every registered model, by name. The built-in ones register when `bioexp.models` is
    imported; the registry itself imports no model.

    Returns:
        The entries, sorted by name.
    """
    return [_MODELS[name] for name in sorted(_MODELS)]


def get_model_entry(name: str) -> ModelEntry:
    """The registered model `name`.

    Args:
        name: A registered model's name.

    Returns:
        Its entry.

    Raises:
        ConfigError: No model of that name is registered (the message lists those that are).
    """
    if name not in _MODELS:
        known = ", ".join(sorted(_MODELS)) or "none (import bioexp.models to register them)"
        raise ConfigError(f"unknown model {name!r}; available: {known}")
    return _MODELS[name]


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (int, float, bool, str, list, None) fits a type hint."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is Annotated:
        ranges = [m for m in hint.__metadata__ if isinstance(m, Range)]
        return _conforms(value, hint.__origin__) and all(r.holds(value) for r in ranges)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """A type hint in words: `Sequence[int]` -> "list of int", `float | None` -> "float or null",
    with its range: "float in [0, 1)", "non-empty list of int, each at least 1"."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        words = _describe(hint.__origin__)
        for r in (m for m in hint.__metadata__ if isinstance(m, Range)):
            if words.startswith("list"):
                words = ("non-empty " if r.min_len else "") + f"{words}, each {r.describe()}"
            else:
                words = f"{words} {r.describe()}"
        return words
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if origin in (list, tuple, Sequence, typing.Sequence):
        args = typing.get_args(hint)
        return f"list of {_describe(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint))


def check_hyperparameters(name: str, hyperparameters: dict[str, Any]) -> None:
    """ConfigError for an unknown model, an unknown key, or a value of the wrong type.

    Checks each value against the factory's type hint, its `Range` included; keys the config
    leaves out keep the factory's defaults and are not checked.

    Args:
        name: A registered model's name.
        hyperparameters: Key -> value, as the config gives them (without `model.`).

    Raises:
        ConfigError: The model is unknown, a key is not one of its hyperparameters (with the
            nearest one), or a value does not fit its type or range.
    """
    entry = get_model_entry(name)
    accepted = entry.hyperparameters()
    hints = typing.get_type_hints(entry.factory, include_extras=True)
    for key, value in hyperparameters.items():
        if key not in accepted:
            options = ", ".join(accepted) or "none"
            guess = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f"; did you mean model.{guess[0]}?" if guess else ""
            raise ConfigError(f"model.{key} is not an option of model {name}{hint} (options: "
                              f"{options})")
        if key in hints and not _conforms(value, hints[key]):
            kind = _describe(hints[key])
            if not kind.startswith("one of"):
                kind = ("an " if kind[0] in "aeiou" else "a ") + kind
            raise ConfigError(f"model.{key} must be {kind}, got {value!r}")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int,
                **hyperparameters: Any) -> nn.Module:
    """Build registered model `name` for inputs of `input_shape` and `num_classes` outputs.

    Args:
        name: A registered model's name.
        input_shape: The shape of one input, (C, H, W).
        num_classes: The number of classes, the model's outputs.
        **hyperparameters: The factory's other keyword arguments; checked first
            (`check_hyperparameters`), the rest keep their defaults.

    Returns:
        The model the factory builds, in training mode, on the CPU.

    Raises:
        ConfigError: The model is unknown or a hyperparameter is unknown, of the wrong type
            or out of range (or the factory refuses a combination of them).
    """
    check_hyperparameters(name, hyperparameters)
    factory = get_model_entry(name).factory
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, **hyperparameters)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """The numbers a model holds, by what changes them: `trainable`, the parameters the
    optimiser trains; `local`, the weights of local-rule layers, which their rules train;
    `other`, the rest (frozen parameters, fixed feedback matrices, batch-norm statistics, the
    win counters of competing units).

    Args:
        model: Any module.

    Returns:
        `{"trainable": n, "local": n, "other": n}`, counts of numbers (not of tensors).
    """
    local_weights = {id(m.weight) for m in model.modules() if isinstance(m, LocalLayer)}
    counts = {"trainable": 0, "local": 0, "other": 0}
    for tensor in [*model.parameters(), *model.buffers()]:
        kind = ("local" if id(tensor) in local_weights
                else "trainable" if tensor.requires_grad else "other")
        counts[kind] += tensor.numel()
    return counts
