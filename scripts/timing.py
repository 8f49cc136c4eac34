"""Timing helpers shared by the benchmark scripts: interleaved repeats, medians, device names."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def device_label(device: torch.device) -> str:
    """The GPU's name, or the CPU with its thread count, for benchmark headers."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        inner: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function. The functions take turns within every repeat,
    so drift (thermal, other load) hits all of them alike; CUDA work is synchronised."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}
