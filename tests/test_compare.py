"""`bioexp compare`: finding runs, the per-run and grouped tables, their files and the figure."""

from __future__ import annotations

import csv
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, bioexp_command, output_of

from bioexp.compare import (
    Table,
    find_runs,
    run_table,
    runs_table,
    short_headers,
    sort_table,
    text_table,
    varying_overrides,
)
from bioexp.records import read_json, write_json


def fake_run(folder: Path, overrides: list[str], config: dict | None = None, **summary) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if summary:
        write_json(folder / "summary.json", summary)


def test_runs_table_shows_what_varies_and_keeps_every_status(tmp_path: Path) -> None:
    fake_run(tmp_path / "0_a", ["model=semihebb", "model.sparsity=10"], status="completed",
             test_acc=0.81234, best_test_acc=0.82, wall_time_s=65.43)
    fake_run(tmp_path / "10_a", ["model=semihebb", "model.sparsity=90"], status="diverged")
    fake_run(tmp_path / "2_a", ["model=semihebb", "model.sparsity=50"], status="running")
    fake_run(tmp_path / "3_a", ["model=semihebb", "model.sparsity=60"], config={"seed": 0})
    (tmp_path / "not_a_run").mkdir()
    runs = find_runs(tmp_path)
    assert [r.path.name for r in runs] == ["0_a", "2_a", "3_a", "10_a"]  # natural order
    assert varying_overrides(runs) == [{"model.sparsity": v} for v in ("10", "50", "60", "90")]
    lines = runs_table(runs).splitlines()
    assert "model.sparsity" in lines[0] and "model=" not in lines[0]  # shared keys are dropped
    assert len(lines) == 2 + 4
    assert "| 0.8123 " in lines[2] and "| 65.4 " in lines[2]
    assert "running" in lines[3] and "no summary" in lines[4] and "diverged" in lines[5]


def test_the_printed_table_fits_100_columns_and_cuts_only_text(tmp_path: Path) -> None:
    for i in range(3):
        fake_run(tmp_path / f"{i}_a_very_long_run_folder_name_that_goes_on_and_on",
                 [f"schedule.unsupervised.lr={0.1 * (i + 1)!r}", f"model.k={i + 2}",
                  f"model.delta={0.3 + i / 7!r}", f"model.p={i + 2}.0", f"seed={i}"],
                 status="completed", test_acc=0.8 + i / 100, best_test_acc=0.81 + i / 100,
                 val_acc=0.79, wall_time_s=1234.5,
                 phases=[{"name": "unsupervised", "samples_per_s": 123456.7,
                          "peak_rss_mb": 1500.2},
                         {"name": "supervised", "samples_per_s": 45678.9,
                          "peak_rss_mb": 1700.9}])
    table = run_table(find_runs(tmp_path))
    text = text_table(table).splitlines()
    assert max(len(line) for line in text) <= 100, "\n".join(text)
    header = text[0].split()
    assert header[:6] == ["run", "delta", "k", "p", "lr", "seed"]  # short, still unique
    assert "0.8200" in text[-1] and "123k" in text[2] and "45.7k" in text[2] and "1701" in text[2]
    assert "…" in text[2]  # the run name was cut, no number was
    assert short_headers(["schedule.supervised.lr", "schedule.unsupervised.lr"]) == [
        "supervised.lr", "unsupervised.lr"]
    by_lr = sort_table(table, "lr").column("run")  # a short name sorts too
    assert [name[0] for name in by_lr] == ["2", "1", "0"]
    with pytest.raises(ValueError, match="no column 'nope'"):
        sort_table(table, "nope")


def test_compare_sorts_with_empty_cells_last() -> None:
    table = Table(["run", "final"], [["a", 0.5], ["b", None], ["c", 0.9], ["d", "x"]])
    assert sort_table(table, "final").column("run") == ["c", "a", "d", "b"]


