"""Run folders side by side: find runs under a folder and tabulate what varies and what they scored.

A run is a folder with `summary.json`. Its overrides (`.hydra/overrides.yaml`) are compared
across the runs, and only the ones that differ become columns, so a sweep's table shows exactly
what the sweep varied. Runs that failed, diverged, were interrupted or are still running keep
their row with their status.
"""

from __future__ import annotations

import csv
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bioexp.records import read_json

SUMMARY = "summary.json"


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict[str, Any]
    overrides: tuple[str, ...]
    config: dict[str, Any]  # .hydra/config.yaml flattened to dotted keys

    def value(self, key: str) -> Any:
        """A config group's choice (`model`, `data`, `schedule`), any dotted config key, or a
        summary.json field."""
        if key in ("model", "data", "schedule"):
            return self.config.get(f"{key}.name", self.summary.get(key))
        return self.config[key] if key in self.config else self.summary.get(key)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _natural_key(path: Path) -> list[Any]:
    """Sort `10_x` after `9_x`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> list[Run]:
    """Every run folder at or under `root`, in natural order of their paths."""
    folders = sorted({p.parent for p in Path(root).rglob(SUMMARY)}, key=_natural_key)
    return [read_run(folder) for folder in folders]


def read_run(folder: Path) -> Run:
    try:
        summary = read_json(folder / SUMMARY)
    except (OSError, ValueError):
        summary = {"status": "unreadable"}
    hydra_dir = folder / ".hydra"
    overrides, config = [], {}
    try:
        if (hydra_dir / "overrides.yaml").is_file():
            overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
        if (hydra_dir / "config.yaml").is_file():
            config = _flatten(yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {})
    except yaml.YAMLError:
        pass  # a damaged .hydra folder: the run is still listed, from summary.json alone
    return Run(folder, summary, tuple(overrides), config)


def varying_overrides(runs: list[Run]) -> list[dict[str, str]]:
    """Per run, the overrides (key -> value) whose value is not the same in every run."""
    parsed = [dict(o.split("=", 1) for o in run.overrides if "=" in o) for run in runs]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return [{k: p.get(k, "") for k in varying} for p in parsed]


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


COLUMNS = (("status", 0), ("test_acc", 4), ("best_test_acc", 4), ("wall_time_s", 1))


def run_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): run folder, the varying overrides, status, accuracies, wall time."""
    varying = varying_overrides(runs)
    keys = list(varying[0]) if varying else []
    header = ["run", *keys, *(name for name, _ in COLUMNS)]
    names = run_names(runs)
    rows = [[name, *(v[k] for k in keys),
             *(_fmt(run.summary.get(name), digits) for name, digits in COLUMNS)]
            for name, run, v in zip(names, runs, varying, strict=True)]
    return header, rows


def runs_table(runs: list[Run]) -> str:
    return markdown_table(*run_rows(runs))


def run_names(runs: list[Run]) -> list[str]:
    """Each run's path relative to the folder that holds them all (its name if alone)."""
    if len(runs) < 2:
        return [run.path.name for run in runs]
    common = Path(os.path.commonpath([run.path.resolve() for run in runs]))
    return [str(run.path.resolve().relative_to(common)) or run.path.name for run in runs]


def group_rows(runs: list[Run], by: list[str], metric: str = "test_acc"
               ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) with one row per distinct value of the `by` keys: the mean, standard
    deviation and count of `metric` over the group's completed runs, and every status seen."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run.value(k)) for k in by), []).append(run)
    header = [*by, f"{metric} mean", "std", "n", "statuses"]
    rows = []
    for key, members in groups.items():
        values = [float(r.summary[metric]) for r in members
                  if r.summary.get("status") == "completed" and r.summary.get(metric) is not None]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        statuses = sorted({str(r.summary.get("status")) for r in members})
        rows.append([*key, _fmt(mean, 4), _fmt(std, 4), str(len(values)), ", ".join(statuses)])
    return header, rows


def sort_rows(header: list[str], rows: list[list[str]], column: str) -> list[list[str]]:
    """Rows by `column`, numbers largest first, then text in order; empty cells last."""
    if column not in header:
        raise ValueError(f"no column {column!r}; columns: {', '.join(header)}")
    i = header.index(column)

    def key(row: list[str]) -> tuple:
        cell = row[i]
        try:
            return (0, -float(cell), "")
        except ValueError:
            return (1 if cell else 2, 0.0, cell)

    return sorted(rows, key=key)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
