"""scripts/benchmark_report.py on the label-scarce track: runs that differ in
`data.labels_per_class` are rows per budget, meet their controls and `bp_mlp` at the same budget,
and the figure is accuracy against labels per class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "benchmark_report.py"
ABSENT = "absent"  # a run made before data.labels_per_class existed: its config lacks the key

# (model, control, labels per class) -> test accuracy per seed. At 10 labels per class krotov_fc
# beats its stronger control and bp_mlp, semihebb does not beat its control; at 100 krotov_fc is
# within the seeds' spread of its control, semihebb beats its own, and bp_mlp beats both.
# Each family's controls score differently at the two budgets, so a `vs control` that mixed the
# budgets would show it.
BUDGET_SCORES = {
    ("krotov_fc", None, 10): [0.70, 0.70, 0.70],
    ("krotov_fc", "random_features", 10): [0.60, 0.60, 0.60],
    ("krotov_fc", "gaussian_features", 10): [0.65, 0.65, 0.65],
    ("semihebb", None, 10): [0.55, 0.55, 0.55],
    ("semihebb", "random_features", 10): [0.60, 0.60, 0.60],
    ("bp_mlp", None, 10): [0.66, 0.66, 0.66],
    ("krotov_fc", None, 100): [0.80, 0.81, 0.82],
    ("krotov_fc", "random_features", 100): [0.79, 0.79, 0.79],
    ("krotov_fc", "gaussian_features", 100): [0.805, 0.805, 0.805],
    ("semihebb", None, 100): [0.78, 0.78, 0.78],
    ("semihebb", "random_features", 100): [0.70, 0.70, 0.70],
    ("bp_mlp", None, 100): [0.85, 0.85, 0.85],
}


def write_budget_runs(root: Path, scores: dict = BUDGET_SCORES) -> None:
    """Finished run folders (config, summary) as write_control_runs in test_compare.py writes
    them, with `data.labels_per_class` (left out of the config for ABSENT)."""
    for (model, control, budget), values in scores.items():
        for seed, acc in enumerate(values):
            folder = root / f"{model}_{control}_{budget}_{seed}"
            (folder / ".hydra").mkdir(parents=True)
            data = "" if budget == ABSENT else (
                f"data:\n  name: fashion_mnist\n  labels_per_class: {budget or 'null'}\n")
            (folder / ".hydra" / "config.yaml").write_text(
                f"model:\n  name: {model}\ncontrol: {control or 'null'}\nseed: {seed}\n{data}")
            (folder / "summary.json").write_text(json.dumps({
                "status": "completed", "model": model, "control": control, "test_acc": acc,
                "parameters": {"trainable": 1234, "other": 0}, "wall_time_s": 10.0}))


def report(tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "docs" / "benchmark.md"
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs"), "--out",
                             str(out), *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out.read_text()


def table_rows(page: str) -> list[list[str]]:
    """The page's table, header first, as lists of stripped cells."""
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in page.splitlines() if line.startswith("| ") and "---" not in line]