def test_a_real_multirun_grouped_by_model(bioexp, tmp_path: Path) -> None:
    """Two models times two seeds, then `compare --by model` with every output file."""
    sweep = tmp_path / "sweep"
    result = bioexp("train", "-m", "model=bp_mlp,fa_mlp", "seed=0,1", *TINY,
                    f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, output_of(result)
    summaries = [read_json(p) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    for s in summaries:  # the efficiency record of every phase
        (phase,) = s["phases"]
        assert phase["samples_per_s"] > 0 and phase["peak_rss_mb"] > 10
        assert phase["rss_scope"] in ("phase", "process")
    out = tmp_path / "out"
    out.mkdir()
    compared = bioexp("compare", str(sweep), "--by", "model", "--md", str(out / "t.md"),
                      "--csv", str(out / "t.csv"), "--plot", str(out / "t.png"))
    assert compared.returncode == 0, output_of(compared)
    lines = compared.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "test_acc", "mean", "std"]
    assert len(lines) == 2 + 2 and all(len(line) <= 100 for line in lines)
    with open(out / "t.csv") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    for model in ("bp_mlp", "fa_mlp"):
        accs = [s["test_acc"] for s in summaries if s["model"] == model]
        assert float(rows[model]["test_acc mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(rows[model]["std"]) == pytest.approx(statistics.stdev(accs))
        assert rows[model]["n"] == "2" and rows[model]["statuses"] == "2 completed"
        assert float(rows[model]["sup/s"]) > 0 and float(rows[model]["rss MB"]) > 10
    md = (out / "t.md").read_text().splitlines()
    assert md[0].startswith("| model") and len(md) == 4
    assert (out / "t.png").stat().st_size > 10_000
    per_run = bioexp("compare", str(sweep))
    assert per_run.returncode == 0 and per_run.stdout.count("completed") == 4


def test_failed_and_interrupted_runs_keep_their_rows(bioexp, tmp_path: Path) -> None:
    """One run fails (a bad hyperparameter), one is stopped by SIGTERM mid-training."""
    runs = tmp_path / "runs"
    failed = bioexp("train", "model=krotov_fc", "model.k=5000", *TINY,
                    f"hydra.run.dir={runs / 'failed'}")
    assert failed.returncode != 0
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    job = subprocess.Popen([*bioexp_command(), "train", *TINY, "schedule.supervised.epochs=500",
                            f"hydra.run.dir={runs / 'stopped'}"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = runs / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) != 0
    result = bioexp("compare", str(runs), "--csv", str(tmp_path / "t.csv"))
    assert result.returncode == 0, output_of(result)
    with open(tmp_path / "t.csv") as f:
        statuses = {row["run"]: row["status"] for row in csv.DictReader(f)}
    assert statuses == {"failed": "failed", "stopped": "interrupted"}
    grouped = bioexp("compare", str(runs), "--by", "model", "--plot", str(tmp_path / "p.png"))
    assert grouped.returncode == 0, output_of(grouped)
    assert "1 failed" in grouped.stdout and "1 interrupted" in grouped.stdout
    assert (tmp_path / "p.png").exists()  # groups without a completed run are drawn too


def test_compare_says_when_there_is_nothing_to_compare(bioexp, tmp_path: Path) -> None:
    missing = bioexp("compare", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = bioexp("compare", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no runs" in empty.stderr
    fake_run(tmp_path / "one", ["seed=0"], status="completed", test_acc=0.5)
    bad_sort = bioexp("compare", str(tmp_path / "one"), "--sort", "nope")
    assert bad_sort.returncode == 2 and "--sort: no column 'nope'" in bad_sort.stderr
    bad_plot = bioexp("compare", str(tmp_path / "one"), "--plot", str(tmp_path / "p.xyz"))
    assert bad_plot.returncode == 2 and "cannot write" in bad_plot.stderr
    unwritable = bioexp("compare", str(tmp_path / "one"), "--csv", str(tmp_path / "no" / "t.csv"))
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
    assert "Traceback" not in "".join(r.stderr for r in (missing, empty, bad_sort, bad_plot,
                                                         unwritable))
