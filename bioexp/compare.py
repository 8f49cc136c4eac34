"""Run folders side by side: find runs, tabulate what varies, what they scored and what they cost.

A run is a folder with `summary.json` or `.hydra/config.yaml` (a job that died before writing
its summary). Overrides (`.hydra/overrides.yaml`) are compared across the runs and only the ones
that differ become columns, so a sweep's table shows exactly what the sweep varied. Runs that
failed, diverged, were interrupted or are still running keep their row with their status.

Tables are built from raw values (`Table`) and rendered three ways: plain text fitted to a
terminal width, Markdown, and CSV (full precision). This module imports neither torch nor
matplotlib, so `bioexp compare` starts fast.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from bioexp.config import RESUME_FREE_KEYS, flatten
from bioexp.records import METRICS, SUMMARY, read_json, read_metrics

# Config groups shown as columns, and whether the run is a random-feature control (`control`).
GROUPS = ("model", "control", "data", "schedule")
NO_CONTROL = "-"  # the `control` cell of a run that is not a control
PHASE_LABELS = {"unsupervised": "unsup", "supervised": "sup"}
# Accuracy columns of the per-run table -> their summary.json fields.
ACCURACY_COLUMNS = {"final": "test_acc", "best": "best_test_acc", "val": "val_acc"}
# Both spellings work wherever a column or metric is named: `final` <-> `test_acc`, ...
ALIASES = {**ACCURACY_COLUMNS, **{field: name for name, field in ACCURACY_COLUMNS.items()}}
GROUP_FIELDS = {"data": "dataset"}  # summary.json fields of config groups named otherwise
# Config keys in which the runs of one `--by` group may differ without a warning: the seed, and
# keys that change how a run is reported but not what it learns.
UNCOMPARED_KEYS = ("seed", *RESUME_FREE_KEYS, "fgsm", "loggers", "mlflow.tracking_uri",
                   "mlflow.experiment")
NO_SUMMARY = "no summary"  # a job folder whose run never wrote summary.json
SKIP_DIRS = {".hydra", "checkpoints", "plots", ".submitit", "eval"}  # never hold runs
EVAL_FILES = ("fgsm", "efficiency", "attribution")  # eval/*.json (bioexp eval, bioexp explain)
# LibYAML's loader is several times faster than the pure-Python one; both give the same result.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Run:
    """One run folder as the tables read it: its summary, its overrides, its config and what
    `bioexp eval` measured. No torch: nothing is loaded but small text files.

    Attributes:
        path: The run folder.
        summary: summary.json (`status`, `test_acc`, `wall_time_s`, `phases`, ...); {} when
            the run never wrote one, `{"status": "unreadable"}` when it cannot be read.
        overrides: The command-line overrides Hydra recorded (`.hydra/overrides.yaml`).
        config: `.hydra/config.yaml` flattened to dotted keys (`schedule.supervised.lr`).
        evals: `eval/fgsm.json` and `eval/efficiency.json`, by name, when `bioexp eval` wrote
            them, and `eval/attribution.json` when `bioexp explain` did.
    """

    path: Path
    summary: dict[str, Any]
    overrides: tuple[str, ...]
    config: dict[str, Any]  # .hydra/config.yaml flattened to dotted keys
    evals: dict[str, Any] = field(default_factory=dict)  # eval/<name>.json by name (bioexp eval)

    def fgsm(self, eps: float) -> float | None:
        """Test accuracy under FGSM of strength `eps`, when `bioexp eval` measured it.

        Args:
            eps: The attack's strength, one that `bioexp eval` measured (0.1, not 0.10001).

        Returns:
            The accuracy, or None when it was not measured at `eps`.
        """
        fgsm = self.evals.get("fgsm") or {}
        table = dict(zip(fgsm.get("eps", []), fgsm.get("accuracy", []), strict=False))
        return table.get(eps)

    def trainable(self) -> int | None:
        """Parameters the optimiser trained (summary.json `parameters.trainable`)."""
        count = (self.summary.get("parameters") or {}).get("trainable")
        return count if isinstance(count, int) else None

    def mflops(self) -> float | None:
        """Forward MFLOP per sample (`eval/efficiency.json`), None when not measured."""
        flops = (self.evals.get("efficiency") or {}).get("flops_per_sample")
        return flops / 1e6 if isinstance(flops, (int, float)) else None

    def deletion_auc(self) -> float | None:
        """The area under the deletion curve of the headline attribution method (Integrated
        Gradients when it was measured; `eval/attribution.json`), None when not measured."""
        area = (self.evals.get("attribution") or {}).get("deletion_auc")
        return float(area) if isinstance(area, (int, float)) else None

    @property
    def status(self) -> str:
        """summary.json's `status` (`completed`, `diverged`, `interrupted`, `failed`,
        `running`, `unreadable`), or `no summary`."""
        return str(self.summary.get("status", NO_SUMMARY))

    def value(self, key: str) -> Any:
        """A config group's choice (`model`, `data`, `schedule`), any dotted config key, or a
        summary.json field.

        Args:
            key: `model`, `control`, `data` or `schedule`; a dotted config key; or a
                summary.json field.

        Returns:
            The value as the run recorded it (the config first, then the summary); None when
                the run has no such key.
        """
        if key in GROUPS:
            return self.config.get(f"{key}.name", self.summary.get(GROUP_FIELDS.get(key, key)))
        return self.config[key] if key in self.config else self.summary.get(key)

    def shown(self, key: str) -> Any:
        """`value(key)` as tables show it: `-` (NO_CONTROL) for the `control` of a run that is
        not a control."""
        value = self.value(key)
        return NO_CONTROL if key == "control" and value is None else value

    def has(self, key: str) -> bool:
        """Whether the run knows `key` at all (as `value` reads it), whatever its value."""
        if key in GROUPS:
            return self.value(key) is not None
        return key in self.config or key in self.summary

    def number(self, key: str) -> float | None:
        """A summary.json field as a float, None when absent or not a number."""
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def phase(self, name: str) -> dict[str, Any]:
        """The summary's record of one phase (wall time, samples/s, peak memory), or {}."""
        return next((p for p in self.summary.get("phases") or [] if p.get("name") == name), {})

    @property
    def completed(self) -> bool:
        """Whether the run finished (status `completed`): only such runs enter a group's mean."""
        return self.status == "completed"