def test_a_family_meets_its_controls_and_bp_mlp_at_each_budget(tmp_path: Path) -> None:
    write_budget_runs(tmp_path / "runs")
    page = report(tmp_path, "--plot", str(tmp_path / "docs" / "bench.png"))
    assert "- at 10 labels per class, `krotov_fc` beats its stronger control, " \
           "`gaussian_features` (+5.00 points of mean test accuracy)" in page
    assert "- at 10 labels per class, `semihebb` does not beat its stronger control, " \
           "`random_features` (-5.00 points" in page
    assert "- at 100 labels per class, `krotov_fc` is within twice the seeds' spread of its " \
           "stronger control, `gaussian_features` (+0.50 points" in page
    assert "- at 100 labels per class, `semihebb` beats its stronger control, " \
           "`random_features` (+8.00 points" in page
    assert "- at 10 labels per class, the best local-rule family, `krotov_fc`, beats `bp_mlp` " \
           "(+4.00 points of mean test accuracy" in page
    assert "- no local-rule family beats `bp_mlp` at 100 labels per class: the best, " \
           "`krotov_fc`, is beyond twice the seeds' spread behind it (-4.00 points" in page
    assert "10 and 100 labelled training images per class" in page
    assert "phase 1 (the local rules' unsupervised learning) saw every training image" in page

    header, *rows = table_rows(page)
    assert header[:4] == ["model", "control", "labels/class", "test_acc mean"]
    cells = {tuple(row[:3]): dict(zip(header, row, strict=True)) for row in rows}
    assert len(cells) == len(rows) == len(BUDGET_SCORES)  # no two budgets share a row
    # `vs control` against the controls of the row's own budget only
    assert cells[("krotov_fc", "-", "10")]["vs control"] == "+0.0500"
    assert cells[("krotov_fc", "-", "100")]["vs control"] == "+0.0050"
    assert cells[("semihebb", "-", "10")]["vs control"] == "-0.0500"
    assert cells[("semihebb", "-", "100")]["vs control"] == "+0.0800"
    assert cells[("krotov_fc", "-", "10")]["n"] == "3"
    # by budget, then best first
    assert [(row[2], row[3]) for row in rows] == sorted(
        ((row[2], row[3]) for row in rows), key=lambda r: (int(r[0]), -float(r[1])))

    png = (tmp_path / "docs" / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "![mean test accuracy against labels per class](bench.png)" in page


def test_runs_without_the_key_had_every_label_and_sort_last(tmp_path: Path) -> None:
    scores = {key: value for key, value in BUDGET_SCORES.items() if key[2] == 10}
    scores |= {("krotov_fc", None, ABSENT): [0.88, 0.88], ("krotov_fc", None, None): [0.86, 0.86],
               ("krotov_fc", "random_features", None): [0.84, 0.84],
               ("bp_mlp", None, ABSENT): [0.89, 0.89]}
    write_budget_runs(tmp_path / "runs", scores)
    page = report(tmp_path, "--plot", str(tmp_path / "bench.png"))
    header, *rows = table_rows(page)
    budget = header.index("labels/class")
    assert [row[budget] for row in rows] == ["10"] * 6 + ["all"] * 3
    trained = next(row for row in rows if row[:3] == ["krotov_fc", "-", "all"])
    assert trained[header.index("n")] == "4"  # a null and a missing key are the same budget
    assert trained[header.index("vs control")] == "+0.0300"
    assert "- with every label, `krotov_fc` beats its stronger control" in page
    assert "10 labelled training images per class, and every label (`all`)" in page
    assert "- no local-rule family beats `bp_mlp` with every label" in page
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_one_budget_keeps_the_page_as_it_was(tmp_path: Path) -> None:
    write_budget_runs(tmp_path / "runs", {k: v for k, v in BUDGET_SCORES.items() if k[2] == 100})
    page = report(tmp_path)
    assert "labels/class" not in page and "labels per class" not in page
    assert "Against `bp_mlp`" not in page
    assert "- `semihebb` beats its stronger control, `random_features` (+8.00 points" in page


def test_the_label_curves_figure(tmp_path: Path) -> None:
    from bioexp.plots import plot_label_curves

    curves = {("krotov_fc", None): [(10, 0.7, 0.01), (100, 0.8, 0.02), (None, 0.88, None)],
              ("krotov_fc", "random_features"): [(10, 0.6, 0.0), (None, 0.84, 0.01)],
              ("krotov_fc", "gaussian_features"): [(10, 0.65, 0.0)],
              ("ff_mlp", None): [(10, 0.1, 0.0), (100, 0.1, 0.0)]}  # at chance: axis from 0
    path = plot_label_curves(curves, tmp_path / "curves.png", title="t", chance=0.1)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_budgets_without_any_control(tmp_path: Path) -> None:
    write_budget_runs(tmp_path / "runs", {("m", None, 10): [0.5], ("m", None, None): [0.6]})
    page = report(tmp_path, "--plot", str(tmp_path / "bench.png"))
    header, *rows = table_rows(page)
    assert header[:2] == ["model", "labels/class"] and [row[1] for row in rows] == ["10", "all"]
    assert "- no local-rule family with a control in these runs" in page
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_single_seed_gets_no_verdict(tmp_path):
    """One seed has no spread: the page gives the difference and says it cannot judge it."""
    from test_compare import write_control_runs

    write_control_runs(tmp_path / "runs", {("krotov_fc", None): [0.88],
                                           ("krotov_fc", "gaussian_features"): [0.87]})
    assert ("`krotov_fc` against its stronger control, `gaussian_features`: +1.00 points of "
            "mean test accuracy, from one seed: no verdict") in report(tmp_path)


def test_runs_explained_by_bioexp_explain_get_a_faithfulness_column(tmp_path: Path) -> None:
    scores = {key: value for key, value in BUDGET_SCORES.items() if key[2] == 10}
    write_budget_runs(tmp_path / "runs", scores)
    assert "deletion_auc" not in report(tmp_path)
    for i, folder in enumerate(sorted((tmp_path / "runs").iterdir())):
        (folder / "eval").mkdir()
        (folder / "eval" / "attribution.json").write_text(json.dumps(
            {"deletion_auc": 0.1 + i / 100, "methods": {}}))
    page = report(tmp_path)
    rows = table_rows(page)
    column = rows[0].index("deletion_auc")
    assert all(row[column] for row in rows[1:]), rows
    assert "`deletion_auc`: how faithful" in page
