"""Peak memory of one stretch of work (a training phase): the process's resident set on the CPU
and the CUDA caching allocator's high-water mark.

On Linux the resident-set peak (VmHWM) is reset at the start of the stretch by writing 5 to
/proc/self/clear_refs (proc(5)), so the figure belongs to the phase alone. Where that is not
possible, the figure is the process's peak since it started (getrusage), which can only be
larger; `rss_scope` in the record says which it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    import resource
except ImportError:  # Windows
    resource = None

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else kB


class PeakMemory:
    """`start()` at the beginning of a phase, `read()` at its end:
    {"peak_rss_mb", "rss_scope": "phase" | "process", "cuda_peak_mb" (CUDA devices only)}."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phase_scoped = False

    def start(self) -> None:
        self.phase_scoped = _reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float | str]:
        record: dict[str, float | str] = {
            "peak_rss_mb": round(_rss_peak_mb(), 1),
            "rss_scope": "phase" if self.phase_scoped else "process"}
        if self.device.type == "cuda":
            record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return record
