"""Hebbian rules for a layer y = f(x W): plain Hebb, Oja's subspace rule, and Gupta's HebbNet rule.

Shapes: x (B, D) the layer's input, W (D, H) its weights, y (B, H) its output. A rule returns the
direction dW (the caller scales it by the learning rate) and never mutates its arguments. Rules
that keep statistics across steps take them as `state` (a dict of tensors the layer stores as
buffers, so they are checkpointed) and return the next state.

- Hebb 1949: dW = x^T y. Without a bound on W it grows without limit.
- Oja 1989 ("Neural networks, principal components, and subspaces", Int. J. Neural Systems 1):
  dW = x^T y - W y^T y, which keeps the columns of W near an orthonormal basis.
- Gupta, Ambikapathi & Ramasamy 2021 ("HebbNet: a simplified Hebbian learning framework to do
  biologically plausible learning", ICASSP): the Hebbian product minus the running mean of the
  earlier products of the same synapse, then only the entries at or above the p-th percentile of
  that update are kept ("gradient sparsity"), over the whole matrix or per hidden unit.
- `gupta_reference`: the form of the Brown CLPS1291 notebooks, lr x^T y minus the mean of the
  earlier *raw* products (not scaled by lr), sparsified with the notebooks' percentile rank. It
  equals `gupta` only at lr = 1; it is there to reproduce the notebooks' figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

State = dict[str, torch.Tensor]
RuleName = Literal["hebb", "oja", "gupta", "gupta_local", "gupta_reference"]


class HebbianRule:
    """`(x, y, w, state) -> (dw, state)`; stateless rules ignore and return an empty state.

    Rules are frozen dataclasses: their fields are their settings, which `repr` shows and the
    phase-1 cache key hashes. A rule with `applies_rate` takes the learning rate as a keyword
    (`lr=`) and returns the step itself, which the layer adds unscaled.
    """

    applies_rate: ClassVar[bool] = False

    def initial_state(self, w: torch.Tensor) -> State:
        return {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                 state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError


@dataclass(frozen=True)
class Hebb(HebbianRule):
    """dW = x^T y, summed over the batch."""

    def __call__(self, x, y, w, state):
        return x.T @ y, state


@dataclass(frozen=True)
class Oja(HebbianRule):
    """Oja's subspace rule: dW = x^T y - W (y^T y), computed as (x - y W^T)^T y.

    The factored form needs two (B x D x H) products instead of a (D x H x H) one: for a
    784 x 2000 layer at batch 128, about a tenth of the multiply-adds.
    """

    def __call__(self, x, y, w, state):
        return (x - y @ w.T).T @ y, state  # (D, B) @ (B, H)


# How `kth_smallest` selects on a GPU: "kthvalue" (radix select) or "topk" (the smallest k, or
# the largest n - k + 1, and the last of them). Both are exact and stay on the device (no host
# round trip); scripts/gpu_check.py measures them on the Gupta shapes.
GPU_SELECT = "kthvalue"


def kth_smallest(values: torch.Tensor, k: int, dim: int | None = None,
                 select: str | None = None) -> torch.Tensor:
    """The k-th smallest entry (1-based) of `values`, overall or along `dim` (kept as size 1).

    On the CPU, NumPy's introselect (`np.partition`) is about eight times faster than
    `torch.kthvalue`, which also tracks indices; on a GPU, `select` (default `GPU_SELECT`)
    chooses `torch.kthvalue` or a `torch.topk`-based threshold, and the result stays a device
    tensor. `scripts/bench_hebbian.py` measures the CPU's options, and `torch.quantile` and
    sampling.
    """
    if values.device.type == "cpu" and select is None:
        array = values.detach().numpy()
        if dim is None:
            return torch.tensor(np.partition(array.ravel(), k - 1)[k - 1])
        picked = np.take(np.partition(array, k - 1, axis=dim), [k - 1], axis=dim)
        return torch.from_numpy(picked)
    if (select or GPU_SELECT) == "topk":
        return topk_threshold(values, k, dim)
    if dim is None:
        return values.flatten().kthvalue(k).values
    return values.kthvalue(k, dim=dim, keepdim=True).values


def topk_threshold(values: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """The k-th smallest entry by `torch.topk`: the last of the k smallest, or of the n - k + 1
    largest, whichever is fewer. Same result as `kth_smallest`."""
    flat = values.flatten() if dim is None else values
    axis = 0 if dim is None else dim
    n = flat.shape[axis]
    if k <= n - k + 1:
        picked = flat.topk(k, dim=axis, largest=False).values  # ascending
        last = picked.narrow(axis, k - 1, 1)
    else:
        picked = flat.topk(n - k + 1, dim=axis, largest=True).values  # descending
        last = picked.narrow(axis, n - k, 1)
    return last.squeeze(0) if dim is None else last


def keep_top(update: torch.Tensor, percentile: float, dim: int | None = None) -> torch.Tensor:
    """Zero the entries of `update` below its `percentile`-th percentile, globally or along `dim`.

    With n entries, the ones ranked floor(n * p / 100) or higher (0-based, ascending) are kept,
    so a fraction of about 1 - p/100 survives (more when values tie at the threshold). The
    threshold is an exact order statistic, found in linear time by `kth_smallest`.
    """
    if percentile <= 0:
        return update
    n = update.numel() if dim is None else update.shape[dim]
    k = math.floor(n * percentile / 100) + 1  # 1-based rank of the smallest kept entry
    if k > n:
        return torch.zeros_like(update)
    threshold = kth_smallest(update, k, dim)
    return torch.where(update < threshold, 0.0, update)


@dataclass(frozen=True)
class Gupta(HebbianRule):
    """HebbNet: dW = sparsify(x^T y - mean of the earlier x^T y), keeping the top (100 - p)%.

    `per_unit=False` takes the percentile over the whole matrix (`gupta`); `per_unit=True` over
    each hidden unit's incoming weights, a column of W (`gupta_local`). On the first step there
    are no earlier products and the threshold is zero.
    """

    sparsity: float
    per_unit: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 100:
            raise ValueError(f"sparsity must be a percentile in [0, 100), got {self.sparsity!r}")

    def initial_state(self, w):
        return {"mean": torch.zeros_like(w), "steps": torch.zeros((), device=w.device)}

    def __call__(self, x, y, w, state):
        product = x.T @ y  # (D, H)
        mean, steps = state["mean"], state["steps"]
        update = keep_top(product - mean, self.sparsity, dim=0 if self.per_unit else None)
        steps = steps + 1
        return update, {"mean": torch.lerp(mean, product, 1 / steps), "steps": steps}


def reference_percentile(update: torch.Tensor, percentile: float) -> torch.Tensor:
    """The notebooks' sparsity: keep the entries at or above the k-th smallest of the n entries,
    k = 1 + round(p / 100 * (n - 1)) (Python's rounding). Against `keep_top`'s rank
    floor(n p / 100) + 1, it can keep one entry more."""
    k = 1 + round(0.01 * float(percentile) * (update.numel() - 1))
    return torch.where(update < kth_smallest(update, k), 0.0, update)


@dataclass(frozen=True)
class GuptaReference(HebbianRule):
    """Gupta's rule as the reference notebooks compute it. At step t, with P = x^T y:

        step = keep(lr * P - (P_1 + ... + P_{t-1}) / (t - 1))     (no mean at t = 1)

    where `keep` is `reference_percentile` over the whole matrix; W <- W + step. The running
    sum is of raw products, so the subtracted mean is not scaled by lr.
    """

    sparsity: float
    applies_rate: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 100:
            raise ValueError(f"sparsity must be a percentile in [0, 100), got {self.sparsity!r}")

    def initial_state(self, w):
        return {"sum": torch.zeros_like(w), "steps": torch.zeros((), device=w.device)}

    def __call__(self, x, y, w, state, lr: float = 1.0):
        product = x.T @ y  # (D, H)
        total, steps = state["sum"], state["steps"]
        step = lr * product
        if steps.device.type != "cpu":  # no host round trip: at t = 1 the sum is zero
            step = step - total / steps.clamp_min(1)
        elif steps.item() > 0:
            step = step - total / steps
        return (reference_percentile(step, self.sparsity),
                {"sum": total + product, "steps": steps + 1})


def make_rule(name: str, sparsity: float = 60.0) -> HebbianRule:
    """The rule called `name` (hebb, oja, gupta, gupta_local, gupta_reference); `sparsity` is
    Gupta's p."""
    rules = {
        "hebb": Hebb,
        "oja": Oja,
        "gupta": lambda: Gupta(sparsity),
        "gupta_local": lambda: Gupta(sparsity, per_unit=True),
        "gupta_reference": lambda: GuptaReference(sparsity),
    }
    if name not in rules:
        raise ValueError(f"unknown Hebbian rule {name!r}; choose one of {', '.join(rules)}")
    return rules[name]()
