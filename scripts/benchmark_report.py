"""The benchmark's leaderboard as a Markdown page, read from its run folders.

    python scripts/benchmark_report.py SWEEP_DIR [SWEEP_DIR ...] --out docs/benchmark.md \
        [--plot docs/benchmark.png] [--command "bioexp train experiment=benchmark"]

One row per model and control (as `bioexp compare --by model` shows them): mean and standard
deviation of the test accuracy over the seeds, the gain over the family's stronger control,
FGSM accuracy at eps 0.1, wall time and trainable parameters. Below the table: the machine and
versions the runs recorded, their total and summed wall time, and, computed from the table, each
local-rule family that does not beat its stronger control. The bar chart is `bioexp compare`'s.
Nothing here is typed in by hand: rerun it on new folders and the page follows.

When the runs differ in `data.labels_per_class` (the label-scarce track; a run without the key
had every label), each label budget is a row of its own (`labels/class`, `all` for every label),
a family meets its controls and `bp_mlp` at the same budget, and the figure is accuracy against
labels per class.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bioexp.compare import (
    find_runs,
    group_table,
    markdown_table,
    mixed_groups,
    with_control,
)

BUDGET = "data.labels_per_class"  # labelled training images per class; None: every label
BUDGET_COLUMN = "labels/class"
EVERY_LABEL = "all"  # the budget column's cell for None
BACKPROP = "bp_mlp"  # what the local-rule families are set against at each budget
CHANCE = 0.1  # Fashion-MNIST's ten classes


def when(run, key: str) -> datetime | None:
    value = run.summary.get(key)
    return datetime.fromisoformat(value) if value else None


def machine_lines(runs) -> list[str]:
    """What the runs recorded about where they ran, and how long they took."""
    env = Counter()
    for run in runs:
        e = run.summary.get("environment") or {}
        env[(e.get("device_name"), run.summary.get("device"), e.get("threads"), e.get("torch"),
             e.get("git"))] += 1
    lines = []
    for (name, device, threads, torch, git), n in env.most_common():
        lines.append(f"- {n} runs on {name} ({device}, {threads} torch thread(s)), torch {torch}, "
                     f"bioexp commit {str(git)[:7]}")
    starts = [t for t in map(lambda r: when(r, "started"), runs) if t]
    ends = [t for t in map(lambda r: when(r, "finished"), runs) if t]
    total = sum(r.number("wall_time_s") or 0.0 for r in runs)
    if starts and ends:
        span = (max(ends) - min(starts)).total_seconds()
        lines.append(f"- first run started {min(starts):%Y-%m-%d %H:%M} UTC, last ended "
                     f"{max(ends):%Y-%m-%d %H:%M} UTC: {span / 3600:.2f} h from start to end; "
                     f"the runs' own wall times add up to {total / 3600:.2f} h")
    return lines


def test_images(runs) -> str:
    """The test images the runs were scored on, as their configs say (`data.test_limit`)."""
    limits = {run.value("data.test_limit") for run in runs}
    if limits == {None}:
        return "the whole test set"
    return " or ".join(f"{n:,} test images" if n is not None else "the whole test set"
                       for n in sorted(limits, key=lambda n: (n is None, n or 0)))


def budget_order(cell: str) -> float:
    """Sort key of a `labels/class` cell: 10, 100, 1000, then all."""
    return math.inf if cell == EVERY_LABEL else float(cell)


def at_budget(cell: str) -> str:
    return "with every label" if cell == EVERY_LABEL else f"at {int(cell):,} labels per class"


def _columns(table) -> tuple[dict[str, int], Callable[[list], str | None]]:
    """Column indices by name, and a row's budget cell (None when the table has no budgets)."""
    col = {name: table.header.index(name) for name in table.header}
    at = col.get(BUDGET_COLUMN)
    return col, (lambda row: row[at] if at is not None else None)


def _spread(*rows: list, std: int) -> float:
    """Twice the seeds' spread of the rows' means: two standard deviations combined."""
    return 2 * math.sqrt(sum((row[std] or 0.0) ** 2 for row in rows))


