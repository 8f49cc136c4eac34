"""Cost of a SoftHebb phase-1 epoch at batch 10 against a plain backprop epoch of the same layers.

    python scripts/bench_softhebb.py [--channels 32,128,512] [--images 2000] [--repeats 3]
                                     [--threads 1] [--layerwise] [--profile]

Phase 1 is the engine's own `unsupervised_epoch` (batch 10, as the authors' code trains
`softhebb_cnn`) over the first `--images` Fashion-MNIST training images, on a fresh copy of the
untrained body each time; with `--layerwise` the three stages run one after another, as
`model.layerwise=true` does. Backprop is one epoch over the same images at the same batch size
through the same body, its SoftHebb weights made trainable parameters, plus the read-out
(dropout, linear), with cross-entropy and Adam, subnormal floats flushed to zero (its best
case on x86). Prints the median seconds of `--repeats` epochs (the two take turns) and those
times scaled to 60,000 images (an extrapolation: the cost per batch is flat), and with
`--profile` the operations that take most of a phase-1 epoch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from bench_steps import as_backprop  # scripts/ is on sys.path when a script runs
from torch import nn

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.data import Split
from bioexp.data.sources import find_or_download, read_arrays
from bioexp.engine.loops import unsupervised_epoch
from bioexp.engine.schedule import UnsupervisedPhase
from bioexp.errors import DataError
from bioexp.registry import build_model

SHAPE, CLASSES, FULL = (1, 28, 28), 10, 60_000


def images(n: int) -> Split:
    """The first `n` Fashion-MNIST training images in [0, 1] (random ones when it is absent)."""
    try:
        train_x, train_y, _, _ = read_arrays("fashion_mnist",
                                             find_or_download("fashion_mnist", None, False))
        x = torch.from_numpy(np.array(train_x[:n])).float().div_(255)
        return Split(x, torch.from_numpy(train_y[:n]))
    except DataError:
        print("Fashion-MNIST not found: random images")
        return Split(torch.rand(n, *SHAPE), torch.randint(0, CLASSES, (n,)))


def phase1_epoch(model: nn.Module, split: Split, batch: int, layerwise: bool) -> Callable[[], None]:
    phase = UnsupervisedPhase(epochs=1, batch_size=batch, lr=0.08, lr_schedule="constant")

    def run() -> None:
        fresh = copy.deepcopy(model)  # the same untrained weights every time
        generator = torch.Generator().manual_seed(1)
        if layerwise:
            for stage in fresh.phase1_stages():
                unsupervised_epoch(stage.forward, split, phase, 0, generator, False,
                                   learners=stage.learners)
        else:
            unsupervised_epoch(fresh.body, split, phase, 0, generator, False)

    return run


def backprop_epoch(model: nn.Module, split: Split, batch: int) -> Callable[[], None]:
    def run() -> None:
        # Subnormal floats slow backprop too (about 1.5 times here): flush them to zero for
        # its epoch, so that it is timed at its best (the rule flushes its own; see soft_wta).
        torch.set_flush_denormal(True)
        try:
            epoch()
        finally:
            torch.set_flush_denormal(False)

    def epoch() -> None:
        net = as_backprop(model).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for x, y in split.batches(batch, generator):
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function; they take turns in every repeat, so that a change in
    the machine's load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(fn: Callable[[], None]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="32,128,512")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--profile", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    channels = [int(c) for c in opts.channels.split(",")]
    torch.manual_seed(0)
    model = build_model("softhebb_cnn", SHAPE, CLASSES, channels=channels,
                        layerwise=opts.layerwise)
    split = images(opts.images)
    print(f"softhebb_cnn channels={channels}, batch {opts.batch}, {len(split)} images, "
          f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, median of "
          f"{opts.repeats}")
    fns = {f"phase 1{' (layerwise)' if opts.layerwise else ''}":
           phase1_epoch(model, split, opts.batch, opts.layerwise),
           "backprop": backprop_epoch(model, split, opts.batch)}
    medians = interleaved_medians(fns, opts.repeats)
    base = medians["backprop"]
    for name, t in medians.items():
        print(f"  {name:<22} {t:8.2f} s per {len(split)} images, {t * FULL / len(split):8.1f} s "
              f"per 60,000 (extrapolated), {t / base:5.2f}x backprop")
    if opts.profile:
        profile(next(iter(fns.values())))


if __name__ == "__main__":
    main()
