"""The base class of layers trained by a local rule instead of by the optimiser.

The engine finds these layers with `isinstance(module, LocalLayer)`: during the unsupervised phase
(and, in the one-phase schedule, during every supervised batch) it calls `local_update` after each
forward pass with the input the layer saw and the output it gave, under `torch.no_grad()`. The
weights the rule trains are `self.weight`, a buffer (or a parameter with `requires_grad=False`),
so the optimiser never touches them.

Local layers compute in float32 whatever the caller's autocast (`precision=bf16` autocasts the
supervised steps, through which the one-phase schedule's local layers learn): their forward pass,
and so the rule that runs on its input and output, see float32 tensors with autocast off.
"""

from __future__ import annotations

import torch
from torch import nn

# A unit whose weight norm is within this of 1, where the Krotov rule (the p-norm) and SoftHebb
# (the Euclidean norm) take it, has converged.
CONVERGED_NORM = 0.25
"""How close to 1 a unit's weight norm must be for the unit to count as converged."""


def converged_share(norms: torch.Tensor) -> float:
    """The fraction of units whose weight norm in `norms` (H,) is within CONVERGED_NORM of 1.

    Args:
        norms: One weight norm per unit, (H,), in the norm the layer's rule drives to 1.

    Returns:
        A fraction in [0, 1]: the `units_converged` statistic of Krotov and SoftHebb layers.
    """
    return ((norms - 1).abs() < CONVERGED_NORM).float().mean().item()


class LocalLayer(nn.Module):
    """A layer whose weights change only through `local_update`.

    A subclass gives `forward` and `local_update`; the other methods have defaults (nothing to
    report, and a standard Gaussian for the control). The engine reads a few more names when a
    layer has them: a method `field_shape()` (the shape of one unit's receptive field, for a
    convolution's plots), and the class attributes below. Every public instance attribute
    that is not a tensor or a module (the rule's settings) enters the phase-1 cache key, so
    two layers with other settings never share a cached body; private ones (`_name`) and
    class attributes do not.

    Attributes:
        weight: The weights the rule trains, a buffer (or a parameter with
            `requires_grad=False`): the engine measures its norm to blame a layer for a
            divergence, and `parameter_counts` counts it as `local`.
        version: A class attribute, 0 when absent: the rule's version, part of the phase-1
            cache key. Raise it when the rule changes what it computes, so that bodies cached
            by the old rule are not reused.
        graph_capturable: A class attribute, False when absent: True when `local_update`
            never waits for the host (no `.item()`, no branch on a tensor's value, shapes that
            do not depend on the data), so that `cuda_graphs=true` may capture a whole epoch
            of it in one CUDA graph.
    """

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The module's call (forward hooks included: the engine's rule runs in one) with
        autocast off, on an input of float32 at least (a bf16 or fp16 one is cast up)."""
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            return super().__call__(x, *args, **kwargs)

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One step of the layer's rule for input batch `x`, output `y`, learning rate `lr`.

        The engine calls it from a forward hook, after every forward pass while the layer
        learns, under `torch.no_grad()`, with autocast off. It changes `weight` (and any state
        the rule keeps, in buffers) in place.

        Args:
            x: The input the layer saw (B, ...), float32 at least, detached.
            y: The output it gave for `x`, detached.
            lr: The rate of this epoch, from the phase's schedule (a 0-d tensor on the device
                inside a CUDA graph, for layers that are `graph_capturable`).
        """
        raise NotImplementedError

    def local_stats(self) -> dict[str, float]:
        """Scalars worth logging after an unsupervised epoch (e.g. weight norms).

        Returns:
            Name -> value; each goes into the epoch's metrics row as
                `<class name><index>.<name>` (`KrotovLayer0.units_converged`). Empty by default.
        """
        return {}

    def receptive_fields(self) -> torch.Tensor | None:
        """(units, inputs): each unit's input weights, for plotting; None when not meaningful.

        Returns:
            One row per unit, of the inputs of one unit (a convolution's patch, flattened; its
                `field_shape()` gives the patch's shape), or None. `plots/receptive_fields.png`
                draws them for the first local layer when it sees the image itself.
        """
        return None

    def unit_usage(self) -> torch.Tensor | None:
        """(units,): how often each unit won a competition, for layers that have one.

        Returns:
            One count per unit (samples won, or positions for a convolution), or None for a
                layer whose units do not compete. `plots/win_counts.png` draws it.
        """
        return None

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        """Redraw the weights as a Gaussian random projection of the same shape, each unit's
        weights at the norm the layer's rule converges to (the `control=gaussian_features`
        baseline: the architecture with untrained, isotropic random features at the trained
        layer's operating point, so that a control never loses by its scale alone). Here a
        standard Gaussian; layers whose rule fixes a norm override it.

        The engine calls it once, before training, in a run with `control=gaussian_features`;
        the layer then never learns. It changes `weight` in place.
        """
        self.weight.normal_()

    def unconverged(self) -> str | None:
        """After phase 1: a sentence when the weights are evidently still far from where the rule
        takes them (phase 1 was too short), else None.

        Returns:
            The warning the engine logs once after phase 1 (trained or loaded from the cache),
                or None. None by default.
        """
        return None
