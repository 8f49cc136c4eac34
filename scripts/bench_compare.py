"""How long `bioexp compare` takes over many run folders (the target: 200 runs in under 2 s).

    python scripts/bench_compare.py [--runs 200] [--repeats 5]

Writes `--runs` run folders shaped like a real multirun's (the composed `.hydra/config.yaml`,
overrides, summary.json with phases, a 15-line metrics.jsonl) into a temporary folder, then
times the real `bioexp` command on them: the per-run table, `--by model`, and `--by model` with
`--plot`. Prints the median wall time of each, start-up of the Python interpreter included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bioexp.config import config_dir
from bioexp.records import write_json

MODELS = ("bp_mlp", "fa_mlp", "krotov_fc", "semihebb")


def make_runs(root: Path, n: int) -> None:
    configs = {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for model in MODELS:
            configs[model] = OmegaConf.to_container(
                compose(config_name="train", overrides=[f"model={model}"]), resolve=True)
    for i in range(n):
        model, seed = MODELS[i % len(MODELS)], i // len(MODELS)
        folder = root / f"{i}_{model}_fashion_mnist"
        (folder / ".hydra").mkdir(parents=True)
        overrides = [f"model={model}", f"seed={seed}"]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({**configs[model], "seed": seed}))
        acc = 0.85 + (i % 7) / 100
        write_json(folder / "summary.json", {
            "status": "completed" if i % 10 else "failed", "model": model, "seed": seed,
            "test_acc": acc, "best_test_acc": acc + 0.002, "wall_time_s": 60.0 + i,
            "phases": [{"name": "supervised", "epochs": 15, "wall_time_s": 55.0,
                        "samples_per_s": 16000.0 + i, "peak_rss_mb": 900.0 + i}]})
        with open(folder / "metrics.jsonl", "w") as f:
            for epoch in range(1, 16):
                f.write(json.dumps({"phase": "supervised", "epoch": epoch,
                                    "test_acc": acc - 0.1 / epoch}) + "\n")


def time_command(args: list[str], repeats: int) -> float:
    command = [str(Path(sys.executable).parent / "bioexp"), *args]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        make_runs(root, opts.runs)
        cases = {
            "bioexp compare DIR": [str(root)],
            "bioexp compare DIR --by model": [str(root), "--by", "model"],
            "bioexp compare DIR --by model --plot": [str(root), "--by", "model", "--plot",
                                                     str(Path(tmp) / "p.png")],
        }
        print(f"{opts.runs} run folders, median of {opts.repeats} runs of the real command:")
        for label, args in cases.items():
            print(f"  {label:<40} {time_command(['compare', *args], opts.repeats):6.2f} s")


if __name__ == "__main__":
    main()
