"""The notebooks in examples/: each runs from top to bottom, and none is stored with outputs.

Each notebook runs in a fresh kernel of this interpreter, in the test's temporary folder (so its
run folders land there), with the test's environment: the autouse `private_cache` fixture's
XDG_CACHE_HOME (the phase-1 cache), and this interpreter's folder first on the PATH, as in an
activated virtual environment, for the notebooks' `!bioexp ...` lines.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
TIMEOUT_S = 300  # per notebook; each took about 20 s on a busy 2-core CPU
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours of the kernel's tracebacks
# Failures that do not stop a notebook: a shell line (`!bioexp ...`) that failed.
SHELL_ERRORS = ("command not found", "bioexp: error", "Traceback (most recent call last)")


def test_examples_has_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path: Path) -> None:
    """Outputs belong to whoever runs the notebook: clear them before committing
    (Jupyter: Edit > Clear Outputs of All Cells; or `jupyter nbconvert --clear-output`)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name} is stored with outputs in cells {dirty}: clear them"


@pytest.fixture
def kernel_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A `python3` kernel spec for this very interpreter, found before any the user installed
    (JUPYTER_PATH comes first), and this interpreter's folder first on the PATH."""
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent),
                                                os.environ.get("PATH", "")]))
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_here: str) -> None:
    nb = nbformat.read(path, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=kernel_here,
                            resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute()
        error = None
    except CellExecutionError as exc:  # its text: the cell's source and the kernel's traceback
        error = ANSI.sub("", str(exc))
    elapsed = time.perf_counter() - start
    if error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            if output.output_type == "stream" and any(e in text for e in SHELL_ERRORS):
                pytest.fail(f"{path.name}, cell {i}:\n{cell.source}\n{text}", pytrace=False)
    assert elapsed < TIMEOUT_S, f"{path.name} took {elapsed:.0f} s (limit {TIMEOUT_S} s)"
    assert (work / "outputs" / "examples").is_dir(), "the runs did not land in the work folder"
    blank = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and "plt." in cell.source
             and not any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert not blank, f"{path.name}: cells {blank} draw with pyplot but showed no figure " \
                      "(did an import switch matplotlib's backend away from inline?)"
