"""`bioexp compare`: finding runs, the per-run and grouped tables, their files and the figure."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, bioexp_command, output_of

from bioexp.compare import (
    ACCURACY_COLUMNS,
    Run,
    Table,
    find_runs,
    group_table,
    mixed_groups,
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
    """One run failed (its folder as `bioexp train` leaves it), one is stopped by SIGTERM
    mid-training."""
    runs = tmp_path / "runs"
    fake_run(runs / "failed", ["model=krotov_fc"], {"model": {"name": "krotov_fc"}},
             status="failed", error="RuntimeError: boom")
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


MODELS = ("krotov_biocell_fa", "krotov_biocell_fc", "krotov_fc", "krotov_fa", "bp_mlp")


def mixed_runs(root: Path) -> None:
    """A ten-job sweep and three single runs in one folder; model names share long prefixes."""
    for i, model in enumerate(MODELS * 2):
        fake_run(root / "multirun/2026-11-28/10-00-00" / f"{i}_{model}_mnist",
                 [f"model={model}", f"seed={i // 5}",
                  f"schedule.unsupervised.lr_schedule={('cosine', 'linear')[i % 2]}"],
                 {"model": {"name": model}, "seed": i // 5}, status="completed",
                 test_acc=0.8 + i / 100)
    for i, model in enumerate(MODELS[:3]):
        fake_run(root / f"2026-11-30/1{i}-00-00_{model}_mnist", [f"model={model}"],
                 {"model": {"name": model}}, status="completed", test_acc=0.7)


def columns_of(text: str) -> dict[str, list[str]]:
    """A printed table's cells by header, read at the positions of its line of dashes."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[at])]
    return {lines[at - 1][a:b].strip(): [row[a:b].strip() for row in lines[at + 1:]]
            for a, b in spans}


def test_a_mixed_folder_fits_the_width_without_making_values_alike(tmp_path: Path) -> None:
    mixed_runs(tmp_path)
    table = run_table(find_runs(tmp_path))
    models, schedules = table.column("model"), table.column("schedule.unsupervised.lr_schedule")
    whole = text_table(table, 200)
    assert max(map(len, whole.splitlines())) == 111 and "…" not in whole
    for width in (100, 90, 80):
        text = text_table(table, width)
        assert max(map(len, text.splitlines())) == width, text
        cells = columns_of(text)
        assert len(set(cells["run"])) == 13 and len(set(cells["model"])) == len(MODELS), text
    at_90 = columns_of(text_table(table, 90))  # the run column gives way first
    assert at_90["model"] == models and at_90["lr_schedule"] == schedules
    assert at_90["run"][2:4] == ["2026-11-30/12-00-00_krotov_fc_mn…",
                                 "multirun/2026-11-28/10-00-00/0_k…"]
    at_80 = columns_of(text_table(table, 80))  # then model names, keeping them distinct
    assert at_80["model"][:5] == ["krotov_bioc…a", "krotov_bioc…c", "krotov_fc", "krotov_bioc…a",
                                  "krotov_bioc…c"]
    assert at_80["run"][:4] == ["2…0_krotov_biocell_fa_mnist", "2…0_krotov_biocell_fc_mnist",
                                "2…/12-00-00_krotov_fc_mnist", "m…0_krotov_biocell_fa_mnist"]
    narrow = text_table(table, 40)  # cannot fit: wider than asked rather than ambiguous,
    cells = columns_of(narrow)  # and names are not cut for nothing
    assert max(map(len, narrow.splitlines())) == 84
    assert cells["model"] == models and cells["lr_schedule"] == schedules
    assert cells["run"] == at_80["run"]


def test_the_table_fits_the_terminal_unless_told_a_width(bioexp, tmp_path: Path) -> None:
    mixed_runs(tmp_path / "runs")
    for columns, width in (("80", 80), ("", 100)):  # "": not a terminal, 100 columns
        result = bioexp("compare", str(tmp_path / "runs"), env={"COLUMNS": columns})
        assert result.returncode == 0, output_of(result)
        assert max(map(len, result.stdout.splitlines())) == width, result.stdout
    told = bioexp("compare", str(tmp_path / "runs"), "--width", "200", env={"COLUMNS": "80"})
    assert max(map(len, told.stdout.splitlines())) == 111 and "…" not in told.stdout