def verdicts(table) -> list[str]:
    """One sentence per trained local-rule family (and label budget, when the table has them):
    its gain over its stronger control at the same budget, and whether that gain is larger than
    twice the seeds' spread (the two standard deviations combined); a smaller one is no clear
    gain."""
    header = table.header
    if "vs control" not in header:
        return []
    col, budget = _columns(table)
    mean_of = {(row[col["model"]], row[col["control"]], budget(row)): row for row in table.rows}
    lines = []
    for row in sorted(table.rows, key=lambda r: budget_order(budget(r)) if budget(r) else 0):
        gain = row[col["vs control"]]
        if gain is None:
            continue
        model, level = row[col["model"]], budget(row)
        controls = [r for (m, c, b), r in mean_of.items() if m == model and b == level
                    and c != "-" and r[col["test_acc mean"]] is not None]
        rival = max(controls, key=lambda r: r[col["test_acc mean"]])
        spread = _spread(row, rival, std=col["std"])
        points = f"{gain * 100:+.2f} points of mean test accuracy"
        where = f"{at_budget(level)}, " if level is not None else ""
        if min(row[col["n"]], rival[col["n"]]) < 2:
            lines.append(f"- {where}`{model}` against its stronger control, "
                         f"`{rival[col['control']]}`: {points}, from one seed: no verdict "
                         "(the seeds' spread is unknown)")
        elif abs(gain) <= spread:
            lines.append(f"- {where}`{model}` is within twice the seeds' spread of its stronger "
                         f"control, `{rival[col['control']]}` ({points}): no clear gain")
        else:
            word = "beats" if gain > 0 else "does not beat"
            lines.append(f"- {where}`{model}` {word} its stronger control, "
                         f"`{rival[col['control']]}` ({points})")
    return lines


def against_backprop(table) -> list[str]:
    """Per label budget, one sentence: the best trained local-rule family (a model with control
    rows at that budget) against `bp_mlp` at the same budget, the difference of their means and
    whether it exceeds twice the seeds' combined spread."""
    col, budget = _columns(table)
    if "control" not in col or BUDGET_COLUMN not in col:
        return []
    mean, std = col["test_acc mean"], col["std"]
    lines = []
    for level in sorted({budget(row) for row in table.rows}, key=budget_order):
        here = [row for row in table.rows if budget(row) == level and row[mean] is not None]
        controlled = {row[col["model"]] for row in here if row[col["control"]] != "-"}
        local = [row for row in here if row[col["control"]] == "-"
                 and row[col["model"]] in controlled]
        backprop = [row for row in here if row[col["model"]] == BACKPROP
                    and row[col["control"]] == "-"]
        where = at_budget(level)
        if not local or not backprop:
            missing = "local-rule family with a control" if not local else f"`{BACKPROP}` run"
            lines.append(f"- {where}: no {missing} to compare")
            continue
        best, rival = max(local, key=lambda row: row[mean]), backprop[0]
        gain, spread = best[mean] - rival[mean], _spread(best, rival, std=std)
        points = (f"{gain * 100:+.2f} points of mean test accuracy; twice the seeds' combined "
                  f"spread: {spread * 100:.2f} points")
        name = f"`{best[col['model']]}`"
        if min(best[col["n"]], rival[col["n"]]) < 2:
            lines.append(f"- {where}, the best local-rule family, {name}, against `{BACKPROP}`: "
                         f"{gain * 100:+.2f} points of mean test accuracy, from one seed: no "
                         "verdict (the seeds' spread is unknown)")
        elif gain > spread:
            lines.append(f"- {where}, the best local-rule family, {name}, beats `{BACKPROP}` "
                         f"({points})")
        elif gain > 0:
            lines.append(f"- {where}, the best local-rule family, {name}, is within twice the "
                         f"seeds' spread of `{BACKPROP}` ({points}): no clear gain")
        else:
            lines.append(f"- no local-rule family beats `{BACKPROP}` {where}: the best, {name}, "
                         f"is {'beyond' if -gain > spread else 'within'} twice the seeds' spread "
                         f"behind it ({points})")
    return lines


def budget_column(table, by: list[str]) -> None:
    """Name the budget column `labels/class`, write `all` for every label, and sort the rows by
    budget (10, 100, 1000, all), then by mean test accuracy, best first."""
    at = by.index(BUDGET)
    table.header[at] = BUDGET_COLUMN
    for row in table.rows:
        row[at] = EVERY_LABEL if row[at] == "None" else row[at]
    accuracy = table.header.index("test_acc mean")
    table.rows.sort(key=lambda row: (budget_order(row[at]), -(row[accuracy] or 0.0)))


