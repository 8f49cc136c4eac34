"""Seconds per unsupervised epoch of the Krotov-Hopfield rule: bioexp's layer against the
straightforward formulation and the matmul floor.

    python scripts/bench_krotov.py [--hidden 2000] [--batch 3584] [--p 2] [--k 2]
                                   [--device cpu|cuda] [--repeats 5] [--json FILE]
                                   [--only ROW,ROW]

One epoch is 60,000 inputs of 784 (Fashion-MNIST's training images when the dataset is
installed, uniform noise otherwise) in batches. Rows:

- `bioexp`: what the engine runs on this device, the layer's forward (v W^T) then
  `KrotovLayer.local_update` (one matmul per batch when p = 2): on the CPU the fixed-shape step
  with top-k from a batch as large as the layer, else the row gather; on CUDA the fixed-shape
  step with two max passes (k = 2);
- `row gather`, `fixed top-k`, `fixed two-max`: the layer forced to one step (`krotov_rows`;
  `krotov_full` with top-k; `krotov_full` with two max passes);
- CUDA only: `engine eager`, `engine graph`, `engine graph tf32`, `engine eager tf32`: the
  engine's `unsupervised_epoch` (shuffled batches gathered from the images, as training runs),
  eagerly or replayed as one CUDA graph (`cuda_graphs=true`), in fp32 or TF32;
- `straightforward`: full argsort over the hidden units, a dense (H, B) matrix g and two
  matmuls per batch (`krotov_update_dense`, as the original notebooks);
- `matmul floor` (and on CUDA `matmul floor tf32`): one (B, 784) x (784, H) product per batch
  and nothing else.

Prints a table (median seconds per epoch, ratio to the floor) and the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from timing import device_label, interleaved_medians

from bioexp.data import Split
from bioexp.data.sources import SOURCES, locate, read_arrays
from bioexp.engine.loops import numerics, unsupervised_epoch
from bioexp.engine.schedule import UnsupervisedPhase
from bioexp.layers import KrotovLayer
from bioexp.rules.krotov import krotov_update_dense, normalized_step

N_INPUTS, DIM = 60_000, 784


def inputs(device: torch.device) -> tuple[torch.Tensor, str]:
    files = locate(SOURCES["fashion_mnist"], None)
    if files is None:
        return torch.rand(N_INPUTS, DIM, device=device), "uniform noise"
    images = torch.tensor(read_arrays("fashion_mnist", files)[0])  # a copy: the array is read-only
    return images.reshape(len(images), -1).float().div(255).to(device), "Fashion-MNIST"


def layer_epoch(data: torch.Tensor, batch: int, opts: argparse.Namespace,
                fixed: bool | None = None, two_max: bool | None = None) -> Callable[[], None]:
    """An epoch of the layer over pre-split batches, its step forced to one path when given."""
    torch.manual_seed(0)
    layer = KrotovLayer(DIM, opts.hidden, opts.p, opts.k).to(data.device)
    layer._fixed_shapes, layer._two_max = fixed, two_max
    batches = list(data.split(batch))

    def epoch() -> None:
        with torch.no_grad():
            for v in batches:
                layer.local_update(v, layer(v), 0.02)

    return epoch


def engine_epoch(data: torch.Tensor, opts: argparse.Namespace, graphs: bool,
                 tf32: bool) -> Callable[[], None]:
    """The engine's unsupervised epoch of a Krotov layer, eager or as a CUDA graph."""
    torch.manual_seed(0)
    layer = KrotovLayer(DIM, opts.hidden, opts.p, opts.k).to(data.device)
    split = Split(data, torch.zeros(len(data), dtype=torch.long, device=data.device))
    phase = UnsupervisedPhase(1, opts.batch, 0.02, tf32=tf32, cuda_graphs=graphs)
    generator = torch.Generator().manual_seed(0)
    return lambda: unsupervised_epoch(layer, split, phase, 0, generator, progress=False)


def epochs(data: torch.Tensor, opts: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """Every row's epoch, by name."""
    batches = list(data.split(opts.batch))
    w_dense = KrotovLayer(DIM, opts.hidden, opts.p, opts.k).weight.to(data.device)
    w_floor = w_dense.clone()

    def straightforward_epoch() -> None:
        for v in batches:
            w_dense.add_(normalized_step(krotov_update_dense(v, w_dense, opts.p, opts.k, 0.4),
                                         0.02))

    def floor_epoch(tf32: bool = False) -> None:
        with numerics(data.device, tf32):
            for v in batches:
                v @ w_floor.T

    fns = {"bioexp": layer_epoch(data, opts.batch, opts),
           "row gather": layer_epoch(data, opts.batch, opts, fixed=False),
           "fixed top-k": layer_epoch(data, opts.batch, opts, fixed=True, two_max=False),
           "fixed two-max": layer_epoch(data, opts.batch, opts, fixed=True, two_max=True)}
    if data.device.type == "cuda":
        for name, graphs, tf32 in [("engine eager", False, False), ("engine graph", True, False),
                                   ("engine graph tf32", True, True),
                                   ("engine eager tf32", False, True)]:
            fns[name] = engine_epoch(data, opts, graphs, tf32)
        fns["matmul floor tf32"] = lambda: floor_epoch(True)
    fns.update({"straightforward": straightforward_epoch, "matmul floor": floor_epoch})
    if opts.only:
        fns = {k: v for k, v in fns.items() if k in opts.only.split(",") or k == "matmul floor"}
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=3584)
    parser.add_argument("--p", type=float, default=2.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to time (the matmul floor always)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    torch.manual_seed(0)
    data, origin = inputs(device)
    medians = interleaved_medians(epochs(data, opts), device, opts.repeats)
    floor = medians["matmul floor"]
    where = device_label(device)
    print(f"Krotov epoch: {N_INPUTS} x {DIM} ({origin}), hidden {opts.hidden}, batch "
          f"{opts.batch}, p = {opts.p:g}, k = {opts.k}; {where}; median of {opts.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:18s} {seconds:9.4f} s   {seconds / floor:5.2f}x floor")
    figures = {"device": where, "hidden": opts.hidden, "batch": opts.batch, "p": opts.p,
               "k": opts.k, "inputs": origin, "repeats": opts.repeats,
               "seconds_per_epoch": {k: round(v, 6) for k, v in medians.items()}}
    print(json.dumps(figures))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
