"""bioexp's GPU check (run it through scripts/gpu_check.sh, which installs the project first).

    python scripts/gpu_check.py [--out DIR] [--train-limit 2000] [--skip tests,models,krotov,
                                 gupta,feedback,loop,steps,seed_hybrid]

On a CUDA machine, in this order, each part under its own time limit so the whole stays under
8 minutes on one H100 or H200 (no internet needed):

1. `pytest -k cuda`: the tests that need CUDA;
2. every registered model for one epoch (phase 1 and phase 2) on a Fashion-MNIST subset, on
   CUDA and on the CPU with the same seed: each CUDA summary must say completed, a CUDA device
   and `cuda_peak_mb`, and its accuracy must be within 1 point of the CPU run's;
3. the Krotov phase (60,000 x 784, 2000 units, batch 3584, p = 2, k = 2): scripts/bench_krotov.py
   on CUDA, eager, as a CUDA graph, and with TF32 (target: at most 3 ms per epoch);
4. Gupta's percentile threshold on the GPU: `torch.kthvalue` against the top-k threshold;
5. scripts/bench_feedback.py and scripts/bench_loop.py on CUDA, and scripts/bench_steps.py for
   the energy-based families (their settling loops against a backprop step);
6. `experiment=seed_hybrid` (all its jobs) with cuda_graphs=true precision=tf32 (target: under
   2 minutes; needs the full Fashion-MNIST).

Writes DIR/gpu_check.json and prints a table headed by the card's name. Exits 1 when a check
failed, 3 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
KROTOV_TARGET_S, SEED_HYBRID_TARGET_S, ACCURACY_POINTS = 0.003, 120.0, 0.01


def shell(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a command; its exit status, seconds and the tail of its output."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return {"ok": rc == 0, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "output": text[-4000:] if isinstance(text, str) else str(text)[-4000:]}


def fashion_root() -> bool:
    from bioexp.data.sources import SOURCES, locate
    return locate(SOURCES["fashion_mnist"], None) is not None


def run_tests() -> dict:
    result = shell([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests"], 240)
    last = result["output"].strip().splitlines()[-1:] or [""]
    return {**result, "summary": last[0]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bioexp.config import config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def one_model(name: str, device: str, data: list[str], folder: Path) -> dict:
    from bioexp.train import run
    overrides = [f"model={name}", f"device={device}", *data, "schedule.unsupervised.epochs=1",
                 "schedule.supervised.epochs=1", "progress=false", "cache=false", "seed=0"]
    t0 = time.perf_counter()
    try:
        summary = run(compose(overrides), folder / f"{name}_{device}")
    except Exception as exc:  # a model that cannot even start is a failed check, not a crash
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    peaks = [p.get("cuda_peak_mb") for p in summary.get("phases", []) if "cuda_peak_mb" in p]
    return {"status": summary.get("status"), "device": summary.get("device"),
            "test_acc": summary.get("test_acc"), "cuda_peak_mb": max(peaks) if peaks else None,
            "seconds": round(time.perf_counter() - t0, 1), "error": summary.get("error")}


def run_models(train_limit: int, folder: Path) -> dict:
    import bioexp.models  # noqa: F401  (registers the built-in models)
    from bioexp.config import group_options
    data = (["data=fashion_mnist", f"data.train_limit={train_limit}", "data.test_limit=1000"]
            if fashion_root() else ["data=synthetic"])
    rows = {}
    for name, _ in group_options("model"):
        cuda, cpu = one_model(name, "cuda", data, folder), one_model(name, "cpu", data, folder)
        ok = (cuda["status"] == "completed" and str(cuda["device"]).startswith("cuda")
              and cuda["cuda_peak_mb"] is not None and cpu["status"] == "completed"
              and abs(cuda["test_acc"] - cpu["test_acc"]) <= ACCURACY_POINTS + 1e-9)
        rows[name] = {"ok": ok, "cuda": cuda, "cpu_test_acc": cpu.get("test_acc"),
                      "cpu_status": cpu["status"]}
    return {"ok": all(r["ok"] for r in rows.values()), "data": data, "models": rows}


def run_krotov(folder: Path) -> dict:
    out = folder / "krotov.json"
    result = shell([sys.executable, "scripts/bench_krotov.py", "--device", "cuda", "--repeats",
                    "20", "--json", str(out)], 240)
    if not out.is_file():
        return {**result, "ok": False}
    figures = json.loads(out.read_text())
    best = min(v for k, v in figures["seconds_per_epoch"].items() if k.startswith("engine"))
    return {"ok": result["ok"] and best <= KROTOV_TARGET_S, "best_engine_s": best,
            "target_s": KROTOV_TARGET_S, **figures}


def run_gupta() -> dict:
    from timing import interleaved_medians

    from bioexp.rules.hebbian import kth_smallest
    device = torch.device("cuda")
    update = torch.randn(784, 2000, device=device)
    k_all, k_unit = 784 * 2000 * 60 // 100 + 1, 784 * 60 // 100 + 1
    fns = {f"{select} {where}": (lambda s=select, d=dim, k=k: kth_smallest(update, k, d, s))
           for select in ("kthvalue", "topk") for where, dim, k in
           (("whole matrix", None, k_all), ("per unit", 0, k_unit))}
    medians = interleaved_medians(fns, device, repeats=21, inner=10)
    equal = all(torch.equal(kth_smallest(update, k, d, "kthvalue"),
                            kth_smallest(update, k, d, "topk"))
                for d, k in ((None, k_all), (0, k_unit)))
    return {"ok": equal, "ms": {k: round(v * 1e3, 4) for k, v in medians.items()}}


def run_seed_hybrid(folder: Path) -> dict:
    if not fashion_root():
        return {"ok": False, "skipped": "Fashion-MNIST is not installed here"}
    sweep = folder / "seed_hybrid"
    result = shell([sys.executable, "-m", "bioexp", "train", "experiment=seed_hybrid",
                    "device=cuda", "cuda_graphs=true", "precision=tf32", "progress=false",
                    f"hydra.sweep.dir={sweep}"], 300,
                   env={"XDG_CACHE_HOME": tempfile.mkdtemp(prefix="bioexp-cache-")})
    jobs = {p.parent.name: json.loads(p.read_text()).get("test_acc")
            for p in sorted(sweep.glob("*/summary.json"))}
    return {**result, "ok": result["ok"] and result["seconds"] <= SEED_HYBRID_TARGET_S,
            "target_s": SEED_HYBRID_TARGET_S, "jobs": jobs}


def table(report: dict) -> str:
    lines = [f"bioexp GPU check on {report['card']} (torch {report['torch']}, CUDA "
             f"{report['cuda']})", f"{'check':<22} {'ok':<5} detail"]
    for part, result in report["parts"].items():
        if part == "models":
            for name, row in result.get("models", {}).items():
                lines.append(f"  model {name:<16} {str(row['ok']):<5} cuda "
                             f"{row['cuda'].get('test_acc')} vs cpu {row['cpu_test_acc']}, "
                             f"{row['cuda'].get('cuda_peak_mb')} MB, "
                             f"{row['cuda'].get('seconds')} s {row['cuda'].get('error') or ''}")
            continue
        detail = {"tests": lambda r: r.get("summary"),
                  "krotov": lambda r: r.get("seconds_per_epoch"),
                  "gupta": lambda r: r.get("ms"),
                  "seed_hybrid": lambda r: r.get("skipped") or f"{r.get('seconds')} s"}.get(
            part, lambda r: f"{r.get('seconds')} s")(result)
        lines.append(f"{part:<22} {str(result.get('ok')):<5} {detail}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"))
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was run", file=sys.stderr)
        return 3
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"tests": run_tests, "models": lambda: run_models(opts.train_limit, folder),
             "krotov": lambda: run_krotov(folder), "gupta": run_gupta,
             "feedback": lambda: shell([sys.executable, "scripts/bench_feedback.py",
                                        "--device", "cuda"], 120),
             "loop": lambda: shell([sys.executable, "scripts/bench_loop.py", "--device", "cuda",
                                    "--data", "fashion_mnist" if fashion_root() else "synthetic"],
                                   120),
             "steps": lambda: shell([sys.executable, "scripts/bench_steps.py", "--device", "cuda",
                                     "--models", "pc_mlp,eqprop_mlp"], 120),
             "seed_hybrid": lambda: run_seed_hybrid(folder)}
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda, "parts": {}}
    t0 = time.perf_counter()
    for name, part in parts.items():
        if name not in opts.skip.split(","):
            report["parts"][name] = part()
            print(f"gpu_check: {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (folder / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    print(f"gpu_check: {report['seconds']} s; {folder / 'gpu_check.json'}")
    return 0 if all(p.get("ok") for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