def budget_lines(runs) -> list[str]:
    """What the label budgets are, for the page's introduction."""
    budgets = sorted({run.value(BUDGET) for run in runs}, key=lambda b: (b is None, b or 0))
    numbers = [f"{b:,}" for b in budgets if b is not None]
    listed = ", ".join(numbers[:-1]) + (" and " if len(numbers) > 1 else "") + numbers[-1]
    every = ", and every label (`all`)" if None in budgets else ""
    return [f"Label budgets (`{BUDGET}`, the `{BUDGET_COLUMN}` column): {listed} labelled "
            f"training images per class{every}. At every budget, phase 1 (the local rules' "
            "unsupervised learning) saw every training image, without its label; phase 2 trained "
            "on the labelled images alone (models without local rules have phase 2 only). A "
            f"family meets its controls and `{BACKPROP}` at the same budget."]


def label_curves(table) -> dict[tuple[str, str | None], list[tuple[int | None, float, float]]]:
    """The table's rows as `plot_label_curves` takes them."""
    col, budget = _columns(table)
    curves: dict[tuple[str, str | None], list] = {}
    for row in table.rows:
        if row[col["test_acc mean"]] is None:
            continue
        control = row[col["control"]] if "control" in col else "-"
        level = budget(row)
        curves.setdefault((row[col["model"]], None if control == "-" else control), []).append(
            (None if level == EVERY_LABEL else int(level), row[col["test_acc mean"]],
             row[col["std"]]))
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--command", default="bioexp train experiment=benchmark")
    opts = parser.parse_args()
    runs = [run for folder in opts.folders for run in find_runs(folder)]
    by = with_control(runs, ["model"])
    budgets = len({run.value(BUDGET) for run in runs}) > 1
    if budgets:
        by.append(BUDGET)
    table = group_table(runs, by)
    keep = [i for i, name in enumerate(table.header) if name not in ("unsup/s", "sup/s")]
    table.header[:] = [table.header[i] for i in keep]
    table.rows[:] = [[row[i] for i in keep] for row in table.rows]
    accuracy = table.header.index("test_acc mean")
    if budgets:
        budget_column(table, by)
    else:
        table.rows.sort(key=lambda row: -(row[accuracy] or 0.0))
    statuses = Counter(r.status for r in runs)
    same_budget = " at the same label budget" if budgets else ""
    lines = [
        "# Benchmark: every family and its controls on Fashion-MNIST"
        + (", by labels per class" if budgets else ""),
        "",
        f"Made by `{opts.command}` (then `python scripts/benchmark_report.py`); "
        f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()) + ".",
        *(budget_lines(runs) if budgets else []),
        "Each row: the model's own defaults unless its `conf/bench/<row>.yaml` says otherwise; "
        f"test accuracy on {test_images(runs)}, mean and standard deviation over the seeds "
        "(`n`); `vs control`: the mean minus that of the family's stronger random-feature "
        f"control{same_budget}; `fgsm@0.1`: test accuracy under FGSM at eps 0.1; `time s`: wall "
        "time of one run; `params`: parameters the optimiser trains."
        + (" `deletion_auc`: how faithful the model's Integrated Gradients maps are, the area "
           "under the target's probability as the most attributed pixels are removed (lower is "
           "more faithful; `bioexp explain`, 64 test images)."
           if "deletion_auc" in table.header else ""),
        "",
        markdown_table(table),
        "",
        "Where the runs ran:",
        "",
        *machine_lines(runs),
        "",
        "Against the controls:",
        "",
        *(verdicts(table) or ["- no local-rule family with a control in these runs"]),
    ]
    versus = against_backprop(table) if budgets else []
    if versus:
        lines += ["", f"Against `{BACKPROP}`, budget by budget:", "", *versus]
    mixed = mixed_groups(runs, by)
    if mixed:
        lines += ["", "Groups whose runs differ in more than the seed:", "",
                  *(f"- {m}" for m in mixed)]
    if opts.plot is not None and budgets:
        from bioexp.plots import plot_label_curves

        plot_label_curves(label_curves(table), opts.plot, chance=CHANCE,
                          title="Fashion-MNIST test accuracy against labels per class")
        lines += ["", f"![mean test accuracy against labels per class]({opts.plot.name})"]
    elif opts.plot is not None:
        from bioexp.plots import plot_leaderboard

        std, n = table.header.index("std"), len(by)
        bars = [(" ".join(str(v) for v in row[:n] if v != "-"), row[accuracy],
                 row[std], n > 1 and row[1] != "-")
                for row in table.rows if row[accuracy] is not None]
        plot_leaderboard(bars, opts.plot, title="Fashion-MNIST test accuracy")
        lines += ["", f"![mean test accuracy per row]({opts.plot.name})"]
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {opts.out}: {len(table.rows)} rows from {len(runs)} runs "
          f"(median run {statistics.median(r.number('wall_time_s') or 0 for r in runs):.0f} s)")


if __name__ == "__main__":
    main()
