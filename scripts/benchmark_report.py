"""The benchmark's leaderboard as a Markdown page, read from its run folders.

    python scripts/benchmark_report.py SWEEP_DIR [SWEEP_DIR ...] --out docs/benchmark.md \
        [--plot docs/benchmark.png] [--command "bioexp train experiment=benchmark"]

One row per model and control (as `bioexp compare --by model` shows them): mean and standard
deviation of the test accuracy over the seeds, the gain over the family's stronger control,
FGSM accuracy at eps 0.1, wall time and trainable parameters. Below the table: the machine and
versions the runs recorded, their total and summed wall time, and, computed from the table, each
local-rule family that does not beat its stronger control. The bar chart is `bioexp compare`'s.
Nothing here is typed in by hand: rerun it on new folders and the page follows.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from datetime import datetime
from pathlib import Path

from bioexp.compare import (
    find_runs,
    group_table,
    markdown_table,
    mixed_groups,
    with_control,
)


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


def verdicts(table) -> list[str]:
    """One sentence per trained local-rule family: its gain over its stronger control, and
    whether that gain is larger than twice the seeds' spread (the two standard deviations
    combined); a smaller one is no clear gain."""
    header = table.header
    if "vs control" not in header:
        return []
    col = {name: header.index(name) for name in header}
    mean_of = {(row[col["model"]], row[col["control"]]): row for row in table.rows}
    lines = []
    for row in table.rows:
        gain = row[col["vs control"]]
        if gain is None:
            continue
        model = row[col["model"]]
        controls = [r for (m, c), r in mean_of.items() if m == model and c != "-"
                    and r[col["test_acc mean"]] is not None]
        rival = max(controls, key=lambda r: r[col["test_acc mean"]])
        spread = 2 * ((row[col["std"]] or 0.0) ** 2 + (rival[col["std"]] or 0.0) ** 2) ** 0.5
        points = f"{gain * 100:+.2f} points of mean test accuracy"
        if abs(gain) <= spread:
            lines.append(f"- `{model}` is within twice the seeds' spread of its stronger control, "
                         f"`{rival[col['control']]}` ({points}): no clear gain")
        else:
            word = "beats" if gain > 0 else "does not beat"
            lines.append(f"- `{model}` {word} its stronger control, `{rival[col['control']]}` "
                         f"({points})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--command", default="bioexp train experiment=benchmark")
    opts = parser.parse_args()
    runs = [run for folder in opts.folders for run in find_runs(folder)]
    by = with_control(runs, ["model"])
    table = group_table(runs, by)
    keep = [i for i, name in enumerate(table.header) if name not in ("unsup/s", "sup/s")]
    table.header[:] = [table.header[i] for i in keep]
    table.rows[:] = [[row[i] for i in keep] for row in table.rows]
    accuracy = table.header.index("test_acc mean")
    table.rows.sort(key=lambda row: -(row[accuracy] or 0.0))
    statuses = Counter(r.status for r in runs)
    lines = [
        "# Benchmark: every family and its controls on Fashion-MNIST",
        "",
        f"Made by `{opts.command}` (then `python scripts/benchmark_report.py`); "
        f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()) + ".",
        "Each row: the model's own defaults unless its `conf/bench/<row>.yaml` says otherwise; "
        f"test accuracy on {test_images(runs)}, mean and standard deviation over the seeds "
        "(`n`); `vs control`: the mean minus that of the family's stronger random-feature "
        "control; `fgsm@0.1`: test accuracy under FGSM at eps 0.1; `time s`: wall time of one "
        "run; `params`: parameters the optimiser trains.",
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
    mixed = mixed_groups(runs, by)
    if mixed:
        lines += ["", "Groups whose runs differ in more than the seed:", "",
                  *(f"- {m}" for m in mixed)]
    if opts.plot is not None:
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
