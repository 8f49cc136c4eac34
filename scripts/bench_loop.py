"""Loop overhead of the engine: one bp_mlp epoch through `engine.supervised_epoch` against a bare
loop of forward, backward and optimiser step over the same pre-loaded, pre-shuffled tensors.

    python scripts/bench_loop.py [--data fashion_mnist] [--device cpu] [--repeats 5]

Prints the median epoch time of each and their ratio (the foundation's target: at most 1.3x).
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from timing import device_label, interleaved_medians

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.data import load_dataset
from bioexp.engine import SupervisedPhase, supervised_epoch
from bioexp.registry import build_model


def bare_epoch(model, optimizer, x, y, batch_size: int) -> None:
    """The floor: contiguous slices of already shuffled tensors, nothing recorded."""
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        loss = model.loss(output, y[start:start + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    data_cfg = OmegaConf.create({"name": opts.data, "root": None, "download": False,
                                 "train_limit": None, "test_limit": None, "val_size": 0, "seed": 0,
                                 "n_train": 20000, "n_test": 1000, "num_classes": 10,
                                 "channels": 1, "image_size": 28, "noise": 0.3})
    data = load_dataset(data_cfg, "unit", device)
    phase = SupervisedPhase(1, opts.batch_size, 1e-3)
    torch.manual_seed(0)
    model = build_model("bp_mlp", data.input_shape, data.num_classes).to(device)
    optimizer = phase.optimizer(model.parameters(), lr=phase.lr)
    generator = torch.Generator().manual_seed(0)

    order = torch.randperm(len(data.train), generator=generator).to(device)
    x, y = data.train.x[order], data.train.y[order]
    runs = {
        "bare loop": lambda: bare_epoch(model, optimizer, x, y, opts.batch_size),
        "engine epoch": lambda: supervised_epoch(model, optimizer, data.train, phase, 0,
                                                 generator, progress=False),
    }
    medians = interleaved_medians(runs, device, opts.repeats)
    bare, engine = medians["bare loop"], medians["engine epoch"]
    print(f"bp_mlp on {opts.data} ({len(y)} images, batch {opts.batch_size}), "
          f"{device_label(device)}, "
          f"median of {opts.repeats}:")
    print(f"  bare loop     {bare:8.3f} s/epoch")
    print(f"  engine epoch  {engine:8.3f} s/epoch")
    print(f"  ratio         {engine / bare:8.3f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
