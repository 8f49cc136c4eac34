"""What a run leaves on disk: metrics.jsonl, summary.json and checkpoints, never half-written.

`metrics.jsonl` gets one JSON object per evaluation, appended and flushed line by line, so a
killed run leaves only whole lines. `summary.json` and checkpoints are written to a temporary file
in the same folder and renamed over the old one (`os.replace` is atomic on POSIX), so a reader sees
either the old file or the new one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bioexp.errors import ConfigError

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoints/last.pt"


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through `write(file)` into a temporary sibling of `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: json.dump(_json_safe(data), f, indent=2, sort_keys=False))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_metrics(path: Path) -> list[dict]:
    """Every whole line of a metrics file (a torn last line, if any, is skipped)."""
    rows = []
    if not path.exists():
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_checkpoint(path: Path, purpose: str) -> dict[str, Any]:
    """The content of a checkpoint file, or ConfigError naming the file: missing (the run has
    nothing to `purpose`), or unreadable."""
    import torch

    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the run has no checkpoint to {purpose}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways
        raise ConfigError(f"checkpoint {path} is corrupt or truncated and cannot be read "
                          f"({type(exc).__name__})") from None


class RunRecorder:
    """The writer of one run folder's records."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS
        self.summary_path = self.run_dir / SUMMARY
        self.checkpoint_path = self.run_dir / CHECKPOINT
        self.rows: list[dict] = []
        self.summary: dict[str, Any] = {}
        self.listeners: list[Callable[[dict], None]] = []  # loggers (TensorBoard, MLflow)

    def log_metrics(self, row: dict) -> None:
        """Append one evaluation to metrics.jsonl, flush it to disk, and pass it on to the
        listeners."""
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for listener in self.listeners:
            listener(row)

    def truncate_metrics(self, n_rows: int) -> None:
        """Keep the first `n_rows` rows of metrics.jsonl (a resumed run drops the rows logged
        after its checkpoint, so that none is written twice)."""
        rows = read_metrics(self.metrics_path)[:n_rows]
        atomic_write(self.metrics_path,
                     lambda f: f.writelines(json.dumps(_json_safe(r)) + "\n" for r in rows))
        self.rows = rows

    def update_summary(self, **fields: Any) -> None:
        self.summary.update(fields)
        write_json(self.summary_path, self.summary)

    def save_checkpoint(self, state: dict) -> None:
        import torch  # here, so that reading run folders (bioexp compare) does not load torch

        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f), binary=True)
