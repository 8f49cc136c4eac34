"""How long the `bioexp` command takes to start: median wall time of whole commands.

    python scripts/bench_startup.py [--repeats 7]

Each command runs as a fresh process (interpreter start-up included), the commands taking
turns in every repeat so that other load hits them alike. `bioexp list` and `bioexp train
--help` import neither torch nor the models; a tiny run pays for torch, Hydra, the data and
the run folder, which the last two lines split into its training time (metrics.jsonl) and
the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIOEXP = str(Path(sys.executable).parent / "bioexp")
TINY = ["data=synthetic", "data.n_train=256", "data.n_test=128", "schedule.supervised.epochs=1",
        "progress=false", "device=cpu"]
COMMANDS = {
    "bioexp --version": ["--version"],
    "bioexp list": ["list"],
    "bioexp train --help": ["train", "--help"],
    "bioexp list model=krotov_fc": ["list", "model=krotov_fc"],
    "bioexp train (bp_mlp, 256 images, 1 epoch)": ["train", "model=bp_mlp", *TINY],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    training: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        for repeat in range(opts.repeats):
            for name, args in COMMANDS.items():
                run_dir = Path(tmp) / f"run{repeat}"
                extra = [f"hydra.run.dir={run_dir}"] if args[0] == "train" and "--help" not in \
                    args else []
                t0 = time.perf_counter()
                subprocess.run([BIOEXP, *args, *extra], cwd=tmp, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
                if extra:
                    rows = [json.loads(line) for line in
                            (run_dir / "metrics.jsonl").read_text().splitlines()]
                    training.append(sum(r.get("epoch_time_s", 0.0) for r in rows))
                    shutil.rmtree(run_dir)
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"median of {opts.repeats}")
    for name, ts in times.items():
        print(f"{name:45s} {statistics.median(ts):6.2f} s")
    run = statistics.median(times[list(COMMANDS)[-1]])
    print(f"{'  of which training epochs':45s} {statistics.median(training):6.2f} s")
    print(f"{'  of which the rest (imports, data, folder)':45s} "
          f"{run - statistics.median(training):6.2f} s")


if __name__ == "__main__":
    main()
