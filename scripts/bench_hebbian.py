"""Cost of Gupta's Hebbian update against the rest of a one-phase training step.

    python scripts/bench_hebbian.py [--device cpu|cuda] [--batch 50] [--repeats 9]

A 784 x 2000 Hebbian layer under a linear head, as in the semiHebb issue. It prints the median
time of: the whole `gupta` and `gupta_local` updates; the rest of the step (forward, loss,
backward and Adam step of the head); and the ways of finding the p-th percentile of the
784 x 2000 update: `kth_smallest` (exact; NumPy's introselect on the CPU, `torch.kthvalue` on a
GPU: what bioexp uses), `torch.kthvalue` over the flattened matrix (exact), `torch.quantile`
(exact, sorts), and `kthvalue` over a random sample of 65,536 entries (approximate; it also
prints the fraction of entries that sampling keeps instead of 40%).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from timing import device_label, interleaved_medians
from torch import nn

from bioexp.layers import HebbianLinear
from bioexp.rules.hebbian import Gupta, kth_smallest

D, H, CLASSES, P = 784, 2000, 10, 60.0
SAMPLE = 65_536


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    torch.manual_seed(0)
    x = torch.rand(opts.batch, D, device=device)
    target = torch.randint(CLASSES, (opts.batch,), device=device)
    layers = {name: HebbianLinear(D, H, Gupta(P, per_unit=local), nn.ReLU()).to(device)
              for name, local in (("gupta", False), ("gupta_local", True))}
    head = nn.Linear(H, CLASSES).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    y = layers["gupta"](x)
    update = x.T @ y - layers["gupta"].rule_mean  # (D, H), as the rule thresholds it
    flat = update.flatten()
    k = math.floor(flat.numel() * P / 100) + 1

    def rest_of_step() -> None:
        with torch.no_grad():
            features = layers["gupta"](x)
        loss = F.cross_entropy(head(features), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sampled() -> torch.Tensor:
        sample = flat[torch.randint(flat.numel(), (SAMPLE,), device=device)]
        return sample.kthvalue(math.floor(SAMPLE * P / 100) + 1).values

    fns = {
        "gupta update (whole)": lambda: layers["gupta"].local_update(x, y, 1e-6),
        "gupta_local update (whole)": lambda: layers["gupta_local"].local_update(x, y, 1e-6),
        "rest of the training step": rest_of_step,
        "percentile: kth_smallest (bioexp)": lambda: kth_smallest(update, k),
        "percentile: torch.kthvalue, flattened": lambda: flat.kthvalue(k),
        "percentile: quantile": lambda: torch.quantile(flat, P / 100),
        f"percentile: kthvalue of {SAMPLE} samples": sampled,
        "percentile per unit: kth_smallest (bioexp)": lambda: kth_smallest(
            update, math.floor(D * P / 100) + 1, dim=0),
        "percentile per unit: torch.kthvalue": lambda: update.kthvalue(
            math.floor(D * P / 100) + 1, dim=0),
    }
    medians = interleaved_medians(fns, device, opts.repeats)
    print(f"{D} x {H} Hebbian layer, batch {opts.batch}, p = {P:g}; {device_label(device)}; "
          f"median of {opts.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:42s} {seconds * 1e3:8.2f} ms")
    kept = [(flat >= sampled()).float().mean().item() for _ in range(20)]
    print(f"  sampling keeps {min(kept):.4f} to {max(kept):.4f} of the entries "
          f"(exact: {1 - (k - 1) / flat.numel():.4f})")


if __name__ == "__main__":
    main()
