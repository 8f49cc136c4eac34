"""Krotov & Hopfield's competing hidden units (2019, PNAS 116(16):7723, "Unsupervised learning by
competing hidden units"): a local, label-free rule for a wide hidden layer.

Shapes: V (B, D) a minibatch, W (H, D) the weights. For every sample the hidden unit with the
largest current is pushed towards the sample (g = 1) and the unit ranked k-th is pushed away
(g = -delta); everything else stays (g = 0):

    I  = (sign(W) * |W|^(p-1)) V^T                   currents, (H, B)
    dS = g V - diag(sum_b g * I) W                    (H, D)
    W <- W + eps * dS / max|dS|                       (the caller applies this step)

`krotov_rows` computes dS exactly but in about the time of one (B, D) x (D, H) product: top-k
over the hidden units instead of a sort, `index_add_` of the samples into the rows of the chosen
units instead of a dense (H, B) matrix of g, only those rows of dS (all others are zero), and
no power at all when p = 2. `krotov_update_dense` is the straightforward formula, kept as the
reference for tests and benchmarks.

`krotov_full` is the same dS with fixed shapes, for CUDA: it never waits for the host (no
`unique`, no `.item()`, no branch on a tensor's value), so a whole epoch of it can be captured in a
CUDA graph. The two chosen units' samples are scattered straight into the (H, D) rows of dS,

    dS = zeros(H, D);  dS[win_b] += v_b;  dS[lose_b] -= delta v_b            (index_add_)
    d  = zeros(H);     d[win_b]  += I_b,win;  d[lose_b] -= delta I_b,lose     (sum_b g * I)
    dS = dS - d W                                                            (rows never chosen: 0)

which costs two O(H D) passes more than gathering the chosen rows, and for k = 2 the two largest
currents come from two max passes (the second over the currents with the winner masked to -inf)
instead of a general top-k (`two_max`). On the CPU the row gather (`krotov_rows`) stays for
batches smaller than the layer, where it wins: at batch 100 it touches at most 200 of 2000 rows.
"""

from __future__ import annotations

import torch

# Bump when the rule's arithmetic changes: it is part of the phase-1 cache key.
RULE_VERSION = 1


def powered(w: torch.Tensor, p: float) -> torch.Tensor:
    """sign(W) * |W|^(p-1): W itself when p = 2, W |W| when p = 3 (no power computed)."""
    if p == 2:
        return w
    if p == 3:
        return w * w.abs()
    return torch.sign(w) * w.abs().pow(p - 1)


def krotov_rows(v: torch.Tensor, w: torch.Tensor, p: float, k: int, delta: float,
                currents: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(rows, dS[rows], winners) for minibatch `v` (B, D) and weights `w` (H, D).

    Only the units that won or came k-th for some sample have g != 0 anywhere, and every other
    row of dS is zero, so dS is computed for those rows alone (at most 2B of them): O(B D) work
    instead of O(H D) for small batches. `rows` is None when every unit is involved (then dS
    is the whole matrix, in unit order). `currents`, when the caller has them, is
    I^T = v (sign(W) |W|^(p-1))^T, (B, H); `winners` (B,) is each sample's winning unit.
    Nothing is mutated.
    """
    if currents is None:
        currents = v @ powered(w, p).T  # (B, H): I transposed, so top-k runs along rows
    top = currents.topk(k, dim=1)  # values and indices (B, k), ranks 1..k
    winner, loser = top.indices[:, 0], top.indices[:, k - 1]
    rows, slots = torch.cat([winner, loser]).unique(return_inverse=True)
    win_slot, lose_slot = slots[: len(winner)], slots[len(winner):]
    ds = torch.zeros(len(rows), w.shape[1], dtype=w.dtype, device=w.device)
    ds.index_add_(0, win_slot, v).index_add_(0, lose_slot, v, alpha=-delta)  # g V
    drive = torch.zeros(len(rows), dtype=w.dtype, device=w.device)  # sum_b g * I, per unit
    drive.index_add_(0, win_slot, top.values[:, 0])
    drive.index_add_(0, lose_slot, top.values[:, k - 1], alpha=-delta)
    if len(rows) == w.shape[0]:  # every unit: skip gathering and scattering W's rows
        return None, torch.addcmul(ds, drive[:, None], w, value=-1), winner
    return rows, torch.addcmul(ds, drive[:, None], w[rows], value=-1), winner


def ranked(currents: torch.Tensor, k: int, two_max: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(winner's current, winner, k-th current, k-th unit), each (B,), of currents (B, H).

    `two_max` with k = 2: a max pass, then a max pass over the currents with each sample's
    winner set to -inf, instead of `topk`. Same values; on exact ties the lower unit wins."""
    if two_max and k == 2:
        first = currents.max(dim=1)
        masked = currents.scatter(1, first.indices[:, None], float("-inf"))
        second = masked.max(dim=1)
        return first.values, first.indices, second.values, second.indices
    top = currents.topk(k, dim=1)  # values and indices (B, k), ranks 1..k
    return top.values[:, 0], top.indices[:, 0], top.values[:, k - 1], top.indices[:, k - 1]


def krotov_full(v: torch.Tensor, w: torch.Tensor, p: float, k: int, delta: float,
                currents: torch.Tensor | None = None, two_max: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dS (H, D), winners (B,)) with fixed shapes and no host sync; see the module's notes.
    Equal to `krotov_update` (on the CPU bit for bit, with `two_max` off and no ties)."""
    if currents is None:
        currents = v @ powered(w, p).T  # (B, H)
    win_value, winner, lose_value, loser = ranked(currents, k, two_max)
    ds = torch.zeros_like(w)
    ds.index_add_(0, winner, v).index_add_(0, loser, v, alpha=-delta)  # g V, straight into H rows
    drive = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)  # sum_b g * I, per unit
    drive.index_add_(0, winner, win_value).index_add_(0, loser, lose_value, alpha=-delta)
    return torch.addcmul(ds, drive[:, None], w, value=-1), winner


def krotov_update(v: torch.Tensor, w: torch.Tensor, p: float, k: int, delta: float,
                  currents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dS, winners), with dS the full (H, D) matrix; see `krotov_rows`."""
    rows, ds_rows, winners = krotov_rows(v, w, p, k, delta, currents)
    if rows is None:
        return ds_rows, winners
    return torch.zeros_like(w).index_copy_(0, rows, ds_rows), winners


def krotov_update_dense(v: torch.Tensor, w: torch.Tensor, p: float, k: int,
                        delta: float) -> torch.Tensor:
    """The same dS by the formula as written: a full sort and a dense (H, B) matrix g."""
    currents = powered(w, p) @ v.T  # (H, B)
    order = currents.argsort(dim=0)  # ascending: the last row is the winner
    batch = torch.arange(v.shape[0], device=v.device)
    g = torch.zeros_like(currents)
    g[order[-1], batch] = 1.0
    g[order[-k], batch] = -delta
    return g @ v - (g * currents).sum(dim=1, keepdim=True) * w


def normalized_step(ds: torch.Tensor, eps: float | torch.Tensor,
                    precision: float = 1e-30) -> torch.Tensor:
    """eps * dS / max|dS|, the maximum floored at `precision` (zero rows do not change it).

    `eps` may be a 0-d tensor on dS's device (a CUDA graph replays with a rate it holds there);
    either way the scale is (1 / max|dS|) * eps, which is what `float / tensor` computes, so a
    float and a float32 tensor of the same rate give the same step bit for bit."""
    largest = torch.linalg.vector_norm(ds, ord=float("inf"))
    return ds * (largest.clamp_min(precision).reciprocal() * eps)
