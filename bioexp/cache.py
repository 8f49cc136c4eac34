"""bioexp's user cache: downloaded datasets, and the phase-1 cache of trained local-rule weights.

Phase 1 of a two-phase run (the local rules, without labels) depends only on the body's initial
weights and structure, the settings of its layers and rules, the training images, the phase-1
settings, the seed of the batch order and, for a layer-by-layer phase 1, its stages
(`Classifier.phase1_stages`), never on the head. `Phase1Cache` stores the trained
body under a hash of exactly those, so a sweep over head settings trains phase 1 once: a later
run with the same key loads the weights and skips the phase, and then trains its head exactly as
the first run did. `phase1_cache` gives a run's entry from its config.

The settings of the body's modules enter the key by construction: `module_settings` reads every
public attribute a module or its rule holds (p, k, delta, sparsity, per_unit, normalize, ...),
so a setting added to a layer or rule tomorrow splits the cache without anyone listing it.

Jobs of a sweep that need the same entry at the same time train it once: `Phase1Cache.lock`
holds `<key>.lock` beside the entry (an `fcntl.flock` lock, which the operating system drops when
its process dies, however it dies) while the first job trains phase 1; the others wait for it,
saying so in their log, and then load the entry. Where there is no `fcntl` (Windows), or the
file system refuses locks, each job goes on without one, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bioexp.records import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no flock; every job trains its own phase 1, as before the lock
    fcntl = None

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.1  # how often a waiting job tries the lock again (and checks for Ctrl-C)

KEY_VERSION = 2  # bump when the key's ingredients change (2: module settings, not repr)

# Data keys that do not change the images phase 1 learns from, so they stay out of the phase-1
# cache key (synthetic data draws its test images after its training images; phase 1 reads no
# label, and sees every training image whatever labels_per_class keeps).
NOT_TRAINING_DATA = ("root", "download", "test_limit", "n_test", "labels_per_class")


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

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    @contextmanager
    def lock(self, stop: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold the entry's lock for the block, so that one process at a time trains (or loads)
        this phase 1. While another process holds it, log that this one waits, and try again
        every LOCK_POLL_S seconds; KeyboardInterrupt when `stop()` turns true meanwhile (Ctrl-C
        or SIGTERM, which bioexp's handler only records). The lock is released when the block
        ends, however it ends, and by the operating system when the process dies."""
        handle = self._open_lock_file()
        if handle is None:
            yield
            return
        with handle:
            locked = self._acquire(handle, stop)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(handle, fcntl.LOCK_UN)  # closing the file would do it too

    def _open_lock_file(self) -> TextIO | None:
        """The lock file, open; None where there are no locks (no fcntl) or it cannot be made."""
        if fcntl is None:
            return None
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.lock_path, "a")  # noqa: SIM115  (`lock` closes it)
        except OSError as exc:
            log.warning("cannot open the phase-1 lock %s (%s); going on without it",
                        self.lock_path, exc.strerror or exc)
            return None

    def _acquire(self, handle: TextIO, stop: Callable[[], bool] | None) -> bool:
        """Take the lock, waiting as `lock` says; False when the file system has no locks."""
        waiting_since = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another process holds it
                pass
            except OSError as exc:  # a file system without locks (some network mounts)
                log.warning("cannot lock %s (%s); going on without the phase-1 lock",
                            self.lock_path, exc.strerror or exc)
                return False
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("waiting for another job training the same phase 1 (%s)",
                         self.lock_path)
            if stop is not None and stop():
                raise KeyboardInterrupt("stopped while waiting for the phase-1 lock")
            time.sleep(LOCK_POLL_S)
        if waiting_since is not None:
            log.info("the other job released the phase-1 lock after %.1f s",
                     time.monotonic() - waiting_since)
        return True


def phase1_cache(cfg: DictConfig, model: nn.Module, schedule: Any,
                 device: torch.device) -> Phase1Cache | None:
    """The phase-1 cache of a run whose `schedule` (an engine.Schedule) trains `model`'s body
    first (engine.has_phase1: the caller asks, as the engine imports this module), keyed on
    the body's current weights; None with `cache=false`."""
    if not cfg.cache:
        return None
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in NOT_TRAINING_DATA}
    settings = {"data": data, "input_scale": cfg.model.input_scale, "seed": cfg.seed,
                "unsupervised": asdict(schedule.unsupervised), "device": device.type}
    stages = model.phase1_stages() if hasattr(model, "phase1_stages") else ()
    if stages:  # layer by layer: the key names each stage's learners (absent otherwise)
        names = {m: name for name, m in model.body.named_modules()}
        settings["stages"] = [[names[m] for m in stage.learners] for stage in stages]
    return Phase1Cache(phase1_key(model.body, settings))
