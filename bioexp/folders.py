"""Whether a folder can be created and written, found out for real and without a trace: the
preflight asks it of run and sweep folders (bioexp.checks) and of MLflow's store
(bioexp.loggers), before anything is written there."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be created and written, or None when it can. It tries both for real
    (permissions alone do not tell: root may not write into /proc) and leaves nothing behind."""
    folder = folder.absolute()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{exc.filename or folder}: {exc.strerror or exc}"
    finally:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()
    return None