def test_both_spellings_of_an_accuracy_sort_alike(bioexp, tmp_path: Path) -> None:
    for i, (model, test, val) in enumerate([("a", 0.7, 0.9), ("a", 0.9, 0.7), ("b", 0.85, 0.75)]):
        fake_run(tmp_path / f"{i}_run", [f"model={model}", f"seed={i}"], {"model": {"name": model}},
                 status="completed", test_acc=test, best_test_acc=test, val_acc=val)
    runs = find_runs(tmp_path)
    table = run_table(runs)
    assert sort_table(table, "test_acc").column("run") == ["1_run", "2_run", "0_run"]
    assert sort_table(table, "val_acc").column("run") == ["0_run", "2_run", "1_run"]
    for name, field in ACCURACY_COLUMNS.items():
        assert sort_table(table, field).rows == sort_table(table, name).rows
    grouped = group_table(runs, ["model"], "val_acc")
    for name in ("val", "val_acc", "val_acc mean"):  # the grouped table's mean
        assert sort_table(grouped, name).column("model") == ["a", "b"]
    outputs = {bioexp("compare", str(tmp_path), "--by", "model", "--metric", metric, "--sort",
                      sort).stdout for metric in ("best", "best_test_acc")
               for sort in ("best", "best_test_acc")}
    (output,) = outputs
    assert [line.split()[0] for line in output.splitlines()] == ["model", "-----", "b", "a"]
    assert output.splitlines()[0].split()[:3] == ["model", "best_test_acc", "mean"]
    bad = bioexp("compare", str(tmp_path), "--sort", "vall")
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "bioexp: error: --sort: no column 'vall'; columns: run, model, data, schedule, seed, "
        "status, final, best, val, time s, rss MB"]


def test_unknown_keys_fail_and_groups_that_mix_settings_warn(bioexp, tmp_path: Path) -> None:
    def run(name: str, model: str, limit: int, epochs: int, status: str = "completed",
            **top) -> None:
        config = {"model": {"name": model}, "data": {"name": "synthetic", "train_limit": limit},
                  "schedule": {"supervised": {"epochs": epochs, "lr": 0.1}}, **top}
        fake_run(tmp_path / name, [f"model={model}"], config, status=status, test_acc=0.5)

    run("0_bp", "bp_mlp", 100, 2, seed=0, progress=True)
    run("1_bp", "bp_mlp", 200, 3, seed=1, progress=False)
    run("2_fa", "fa_mlp", 100, 2, seed=0, threads=None)
    run("3_fa", "fa_mlp", 100, 2, seed=1, threads=4)  # seeds and threads change no result
    run("4_fa", "fa_mlp", 500, 9, status="failed")  # nor do runs that did not complete count
    grouped = bioexp("compare", str(tmp_path), "--by", "model")
    assert grouped.returncode == 0, output_of(grouped)
    assert grouped.stderr.splitlines() == [
        "warning: group model=bp_mlp mixes runs that differ in data.train_limit, "
        "schedule.supervised.epochs"]
    assert [line.split()[0] for line in grouped.stdout.splitlines()] == [
        "model", "------", "bp_mlp", "fa_mlp"]
    by_both = bioexp("compare", str(tmp_path), "--by", "model,data.train_limit")
    assert by_both.returncode == 0 and by_both.stderr == ""  # one run per group
    for args, line in [
        (("--by", "bogus.key"), "--by bogus.key: no run has this key (the runs have data, model,"
                                " schedule, test_acc, data.name, data.train_limit, ...)"),
        (("--by", "model,epochs"), "--by epochs: no run has this key (did you mean "
                                   "schedule.supervised.epochs?)"),
        (("--metric", "test_accc"), "--metric test_accc: no run has this key (did you mean "
                                    "test_acc?)"),
    ]:
        result = bioexp("compare", str(tmp_path), *args)
        assert result.returncode == 2 and result.stdout == "", output_of(result)
        assert result.stderr.splitlines() == [f"bioexp: error: {line}"]


def test_a_warning_names_a_handful_of_keys() -> None:
    runs = []
    for i in range(2):
        config = {f"model.k{j}": i for j in range(7)} | {"model.name": "m", "seed": i}
        runs.append(Run(Path(str(i)), {"status": "completed"}, (), config))
    assert mixed_groups(runs, ["model"]) == [
        "group model=m mixes runs that differ in model.k0, model.k1, model.k2, model.k3, "
        "model.k4 and 2 more"]
    assert mixed_groups(runs, ["model.k0"]) == []  # one run per group


CONTROL_SCORES = {("krotov_fc", None): [0.875, 0.875],
                  ("krotov_fc", "random_features"): [0.83, 0.83],
                  ("krotov_fc", "gaussian_features"): [0.855, 0.855],
                  ("semihebb", None): [0.80, 0.80], ("semihebb", "random_features"): [0.83, 0.82],
                  ("softhebb_cnn", None): [0.904, 0.904],
                  ("softhebb_cnn", "random_features"): [0.901, 0.903],
                  ("bp_mlp", None): [0.9, 0.9]}


