"""Seconds per unsupervised epoch of the Krotov-Hopfield rule: bioexp's layer against the
straightforward formulation and the matmul floor.

    python scripts/bench_krotov.py [--hidden 2000] [--batch 3584] [--p 2] [--k 2]
                                   [--device cpu|cuda] [--repeats 5] [--json FILE]

One epoch is 60,000 inputs of 784 (Fashion-MNIST's training images when the dataset is
installed, uniform noise otherwise) in batches. Rows:

- `bioexp`: what the engine runs, the layer's forward (v W^T) then `KrotovLayer.local_update`
  (top-k, index_add, one matmul per batch when p = 2);
- `straightforward`: full argsort over the hidden units, a dense (H, B) matrix g and two
  matmuls per batch (`krotov_update_dense`, as the original notebooks);
- `matmul floor`: one (B, 784) x (784, H) product per batch and nothing else.

Prints a table (median seconds per epoch, ratio to the floor) and the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import device_label, interleaved_medians

from bioexp.data.sources import SOURCES, locate, read_arrays
from bioexp.layers import KrotovLayer
from bioexp.rules.krotov import krotov_update_dense, normalized_step

N_INPUTS, DIM = 60_000, 784


def inputs(device: torch.device) -> tuple[torch.Tensor, str]:
    files = locate(SOURCES["fashion_mnist"], None)
    if files is None:
        return torch.rand(N_INPUTS, DIM, device=device), "uniform noise"
    images = torch.tensor(read_arrays("fashion_mnist", files)[0])  # a copy: the array is read-only
    return images.reshape(len(images), -1).float().div(255).to(device), "Fashion-MNIST"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=3584)
    parser.add_argument("--p", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    torch.manual_seed(0)
    data, origin = inputs(device)
    batches = list(data.split(opts.batch))
    layer = KrotovLayer(DIM, opts.hidden, opts.p, opts.k).to(device)
    w_dense = layer.weight.clone()
    w_floor = layer.weight.clone()

    def bioexp_epoch() -> None:
        with torch.no_grad():
            for v in batches:
                layer.local_update(v, layer(v), 0.02)

    def straightforward_epoch() -> None:
        for v in batches:
            w_dense.add_(normalized_step(krotov_update_dense(v, w_dense, opts.p, opts.k, 0.4),
                                         0.02))

    def floor_epoch() -> None:
        for v in batches:
            v @ w_floor.T

    fns = {"bioexp": bioexp_epoch, "straightforward": straightforward_epoch,
           "matmul floor": floor_epoch}
    medians = interleaved_medians(fns, device, opts.repeats)
    floor = medians["matmul floor"]
    where = device_label(device)
    print(f"Krotov epoch: {N_INPUTS} x {DIM} ({origin}), hidden {opts.hidden}, batch "
          f"{opts.batch}, p = {opts.p:g}, k = {opts.k}; {where}; median of {opts.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:16s} {seconds:9.4f} s   {seconds / floor:5.2f}x floor")
    figures = {"device": where, "hidden": opts.hidden, "batch": opts.batch, "p": opts.p,
               "k": opts.k, "inputs": origin, "repeats": opts.repeats,
               "seconds_per_epoch": {k: round(v, 5) for k, v in medians.items()}}
    print(json.dumps(figures))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
