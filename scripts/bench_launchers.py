"""Wall time of a small multirun: one job after another (Hydra's basic launcher) against the
same jobs in parallel processes (hydra/launcher=parallel, hydra-joblib-launcher).

    python scripts/bench_launchers.py [--jobs 4] [--workers 2] [--repeats 3] [-- OVERRIDES...]

The jobs are `bp_mlp` on Fashion-MNIST, 2 epochs of batch 32, with seeds 0..jobs-1, unless
overrides after `--` say otherwise. Small batches leave a second thread little to do, so two
processes on two cores finish such jobs sooner than one process with two threads; a job that
already keeps every core busy (batch 128 or more) gains little. The sequential jobs use torch's
default thread count; the parallel workers get cores // workers threads each (joblib's rule).
Prints the median wall time of the whole `bioexp train -m` command for each launcher, and every
job's test accuracy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bioexp.compare import find_runs

SMALL_JOB = ["model=bp_mlp", "data=fashion_mnist", "schedule.supervised.batch_size=32",
             "schedule.supervised.epochs=2", "progress=false", "device=cpu"]


def run_multirun(overrides: list[str], sweep_dir: Path) -> tuple[float, list[float]]:
    command = [str(Path(sys.executable).parent / "bioexp"), "train", "-m", *overrides,
               f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return seconds, [run.number("test_acc") for run in find_runs(sweep_dir)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="after --: the jobs' overrides")
    opts = parser.parse_args()
    jobs = [*(opts.overrides or SMALL_JOB), "seed=" + ",".join(map(str, range(opts.jobs)))]
    launchers = {
        "one after another (basic)": [],
        f"parallel, {opts.workers} workers (joblib)": ["hydra/launcher=parallel",
                                                       f"hydra.launcher.n_jobs={opts.workers}"],
    }
    print(f"{opts.jobs} jobs: {' '.join(jobs)}")
    print(f"machine: {os.cpu_count()} cores; median of {opts.repeats} repeats, launchers taking "
          "turns")
    times: dict[str, list[float]] = {name: [] for name in launchers}
    accuracies: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(opts.repeats):
            for i, (name, extra) in enumerate(launchers.items()):
                seconds, accs = run_multirun([*jobs, *extra], Path(tmp) / f"{repeat}_{i}")
                times[name].append(seconds)
                accuracies[name] = accs
    base = statistics.median(times[next(iter(launchers))])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<32} {median:6.1f} s  ({base / median:.2f}x)  test acc "
              + " ".join(f"{a:.4f}" for a in accuracies[name]))


if __name__ == "__main__":
    main()