def write_control_runs(root: Path, scores: dict = CONTROL_SCORES) -> None:
    """Finished run folders (config, summary) of models and their controls, one per score."""
    for (model, control), values in scores.items():
        for seed, acc in enumerate(values):
            folder = root / f"{model}_{control}_{seed}"
            (folder / ".hydra").mkdir(parents=True)
            (folder / ".hydra" / "config.yaml").write_text(
                f"model:\n  name: {model}\ncontrol: {control or 'null'}\nseed: {seed}\n")
            (folder / "summary.json").write_text(json.dumps({
                "status": "completed", "model": model, "control": control, "test_acc": acc,
                "parameters": {"trainable": 1234, "other": 0}, "wall_time_s": 10.0}))


def test_grouping_by_model_keeps_controls_apart_and_scores_against_the_stronger(tmp_path):
    from bioexp.compare import find_runs, group_table, with_control

    write_control_runs(tmp_path)
    runs = find_runs(tmp_path)
    by = with_control(runs, ["model"])
    assert by == ["model", "control"]
    table = group_table(runs, by)
    rows = {(row[0], row[1]): dict(zip(table.header, row, strict=True)) for row in table.rows}
    trained = rows[("krotov_fc", "-")]
    assert trained["n"] == 2 and trained["vs control"] == pytest.approx(0.875 - 0.855)
    assert rows[("krotov_fc", "random_features")]["vs control"] is None
    assert rows[("bp_mlp", "-")]["vs control"] is None  # no control to beat
    assert trained["params"] == 1234
    assert with_control([r for r in runs if r.value("control") is None], ["model"]) == ["model"]


def test_benchmark_report_states_which_families_beat_their_controls(tmp_path):
    write_control_runs(tmp_path / "runs")
    script = Path(__file__).parent.parent / "scripts" / "benchmark_report.py"
    out = tmp_path / "docs" / "benchmark.md"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), "--out",
                             str(out), "--plot", str(tmp_path / "docs" / "bench.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert "`krotov_fc` beats its stronger control, `gaussian_features` (+2.00 points" in page
    assert "`semihebb` does not beat its stronger control, `random_features` (-2.50" in page
    assert re.search(r"\| semihebb +\| random_features +\| 0\.8250 ", page)
    assert re.search(r"\| krotov_fc +\| - +\| 0\.8750 ", page)  # a trained row: no control
    assert "test accuracy on the whole test set" in page  # no data.test_limit in these runs
    assert "`softhebb_cnn` is within twice the seeds' spread of its stronger control" in page
    assert (tmp_path / "docs" / "bench.png").stat().st_size > 0


def test_a_group_mean_counts_only_completed_runs(tmp_path: Path) -> None:
    """Failed, diverged and interrupted runs that still carry a test accuracy (and costs) keep
    their rows and are counted in `statuses`, never in a group's mean, std, n or costs."""
    done = {"0_done": 0.80, "1_done": 0.90}
    others = {"2_failed": ("failed", 0.10), "3_diverged": ("diverged", 0.05),
              "4_interrupted": ("interrupted", 0.30)}
    config = {"model": {"name": "bp_mlp"}}
    for name, acc in done.items():
        fake_run(tmp_path / name, ["model=bp_mlp", f"seed={name[0]}"], config, status="completed",
                 test_acc=acc, wall_time_s=10.0)
    for name, (status, acc) in others.items():
        fake_run(tmp_path / name, ["model=bp_mlp", f"seed={name[0]}"], config, status=status,
                 test_acc=acc, wall_time_s=1000.0)
    fake_run(tmp_path / "5_failed", ["model=fa_mlp", "seed=0"], {"model": {"name": "fa_mlp"}},
             status="failed", test_acc=0.5)  # a group with no completed run at all
    runs = find_runs(tmp_path)
    table = group_table(runs, ["model"])
    rows = {row[0]: dict(zip(table.header, row, strict=True)) for row in table.rows}
    bp = rows["bp_mlp"]
    assert bp["n"] == 2, bp
    assert bp["test_acc mean"] == pytest.approx(0.85), bp
    assert bp["std"] == pytest.approx(statistics.stdev(done.values())), bp
    assert bp["time s"] == pytest.approx(10.0), bp  # costs: completed runs only, too
    assert bp["statuses"] == "2 completed, 1 diverged, 1 failed, 1 interrupted", bp
    fa = rows["fa_mlp"]
    assert fa["n"] == 0 and fa["test_acc mean"] is None and fa["std"] is None, fa
    assert fa["statuses"] == "1 failed", fa
    text = text_table(table)
    assert "0.8500" in text and "0.4300" not in text, text  # 0.43: the mean of all five
    # the per-run table keeps every run's row, with its status
    per_run = run_table(runs)
    assert dict(zip(per_run.column("run"), per_run.column("status"), strict=True)) == {
        **dict.fromkeys(done, "completed"), **{k: v[0] for k, v in others.items()},
        "5_failed": "failed"}
