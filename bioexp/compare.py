"""Run folders side by side: find runs under a folder and tabulate what varies and what they scored.

A run is a folder with `summary.json`. Its overrides (`.hydra/overrides.yaml`) are compared
across the runs, and only the ones that differ become columns, so a sweep's table shows exactly
what the sweep varied. Runs that failed, diverged, were interrupted or are still running keep
their row with their status.
"""

from __future__ import annotations

import re
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
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return Run(folder, summary, tuple(overrides or ()))


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


def runs_table(runs: list[Run]) -> str:
    """A Markdown table: run folder, the varying overrides, status, accuracies, wall time."""
    varying = varying_overrides(runs)
    keys = list(varying[0]) if varying else []
    header = ["run", *keys, *(name for name, _ in COLUMNS)]
    rows = [[run.path.name, *(v[k] for k in keys),
             *(_fmt(run.summary.get(name), digits) for name, digits in COLUMNS)]
            for run, v in zip(runs, varying, strict=True)]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
