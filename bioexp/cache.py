"""bioexp's user cache: downloaded datasets, and the phase-1 cache of trained local-rule weights.

Phase 1 of a two-phase run (the local rules, without labels) depends only on the body's initial
weights and structure, the training images, the phase-1 settings and the seed of the batch
order, never on the head. `Phase1Cache` stores the trained body under a hash of exactly those,
so a sweep over head settings trains phase 1 once: a later run with the same key loads the
weights and skips the phase, and then trains its head exactly as the first run did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioexp.records import atomic_write

log = logging.getLogger(__name__)

KEY_VERSION = 1  # bump when the key's ingredients change


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bioexp, else ~/.cache/bioexp."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bioexp"


def phase1_key(body: nn.Module, settings: dict[str, Any]) -> str:
    """A hash of the body's structure, rule versions and initial state, and `settings` (the
    training data's identity, pixel scaling, phase-1 schedule, seed, device type)."""
    digest = hashlib.sha256()
    versions = [[type(m).__name__, getattr(m, "version", 0)] for m in body.modules()]
    header = {"key_version": KEY_VERSION, "body": repr(body), "versions": versions, **settings}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(body.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


class Phase1Cache:
    """Trained body weights stored as `<folder>/<key>.pt`."""

    def __init__(self, key: str, folder: Path | None = None):
        self.key = key
        self.path = (folder or user_cache_dir() / "phase1") / f"{key}.pt"

    def load(self, body: nn.Module) -> bool:
        """Load the cached weights into `body`; False (and `body` untouched) on a miss."""
        if not self.path.is_file():
            return False
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            body.load_state_dict(state)
        except Exception as exc:  # a damaged or stale file: train again and overwrite it
            log.warning("phase-1 cache file %s is unreadable (%s); training phase 1",
                        self.path, type(exc).__name__)
            return False
        return True

    def save(self, body: nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in body.state_dict().items()}
        atomic_write(self.path, lambda f: torch.save(state, f), binary=True)