def _natural_key(path: Path) -> list[Any]:
    """Sort `10_x` after `9_x`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> list[Run]:
    """Every run folder at or under `root`, in natural order of their paths.

    A run folder is one with `summary.json` or `.hydra/config.yaml`; the search does not enter
    a run's own `.hydra`, `checkpoints`, `plots`, `eval` or `.submitit` folders.

    Args:
        root: A run folder, or a folder (a sweep's, `outputs/`) to search.

    Returns:
        The runs, `9_x` before `10_x`; empty when there is none.
    """
    folders = []
    for folder, dirs, files in os.walk(root):
        if SUMMARY in files or os.path.isfile(os.path.join(folder, ".hydra", "config.yaml")):
            folders.append(Path(folder))
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
    return [read_run(folder) for folder in sorted(folders, key=_natural_key)]


def _load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=_LOADER)


def read_run(folder: Path) -> Run:
    """The run in `folder`, from whatever of its files can be read: a damaged summary gives
    status `unreadable`, a damaged `.hydra` folder no overrides and no config.

    Args:
        folder: A run folder, as a `Path`.

    Returns:
        The run.
    """
    summary: dict[str, Any] = {}
    if (folder / SUMMARY).exists():
        try:
            summary = read_json(folder / SUMMARY)
        except (OSError, ValueError):
            summary = {"status": "unreadable"}
    hydra_dir = folder / ".hydra"
    overrides, config = [], {}
    try:
        if (hydra_dir / "overrides.yaml").is_file():
            overrides = _load_yaml(hydra_dir / "overrides.yaml") or []
        if (hydra_dir / "config.yaml").is_file():
            config = flatten(_load_yaml(hydra_dir / "config.yaml") or {})
    except (OSError, yaml.YAMLError):
        pass  # a damaged .hydra folder: the run is still listed, from summary.json alone
    evals = {}
    for name in EVAL_FILES:
        path = folder / "eval" / f"{name}.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):  # a damaged file shows as missing
                evals[name] = read_json(path)
    return Run(folder, summary, tuple(overrides), config, evals)


def varying_overrides(runs: list[Run]) -> list[dict[str, str]]:
    """Per run, the overrides (key -> value) whose value is not the same in every run.

    Args:
        runs: The runs.

    Returns:
        One dict per run, in the order of `runs`, with the same keys for every run (sorted);
            "" where a run does not set the key.
    """
    parsed = [dict(o.split("=", 1) for o in run.overrides if "=" in o) for run in runs]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return [{k: p.get(k, "") for k in varying} for p in parsed]


def run_names(runs: list[Run]) -> list[str]:
    """Each run's path relative to the folder that holds them all (its name if alone).

    Args:
        runs: The runs.

    Returns:
        One name per run, in the order of `runs`.
    """
    if len(runs) < 2:
        return [run.path.name for run in runs]
    common = Path(os.path.commonpath([run.path.resolve() for run in runs]))
    return [str(run.path.resolve().relative_to(common)) or run.path.name for run in runs]


# ----------------------------------------------------------------------------------------------
# Tables of raw values


@dataclass
class Table:
    """A table of raw values, before rendering: what `run_table`, `group_table` and
    `efficiency_table` build and `text_table`, `markdown_table` and `write_csv` render.

    Attributes:
        header: The column names.
        rows: One list of raw values per row, in the header's order: str, int, float or None
            (a missing value).
        shared: Config group -> the value every run has, for columns moved out of the table
            (`without_shared_groups`).
    """

    header: list[str]
    rows: list[list[Any]]  # raw values: str, int, float or None
    shared: dict[str, str] = field(default_factory=dict)  # group -> value common to every run

    def column(self, name: str) -> list[Any]:
        """The raw values of column `name` (its full header), one per row.

        Args:
            name: The column's header.

        Returns:
            The column's values, in row order.

        Raises:
            ValueError: There is no such column.
        """
        i = self.header.index(name)
        return [row[i] for row in self.rows]


def _phases(runs: list[Run]) -> list[str]:
    """Phase names that any run recorded, phase 1 first."""
    names = {p.get("name") for run in runs for p in run.summary.get("phases") or []}
    return [n for n in (*PHASE_LABELS, *sorted(n for n in names if n not in PHASE_LABELS))
            if n in names]


def _peak(run: Run, key: str) -> float | None:
    values = [p[key] for p in run.summary.get("phases") or [] if p.get(key) is not None]
    return max(values) if values else None


def _cost_columns(runs: list[Run]) -> list[tuple[str, Any]]:
    """(header, run -> value) for wall time, each phase's training samples per second (`unsup/s`,
    `sup/s`) and the peak memory of the most demanding phase."""
    columns: list[tuple[str, Any]] = [("time s", lambda r: r.number("wall_time_s"))]
    if any(r.trainable() is not None for r in runs):
        columns.append(("params", lambda r: r.trainable()))
    for name in _phases(runs):
        columns.append((f"{PHASE_LABELS.get(name, name)}/s",
                        lambda r, n=name: r.phase(n).get("samples_per_s")))
    columns.append(("rss MB", lambda r: _peak(r, "peak_rss_mb")))
    if any(_peak(r, "cuda_peak_mb") is not None for r in runs):
        columns.append(("cuda MB", lambda r: _peak(r, "cuda_peak_mb")))
    if any(r.fgsm(0.1) is not None for r in runs):
        columns.append(("fgsm@0.1", lambda r: r.fgsm(0.1)))
    if any(r.mflops() is not None for r in runs):
        columns.append(("MFLOP", lambda r: r.mflops()))
    if any(r.deletion_auc() is not None for r in runs):
        columns.append(("deletion_auc", lambda r: r.deletion_auc()))
    return columns


def shown_groups(runs: list[Run]) -> list[str]:
    """GROUPS, with `control` only when some run is a random-feature control."""
    return [g for g in GROUPS if g != "control" or any(r.value("control") for r in runs)]


def run_table(runs: list[Run]) -> Table:
    """One row per run: its name, config groups, varying overrides, status, accuracies (final
    and best test accuracy, final validation accuracy) and costs.

    Args:
        runs: The runs, in the order of the rows.

    Returns:
        The table: columns `run`, `model`, (`control`,) `data`, `schedule`, the overrides that
            vary, `status`, `final`, `best` (and `val` when a run has a validation accuracy), then
            the costs (`time s`, `params`, `unsup/s`, `sup/s`, `rss MB`, ... where recorded).
    """
    varying = varying_overrides(runs)
    keys = [k for k in (varying[0] if varying else {}) if k not in GROUPS]
    groups = shown_groups(runs)
    scores = [c for c in ACCURACY_COLUMNS
              if c != "val" or any(r.number("val_acc") is not None for r in runs)]
    costs = _cost_columns(runs)
    header = ["run", *groups, *keys, "status", *scores, *(name for name, _ in costs)]
    rows = []
    for name, run, v in zip(run_names(runs), runs, varying, strict=True):
        rows.append([name, *(run.shown(g) for g in groups), *(v[k] for k in keys), run.status,
                     *(run.number(ACCURACY_COLUMNS[c]) for c in scores),
                     *(get(run) for _, get in costs)])
    return Table(header, rows)


def efficiency_table(runs: list[Run], eps: list[float]) -> Table:
    """What `bioexp eval` measured, one row per run: accuracy under FGSM at 0 and 0.1 (or the
    first two strengths measured), forward MFLOP per sample, parameters trained by the
    optimiser, by local rules and held otherwise (`registry.parameter_counts`), and the run's time,
    per-phase throughput and peak memory.

    Args:
        runs: The runs, as `read_run` reads them after `bioexp eval` (their `evals`).
        eps: The FGSM strengths that were measured.

    Returns:
        The table.
    """
    shown = [e for e in (0.0, 0.1) if e in eps] or eps[:2]
    costs = [c for c in _cost_columns(runs)
             if not c[0].startswith("fgsm") and c[0] not in ("params", "deletion_auc")]
    kinds = ("trainable", "local", "other")
    header = ["run", "model", *(f"acc@{e:g}" for e in shown), *kinds,
              *(name for name, _ in costs)]
    rows = []
    for name, run in zip(run_names(runs), runs, strict=True):
        params = (run.evals.get("efficiency") or {}).get("parameters") or {}
        rows.append([name, run.value("model"), *(run.fgsm(e) for e in shown),
                     *(params.get(kind) for kind in kinds), *(get(run) for _, get in costs)])
    return Table(header, rows)


def attribution_table(runs: list[Run]) -> Table:
    """What `bioexp explain` measured, one row per run and method: the deletion curve's area
    (target probability) beside the random order's, the accuracy curve's area, infidelity,
    max-sensitivity and the method's seconds (attribution and measures).

    Args:
        runs: The runs, as `read_run` reads them after `bioexp explain` (their `evals`).

    Returns:
        The table.
    """
    header = ["run", "model", "method", "deletion_auc", "random_auc", "deletion_acc_auc",
              "infidelity", "sensitivity", "time s"]
    rows = []
    for name, run in zip(run_names(runs), runs, strict=True):
        record = run.evals.get("attribution") or {}
        for method, m in (record.get("methods") or {}).items():
            rows.append([name, run.value("model"), method, m.get("deletion_auc"),
                         record.get("random_auc"), (m.get("deletion") or {}).get("auc_accuracy"),
                         m.get("infidelity"), m.get("sensitivity_max"),
                         sum((m.get("seconds") or {}).values())])
    return Table(header, rows)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def with_control(runs: list[Run], by: list[str]) -> list[str]:
    """`by`, plus `control` when grouping by model and some runs are random-feature controls:
    a family and its controls are different rows, never one mean.

    Args:
        runs: The runs to group.
        by: The keys to group by.

    Returns:
        The keys `group_table` should group by; `bioexp compare --by` passes its keys
            through this.
    """
    if "model" in by and "control" not in by and any(r.value("control") for r in runs):
        return [*by, "control"]
    return by


def group_table(runs: list[Run], by: list[str], metric: str = "test_acc") -> Table:
    """One row per distinct value of the `by` keys: mean, standard deviation and count of
    `metric` over the group's completed runs, their mean costs, and every status seen. When
    `by` holds `control`, `vs control` is a trained group's mean minus the mean of its stronger
    control (the same other keys, the higher-scoring control).

    Args:
        runs: The runs.
        by: Keys as `Run.value` reads them (`model`, `data`, `control`, dotted config keys);
            pass them through `with_control` first, as `bioexp compare` does, so that controls
            are not averaged with the family they control.
        metric: A summary.json field (`test_acc`, `best_test_acc`, `val_acc`,
            `wall_time_s`, ...; `metric_field` turns `final`, `best`, `val` into these).

    Returns:
        The table: the `by` keys, `<metric> mean`, `std` (None below two runs), `n` (completed
            runs with the metric), `vs control` when `by` holds `control`, the mean costs, and
            `statuses` (`3 completed, 1 diverged`).
    """
    groups = group_runs(runs, by)
    costs = _cost_columns(runs)
    controls = "control" in by
    header = [*by, f"{metric} mean", "std", "n", *(["vs control"] if controls else []),
              *(name for name, _ in costs), "statuses"]
    means: dict[tuple[str, ...], float | None] = {}
    rows = []
    for key, members in groups.items():
        done = [r for r in members if r.completed]
        values = [v for v in (r.number(metric) for r in done) if v is not None]
        means[key] = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        counts = Counter(r.status for r in members)
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        rows.append([*key, means[key], std, len(values),
                     *(_mean([get(r) for r in done]) for _, get in costs), statuses])
    if controls:
        at = by.index("control")
        for row, key in zip(rows, groups, strict=True):
            row.insert(len(by) + 3, _over_control(key, at, means))
    return Table(header, rows)


def _over_control(key: tuple[str, ...], at: int, means: dict[tuple[str, ...], float | None]
                  ) -> float | None:
    """The group `key`'s mean minus the best mean among its controls (the groups with the same
    keys but a control at position `at`); None for controls and groups without any."""
    if key[at] != NO_CONTROL or means[key] is None:
        return None
    rivals = [mean for other, mean in means.items() if other[at] != NO_CONTROL and mean is not None
              and other[:at] + other[at + 1:] == key[:at] + key[at + 1:]]
    return means[key] - max(rivals) if rivals else None


def group_runs(runs: list[Run], by: list[str]) -> dict[tuple[str, ...], list[Run]]:
    """The runs by their values of the `by` keys (as strings; `-` for `control` in a run that
    is not a control), in the order each group first appears."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(str(run.shown(k)) for k in by), []).append(run)
    return groups


