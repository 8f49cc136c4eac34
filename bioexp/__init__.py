"""bioexp: an experiment runner for biologically plausible learning rules in PyTorch.

From Python, `bioexp.run([overrides])` trains a run as `bioexp train` would and returns it, and
`bioexp.load_run(folder)` reads a finished run back (bioexp.api). Both are imported on first use,
so `import bioexp` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_API = ("run", "load_run")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    """`bioexp.run` and `bioexp.load_run`, from bioexp.api on first use."""
    if name in _API:
        # importlib, not an import statement: bioexp.api imports the modules that read
        # bioexp.__version__, and this root only lends the API its names once it is asked for
        value = getattr(importlib.import_module("bioexp.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bioexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
