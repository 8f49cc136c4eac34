"""bioexp's user cache: downloaded datasets, and the phase-1 cache of trained local-rule weights.

Phase 1 of a two-phase run (the local rules, without labels) depends only on the body's initial
weights and structure, the settings of its layers and rules, the training images, the phase-1
settings and the seed of the batch order, never on the head. `Phase1Cache` stores the trained
body under a hash of exactly those, so a sweep over head settings trains phase 1 once: a later
run with the same key loads the weights and skips the phase, and then trains its head exactly as
the first run did.

The settings of the body's modules enter the key by construction: `module_settings` reads every
public attribute a module or its rule holds (p, k, delta, sparsity, per_unit, normalize, ...),
so a setting added to a layer or rule tomorrow splits the cache without anyone listing it.
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

KEY_VERSION = 2  # bump when the key's ingredients change (2: module settings, not repr)


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bioexp, else ~/.cache/bioexp."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bioexp"


def module_settings(obj: Any) -> dict[str, Any]:
    """Every public attribute of a module or rule that is not a tensor or a submodule: plain
    values as they are, other objects (a layer's rule) as their type and their own settings.

    Tensors are left out (the key hashes the state dict), and so are submodules (the key lists
    every module of the body) and `training`, which is no setting.
    """
    settings: dict[str, Any] = {}
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_") or name == "training" or isinstance(value, (torch.Tensor,
                                                                            nn.Module)):
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            settings[name] = value
        elif isinstance(value, (list, tuple)):
            settings[name] = [v if isinstance(v, (bool, int, float, str)) else repr(v)
                              for v in value]
        elif hasattr(value, "__dict__"):
            settings[name] = {"type": type(value).__qualname__, **module_settings(value)}
        else:
            settings[name] = repr(value)
    return settings


def phase1_key(body: nn.Module, settings: dict[str, Any]) -> str:
    """A hash of the body's modules (their names, types, rule versions and settings), its
    initial state, and `settings` (the training data's identity, pixel scaling, phase-1
    schedule, seed, device type)."""
    digest = hashlib.sha256()
    modules = [[name, type(m).__qualname__, getattr(m, "version", 0), module_settings(m)]
               for name, m in body.named_modules()]
    header = {"key_version": KEY_VERSION, "modules": modules, **settings}
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