def metric_field(name: str) -> str:
    """The summary.json field a metric names: `final`, `best` and `val` (the table's names)
    stand for `test_acc`, `best_test_acc` and `val_acc`.

    Args:
        name: A metric's name, as `--metric` takes it.

    Returns:
        The field's name; any other name unchanged.
    """
    return ACCURACY_COLUMNS.get(name, name)


def missing_key(runs: list[Run], key: str, metric: bool = False) -> str | None:
    """None when some run has `key` (a config group, a dotted config key or a summary.json
    field; a summary.json field or an accuracy for a `metric`), else why not in a few words,
    with the keys the runs have that come closest.

    Args:
        runs: The runs.
        key: The key to look for.
        metric: Look for a summary.json field (a metric) instead of any key.

    Returns:
        None, or a phrase such as `no run has this key (did you mean model.hidden?)`.
    """
    if metric:
        if key in ACCURACY_COLUMNS.values() or any(key in r.summary for r in runs):
            return None
        keys = {k for r in runs for k, v in r.summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    else:
        if any(r.has(key) for r in runs):
            return None
        keys = {*shown_groups(runs), *(k for r in runs for k in (*r.config, *r.summary))}
    names = sorted(keys)
    close = ([k for k in names if k.endswith("." + key)][:3]
             or difflib.get_close_matches(key, names, n=3))
    if close:
        return f"no run has this key (did you mean {' or '.join(close)}?)"
    names.sort(key=lambda k: (k not in GROUPS and k not in ALIASES, "." not in k, k))
    return f"no run has this key (the runs have {', '.join(names[:6])}, ...)"


def mixed_groups(runs: list[Run], by: list[str], shown: int = 5) -> list[str]:
    """One line per `by` group whose completed runs differ in config keys other than the `by`
    keys and those of UNCOMPARED_KEYS, naming the first `shown` of those keys.

    Args:
        runs: The runs.
        by: The keys the groups are made by.
        shown: How many differing keys a line names.

    Returns:
        One warning per such group (`bioexp compare` prints them); empty when every group's
            mean is over runs that differ only in their seed (or in keys that do not change what
            they learn).
    """
    same = {*UNCOMPARED_KEYS, *by, *(f"{key}.name" for key in by if key in GROUPS)}
    lines = []
    for group, members in group_runs(runs, by).items():
        configs = [r.config for r in members if r.completed and r.config]
        keys = sorted({k for config in configs for k in config} - same)
        differ = [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]
        if differ:
            label = ", ".join(f"{k}={v}" for k, v in zip(by, group, strict=True))
            more = f" and {len(differ) - shown} more" if len(differ) > shown else ""
            lines.append(f"group {label} mixes runs that differ in "
                         f"{', '.join(differ[:shown])}{more}")
    return lines


def sort_table(table: Table, column: str) -> Table:
    """Rows by `column`, numbers largest first, then text in order; empty cells last.

    Args:
        table: The table.
        column: A column, as `find_column` finds it (`final`, `test_acc`, `lr`, ...).

    Returns:
        A new table with the rows sorted.

    Raises:
        ValueError: There is no such column (the message lists those there are).
    """
    i = find_column(table.header, column)

    def key(row: list[Any]) -> tuple:
        cell = row[i]
        number = _as_number(cell)
        if number is not None:
            return (0, -number, "")
        return (1 if cell not in (None, "") else 2, 0.0, str(cell or ""))

    return Table(table.header, sorted(table.rows, key=key), table.shared)


def _as_number(cell: Any) -> float | None:
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return float(cell) if math.isfinite(cell) else None
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Rendering


def _cell(value: Any, column: str) -> str:
    """A raw value as the table shows it: accuracies to 4 places, seconds to 0.1, throughput
    and memory compact (12.3k), long numbers from overrides to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
        number = _as_number(text) if len(text) > 8 else None
        return f"{number:.4g}" if number is not None else text
    if column.endswith("/s") or column == "params":
        return _compact(value)
    if column == "vs control":
        return f"{value:+.4f}"
    if column.endswith(" s"):
        return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    if column.endswith("MB"):
        return f"{value:.0f}"
    if column in ("MFLOP", "infidelity", "sensitivity"):
        return f"{value:.3g}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _compact(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    return table.header, [[_cell(v, c) for v, c in zip(row, table.header, strict=True)]
                          for row in table.rows]


def without_shared_groups(table: Table) -> Table:
    """Move config-group columns that hold one value in every row into `shared`."""
    keep, shared = [], dict(table.shared)
    for i, name in enumerate(table.header):
        values = {str(row[i]) for row in table.rows}
        if name in GROUPS and len(values) == 1 and table.rows:
            value = values.pop()
            if value != "None":  # runs without a config say nothing about their groups
                shared[name] = value
        else:
            keep.append(i)
    return Table([table.header[i] for i in keep], [[row[i] for i in keep] for row in table.rows],
                 shared)


def without_empty_columns(table: Table) -> Table:
    """Drop columns that no row has a value in (a cost no run recorded)."""
    keep = [i for i in range(len(table.header))
            if not table.rows or any(row[i] not in (None, "") for row in table.rows)]
    return Table([table.header[i] for i in keep], [[row[i] for i in keep] for row in table.rows],
                 table.shared)


def markdown_table(table: Table) -> str:
    """The table in Markdown, its cells formatted as `text_table` formats them (accuracies to
    4 places, ...), without cutting any."""
    header, rows = _cells(table)
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


CONFIG_KEY = re.compile(r"^[A-Za-z_+~][\w]*(\.[\w]+)+$")  # a dotted key: model.sparsity


def short_headers(header: list[str]) -> list[str]:
    """Dotted keys shortened to their shortest suffix that no other column ends with:
    `schedule.unsupervised.lr` -> `lr`, or `unsupervised.lr` when `supervised.lr` is there too."""
    short = []
    for name in header:
        if not CONFIG_KEY.match(name):
            short.append(name)
            continue
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            clash = any(other != name and (other == suffix or other.endswith("." + suffix))
                        for other in header)
            if not clash:
                break
        short.append(suffix)
    return short


def find_column(header: list[str], name: str) -> int:
    """The index of column `name`, given in full, as its short form or, for an accuracy, by its
    other spelling (`final` or `test_acc`); a metric also finds its grouped `<metric> mean`.
    ValueError otherwise."""
    for names in (header, short_headers(header)):
        for spelling in (name, ALIASES.get(name)):
            for column in (spelling, f"{spelling} mean"):
                if column in names:
                    return names.index(column)
    raise ValueError(f"no column {name!r}; columns: {', '.join(short_headers(header))}")


# Cut text keeps at least this much: a run name its job number (`12_k…`), a value more.
MIN_RUN_WIDTH, MIN_VALUE_WIDTH = 5, 8


def _tails(values: list[str]) -> list[int]:
    """For each head length h (0 up to the longest value), how many closing characters a value
    cut to `head…tail` must keep so that values with the same first h characters stay distinct
    (0: their heads alone tell them apart)."""
    distinct = sorted(set(values))
    tails = []
    for head in range(max(map(len, distinct), default=0)):
        same_head: dict[str, list[str]] = {}
        for value in distinct:
            same_head.setdefault(value[:head], []).append(value[::-1])
        common = -1  # the longest end two values of one group share
        for group in same_head.values():
            group.sort()  # reversed, so values sharing the longest end are neighbours
            for a, b in pairwise(group):
                common = max(common, len(os.path.commonprefix([a, b])))
        tails.append(common + 1)
    return tails


def _narrowest(tails: list[int]) -> int:
    """The narrowest width at which a column's values, cut to `head…tail`, stay distinct."""
    return min((head + 1 + tail for head, tail in enumerate(tails)), default=0)


def _head(tails: list[int], width: int) -> int:
    """How many opening characters a value cut to `width` keeps: as many as leave room for the
    closing characters that keep the values distinct."""
    return max(h for h in range(min(width, len(tails))) if h + 1 + tails[h] <= width)


def _cut(text: str, width: int, head: int) -> str:
    """`text` in `width` characters: its first `head`, '…', and as many of its last as fit."""
    if len(text) <= width:
        return text
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def text_table(table: Table, width: int = 100) -> str:
    """Columns separated by two spaces, fitted to `width` characters where that is possible
    without making two different values look the same.

    Headers are shortened, config groups shared by every run move to a first line and empty
    columns are left out. Then text cells are cut to `head…tail`, never so far that two
    different values of a column look the same: the run name first, as far as needed; override
    values, then config groups (model names) only when that makes the table fit. Numbers,
    statuses and headers are never cut, so a table with many of them may stay wider than
    `width`.

    Args:
        table: The table.
        width: The width to fit, in characters.

    Returns:
        The table as lines of text, joined by newlines, without a final newline.
    """
    shared = without_empty_columns(without_shared_groups(table))
    header, rows = _cells(shared)
    header = short_headers(header)
    numeric = [all(_as_number(row[i]) is not None for row in shared.rows
                   if row[i] not in (None, "")) for i in range(len(header))]
    fixed = [numeric[i] or name in ("status", "statuses") for i, name in enumerate(header)]
    columns = [[row[i] for row in rows] for i in range(len(header))]
    widths = [max(map(len, [name, *cells])) for name, cells in zip(header, columns, strict=True)]
    tails: dict[int, list[int]] = {}
    floors = list(widths)

    def total() -> int:
        return sum(widths) + 2 * (len(widths) - 1)

    def shrink(tier: list[int]) -> None:
        while total() > width:
            wide = [i for i in tier if widths[i] > floors[i]]
            if not wide:
                return
            widths[max(wide, key=lambda j: widths[j])] -= 1  # the widest gives way first

    if total() > width:
        for i, name in enumerate(header):
            if not fixed[i]:
                tails[i] = _tails(columns[i])
                least = MIN_RUN_WIDTH if name == "run" else MIN_VALUE_WIDTH
                floors[i] = min(widths[i], max(len(name), least, _narrowest(tails[i])))
        shrink([i for i in tails if header[i] == "run"])
        if sum(floors) + 2 * (len(floors) - 1) <= width:  # else cutting names gains nothing
            shrink([i for i in tails if header[i] not in ("run", *GROUPS)])
            shrink([i for i in tails if header[i] in GROUPS])
    for i in tails:
        if widths[i] < max(map(len, columns[i]), default=0):
            head = _head(tails[i], widths[i])
            columns[i] = [_cut(cell, widths[i], head) for cell in columns[i]]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *map(line, zip(*columns, strict=True))]
    if shared.shared:
        lines.insert(0, "every run: " + ", ".join(f"{k}={v}" for k, v in shared.shared.items()))
    return "\n".join(lines)


