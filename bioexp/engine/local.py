"""The engine's side of local-rule layers: finding them, letting them learn, checking them, and
leaving them untrained in a random-feature control (`control=...`).

Local layers are found by `isinstance(module, LocalLayer)`. While `local_learning` is active,
each applies its rule after every forward pass, under `torch.no_grad()`, to the input it saw
and the output it gave, so no layer runs twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bioexp.layers import LocalLayer

log = logging.getLogger(__name__)


def local_layers(model: nn.Module) -> list[LocalLayer]:
    return [m for m in model.modules() if isinstance(m, LocalLayer)]


def control_layers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The layers a `random_features` control freezes in a model without local-rule layers
    (`Classifier.control_layers`); empty when it has none."""
    named = getattr(model, "control_layers", None)
    return tuple(named()) if named is not None else ()


def start_control(model: nn.Module, control: str) -> None:
    """A random-feature control: its local-rule layers never learn (Schedule.local_rules), and
    with `gaussian_features` their weights are first redrawn as Gaussian projections. In a
    model whose rule trains every layer with labels, the layers it names
    (`Classifier.control_layers`) are frozen at their initial weights instead, and the rule
    trains the rest."""
    layers = local_layers(model)
    if not layers:
        frozen = control_layers(model)
        for layer in frozen:
            layer.requires_grad_(False)
        log.info("control=%s: %s frozen at their initial weights; the rule trains the rest",
                 control, f"{len(frozen)} hidden layer" + ("" if len(frozen) == 1 else "s"))
        return
    if control == "gaussian_features":
        for layer in layers:
            layer.gaussian_init_()
    count = f"{len(layers)} local-rule layer" + ("" if len(layers) == 1 else "s")
    log.info("control=%s: %s left untrained, %s", control, count,
             "redrawn as Gaussian projections" if control == "gaussian_features"
             else "at their initial weights")


@contextmanager
def local_learning(model: nn.Module, lr: Callable[[], float]) -> Iterator[None]:
    """While active, every local layer of `model` applies its rule after each forward call, at
    the rate `lr()`."""

    def update(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        with torch.no_grad():
            layer.local_update(args[0].detach(), output.detach(), lr())

    handles = [layer.register_forward_hook(update) for layer in local_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def warn_unconverged(layers: Sequence[LocalLayer]) -> None:
    """Log, once per layer, when phase 1 left a layer far from where its rule converges."""
    for layer in layers:
        warning = layer.unconverged()
        if warning:
            log.warning("%s", warning)


def holds_nonfinite(module: nn.Module) -> bool:
    """Whether any tensor of the module's state (weights, buffers) has a NaN or infinity."""
    return not all(torch.isfinite(t).all() for t in module.state_dict().values())


def _names(model: nn.Module) -> dict[nn.Module, str]:
    """Local layer -> its name in `model.named_modules()`."""
    return {module: name for name, module in model.named_modules()
            if isinstance(module, LocalLayer)}


def weight_norms(layers: Sequence[LocalLayer]) -> list[float]:
    return [layer.weight.norm().item() for layer in layers]


def grown_local_layers(model: nn.Module, before: Sequence[float], factor: float) -> list[str]:
    """Names of local layers whose weights grew more than `factor`-fold since their norms were
    `before` (an exploding loss in a phase where they learn is then theirs)."""
    names = _names(model)
    return [names[layer] for layer, now, then in zip(names, weight_norms(list(names)), before,
                                                     strict=True)
            if now > factor * then]


def broken_local_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of local layers whose weights, or whose output for the batch `x`, hold a NaN or
    infinite value."""
    names = _names(model)
    broken: list[str] = []

    def check(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if holds_nonfinite(layer) or not torch.isfinite(output).all():
            broken.append(names[layer])

    handles = [layer.register_forward_hook(check) for layer in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return broken
