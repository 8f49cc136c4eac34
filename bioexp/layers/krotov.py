"""A wide hidden layer trained by Krotov & Hopfield's competing-hidden-units rule (2019, PNAS).

The layer's output is the plain current W v of every hidden unit, (B, H); the models put the
activation (relu, relu^n or a BioCell) in the head, so that a frozen layer's currents can be
computed once and cached. W (H, D) is a buffer; `local_update` applies the rule of
`bioexp.rules.krotov` with eps = the engine's learning rate, which the default `linear` schedule
anneals as eps = lr * (1 - epoch / epochs), as in the paper. With p = 2 the currents the rule
needs are the layer's own output, so a training batch costs one matrix product.

On CUDA the step takes fixed shapes and never waits for the host (`krotov_full`, with two max
passes for k = 2), so the engine can capture a whole epoch in a CUDA graph (`cuda_graphs=true`);
on the CPU it takes the faster of the two by batch size: fixed shapes from a batch as large as
the layer, else the gather of the chosen rows (`krotov_rows`). Both give the same weights (bit
for bit on the CPU; tests/test_krotov.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from bioexp.layers.local import LocalLayer, converged_share
from bioexp.rules.krotov import RULE_VERSION, krotov_full, krotov_rows, normalized_step

KrotovInit = Literal["uniform", "normal"]


class KrotovLayer(LocalLayer):
    """Hidden units competing under the Krotov-Hopfield rule; forward(v) = v W^T."""

    version = RULE_VERSION
    # The engine may capture this layer's local_update in a CUDA graph: no host sync in it.
    graph_capturable = True
    # Which step runs: None chooses fixed shapes on CUDA, and on the CPU for batches of at least
    # as many samples as units (then nearly every row is chosen, and skipping `unique` wins:
    # 6.8 s against 8.4 s per epoch at batch 3584, 2000 units), the row gather for smaller
    # ones (21.9 s against 24.2 s at batch 1000); both give the same weights bit for bit on the
    # CPU. Tests and benchmarks set True or False. k = 2 by two max passes where `_two_max`
    # (None: on CUDA; on the CPU top-k was faster). Class attributes, private: they are no
    # settings (the same dS either way), so they stay out of the phase-1 cache key.
    _fixed_shapes: bool | None = None
    _two_max: bool | None = None

    def __init__(self, in_features: int, hidden: int, p: float = 2.0, k: int = 2,
                 delta: float = 0.4, init: KrotovInit = "uniform"):
        super().__init__()
        if not 2 <= k <= hidden:
            raise ValueError(f"k must be in [2, hidden = {hidden}], got {k}")
        w = torch.rand(hidden, in_features) if init == "uniform" else torch.randn(hidden,
                                                                                  in_features)
        self.register_buffer("weight", w)  # (H, D)
        self.register_buffer("wins", torch.zeros(hidden))  # samples each unit won, for plots
        self.p, self.k, self.delta, self.init = float(p), int(k), float(delta), init

    def row_norms(self) -> torch.Tensor:
        return self.weight.norm(dim=1).clamp_min(1e-12)  # (H,)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The currents v W^T (B, H) of inputs `v` (B, D); no activation."""
        return v @ self.weight.T  # (B, D) @ (D, H) -> (B, H)

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float | torch.Tensor) -> None:
        """One step at rate `lr` (a float, or a 0-d tensor on the device inside a CUDA graph)."""
        currents = y if self.p == 2 else None  # the p = 2 current is v W^T: the layer's output
        on_cuda = x.device.type == "cuda"
        fixed = on_cuda or len(x) >= len(self.weight)
        if fixed if self._fixed_shapes is None else self._fixed_shapes:
            two_max = on_cuda if self._two_max is None else self._two_max
            ds, winners = krotov_full(x, self.weight, self.p, self.k, self.delta, currents,
                                      two_max)
            self.weight.add_(normalized_step(ds, lr))
            self.wins.index_add_(0, winners, torch.ones_like(winners, dtype=self.wins.dtype))
            return
        rows, ds, winners = krotov_rows(x, self.weight, self.p, self.k, self.delta, currents)
        if rows is None:
            self.weight.add_(normalized_step(ds, lr))
        else:
            self.weight.index_add_(0, rows, normalized_step(ds, lr))  # other rows: dS = 0
        self.wins.index_add_(0, winners, torch.ones_like(winners, dtype=self.wins.dtype))

    def p_norms(self) -> torch.Tensor:
        """(H,): each unit's weight row in the rule's p-norm. The rule drives it to 1 (Krotov &
        Hopfield 2019, the sphere of radius R = 1); uniform [0, 1) rows of 784 start near 5.8."""
        return self.weight.abs().pow(self.p).sum(dim=1).pow(1 / self.p)

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        """Gaussian rows at unit p-norm: random directions on the sphere the rule drives every
        row to (Krotov & Hopfield 2019), the fair control's operating point."""
        self.weight.normal_()
        self.weight.div_(self.p_norms().clamp_min(1e-12)[:, None])

    def local_stats(self) -> dict[str, float]:
        """`weight_norm_mean` (the rows' Euclidean norms), `units_never_won` and
        `units_converged` (the share of rows whose p-norm is within CONVERGED_NORM of 1)."""
        return {"weight_norm_mean": self.weight.norm(dim=1).mean().item(),
                "units_never_won": int((self.wins == 0).sum().item()),
                "units_converged": converged_share(self.p_norms())}

    def unconverged(self) -> str | None:
        """A sentence when fewer than half of the units reached unit p-norm, else None."""
        norms = self.p_norms()
        converged = converged_share(norms)
        if converged >= 0.5:
            return None
        return (f"only {converged:.0%} of the Krotov layer's {len(norms)} units reached the unit "
                f"p-norm that the rule converges to (median norm {norms.median().item():.2f}): "
                "phase 1 was far too short, and its features are close to their random start; "
                "give it more epochs, images or schedule.unsupervised.lr (docs/krotov.md, "
                "Krotov budget)")

    def receptive_fields(self) -> torch.Tensor:
        """W (H, D): one row of input weights per unit."""
        return self.weight

    def unit_usage(self) -> torch.Tensor:
        """(H,): the samples each unit won (was the most driven unit for) while it learnt."""
        return self.wins

    def extra_repr(self) -> str:
        h, d = self.weight.shape
        return (f"in_features={d}, hidden={h}, p={self.p:g}, k={self.k}, delta={self.delta:g}, "
                f"init={self.init}")


class UnitRows(nn.Module):
    """Divides each unit's current by the length of its weight row: the current of unit-length
    rows. Sits at the head's input, so the cached body output stays the raw current."""

    def __init__(self, layer: KrotovLayer):
        super().__init__()
        self._layer = [layer]  # a list, so the layer is not registered twice

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        return currents / self._layer[0].row_norms()


class UnitNorm(nn.Module):
    """x / |x| over the last dimension (inputs of norm zero stay zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