def write_csv(path: Path, table: Table) -> None:
    """The table with raw values: full precision, empty cells for missing values.

    Args:
        path: The CSV file to write (replaced when it exists).
        table: The table.
    """
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.header)
        writer.writerows([["" if v is None else v for v in row] for row in table.rows])


def runs_table(runs: list[Run]) -> str:
    """The Markdown table of a multirun's jobs (a sweep folder's runs.md)."""
    return markdown_table(without_shared_groups(run_table(runs)))


# ----------------------------------------------------------------------------------------------
# Data for the comparison figure


def plot_groups(runs: list[Run], by: list[str]) -> dict[str, list[Run]]:
    """Label -> runs: the `by` groups, or else runs that differ only in their seed together.

    Args:
        runs: The runs.
        by: Keys to group by; empty: group the runs whose varying overrides are the same but
            for `seed`.

    Returns:
        Label -> the group's runs. A label is the group's `by` values joined by commas, or
            else the overrides that vary but `seed` (`model=krotov_fc, data=mnist`), or the
            model's name when none does.
    """
    if by:
        return {", ".join(key): members for key, members in group_runs(runs, by).items()}
    groups: dict[str, list[Run]] = {}
    for run, varying in zip(runs, varying_overrides(runs), strict=True):
        label = ", ".join(f"{k}={v}" for k, v in varying.items() if k != "seed")
        groups.setdefault(label or str(run.value("model")), []).append(run)
    return groups


def learning_curve(run: Run, metric: str = "test_acc") -> list[tuple[int, float]]:
    """(supervised epoch, metric) for every evaluation the run logged.

    Args:
        run: The run; its metrics.jsonl is read.
        metric: A metrics.jsonl column: `test_acc`, `val_acc`, `train_acc`, `test_loss`, ...

    Returns:
        The points, from epoch 1 on, skipping rows without a number for `metric`; empty when
            the run logged none.
    """
    rows = read_metrics(run.path / METRICS)
    return [(r["epoch"], r[metric]) for r in rows
            if r.get("phase") == "supervised" and r.get("epoch", 0) > 0
            and isinstance(r.get(metric), (int, float))]
