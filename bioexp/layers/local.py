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


def converged_share(norms: torch.Tensor) -> float:
    """The fraction of units whose weight norm in `norms` (H,) is within CONVERGED_NORM of 1."""
    return ((norms - 1).abs() < CONVERGED_NORM).float().mean().item()


class LocalLayer(nn.Module):
    """A layer whose weights change only through `local_update`."""

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The module's call (forward hooks included: the engine's rule runs in one) with
        autocast off, on an input of float32 at least (a bf16 or fp16 one is cast up)."""
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            return super().__call__(x, *args, **kwargs)

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One step of the layer's rule for input batch `x`, output `y`, learning rate `lr`."""
        raise NotImplementedError

    def local_stats(self) -> dict[str, float]:
        """Scalars worth logging after an unsupervised epoch (e.g. weight norms)."""
        return {}

    def receptive_fields(self) -> torch.Tensor | None:
        """(units, inputs): each unit's input weights, for plotting; None when not meaningful."""
        return None

    def unit_usage(self) -> torch.Tensor | None:
        """(units,): how often each unit won a competition, for layers that have one."""
        return None

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        """Redraw the weights as a Gaussian random projection of the same shape, each unit's
        weights at the norm the layer's rule converges to (the `control=gaussian_features`
        baseline: the architecture with untrained, isotropic random features at the trained
        layer's operating point, so that a control never loses by its scale alone). Here a
        standard Gaussian; layers whose rule fixes a norm override it."""
        self.weight.normal_()

    def unconverged(self) -> str | None:
        """After phase 1: a sentence when the weights are evidently still far from where the rule
        takes them (phase 1 was too short), else None."""
        return None
