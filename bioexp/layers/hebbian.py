"""A fully connected layer trained by a Hebbian rule instead of by the optimiser.

y = f(x W) with W of shape (D, H) held as a buffer. The engine calls `local_update(x, y, lr)`
after each forward pass while local learning is on; the layer asks its rule
(`bioexp.rules.hebbian`) for dW, adds lr * dW, and, with `normalize`, rescales each hidden unit's
incoming weights (a column of W) to unit length, which keeps even plain Hebb bounded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bioexp.layers.local import LocalLayer
from bioexp.rules.hebbian import HebbianRule


def normalize_columns_(w: torch.Tensor) -> torch.Tensor:
    """Scale every column of `w` to unit Euclidean norm, in place (all-zero columns stay
    zero); returns `w`."""
    return w.div_(w.norm(dim=0, keepdim=True).clamp_min_(1e-12))


class HebbianLinear(LocalLayer):
    """y = activation(x W), W (in_features, out_features) learnt by `rule`; no bias."""

    def __init__(self, in_features: int, out_features: int, rule: HebbianRule,
                 activation: nn.Module | None = None, normalize: bool = True):
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default range
        w = torch.empty(in_features, out_features).uniform_(-bound, bound)
        self.register_buffer("weight", normalize_columns_(w) if normalize else w)
        self.rule = rule
        self.activation = activation if activation is not None else nn.Identity()
        self.normalize = normalize
        self._state_keys = []
        for key, value in rule.initial_state(self.weight).items():
            self.register_buffer(f"rule_{key}", value)  # checkpointed with the weights
            self._state_keys.append(key)

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        """Standard Gaussian weights, each unit's column rescaled to unit norm with `normalize`
        (where the rule keeps it)."""
        self.weight.normal_()
        if self.normalize:
            normalize_columns_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """activation(x W) (B, H) for inputs `x` (B, D)."""
        return self.activation(x @ self.weight)  # (B, D) @ (D, H) -> (B, H)

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """Add the rule's step for input `x` and output `y` at rate `lr`, then, with
        `normalize`, rescale every unit's column to unit norm; the rule's state is kept in
        buffers."""
        state = {key: getattr(self, f"rule_{key}") for key in self._state_keys}
        if self.rule.applies_rate:
            step, state = self.rule(x, y, self.weight, state, lr=lr)
            self.weight.add_(step)
        else:
            dw, state = self.rule(x, y, self.weight, state)
            self.weight.add_(dw, alpha=lr)
        if self.normalize:
            normalize_columns_(self.weight)
        for key, value in state.items():
            setattr(self, f"rule_{key}", value)  # rebinds the buffer; no copy

    def local_stats(self) -> dict[str, float]:
        """`weight_norm_mean` and `weight_norm_max` of the units' columns."""
        norms = self.weight.norm(dim=0)
        return {"weight_norm_mean": norms.mean().item(), "weight_norm_max": norms.max().item()}

    def receptive_fields(self) -> torch.Tensor:
        """W^T (H, D): one row of input weights per unit."""
        return self.weight.T  # (H, D): one row of input weights per hidden unit

    def extra_repr(self) -> str:
        d, h = self.weight.shape
        return f"in_features={d}, out_features={h}, rule={self.rule!r}, normalize={self.normalize}"
