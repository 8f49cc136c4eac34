"""Where a fit stands, and what a checkpoint of it holds.

`FitState` knows the position (phase, epoch, batch, step), the batch-order generators, the
epoch's running totals, the optimiser's and scheduler's state, the result so far and the
clocks. It hands all of that to the checkpoint writer after every epoch, every few minutes at a
batch boundary, and when a stop is asked for; `restore` puts it back, so a resumed fit ends
exactly where an uninterrupted one would. The model's weights (and any state a family keeps in
`get_extra_state`) travel in the model's state dict beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from bioexp.memory import PeakMemory
from bioexp.records import RunRecorder


@dataclass
class FitResult:
    test_acc: float | None = None
    val_acc: float | None = None  # final validation accuracy when data.val_size > 0
    best_test_acc: float | None = None
    best_epoch: int | None = None
    phases: list[dict] = field(default_factory=list)
    phase1_cache_hit: bool | None = None  # None when no phase-1 cache was given
    loss_limit: float | None = None  # a batch loss above this is divergence (set in phase 2)


@dataclass
class Position:
    """Where training stands: the phase, its 0-based epoch in progress, the batches of that
    epoch already done, and the global step at the start of the epoch."""

    phase: str = "unsupervised"
    epoch: int = 0
    batch: int = 0
    step: int = 0


class Interrupted(KeyboardInterrupt):
    """Training stopped at a batch boundary because a stop was requested (Ctrl-C, SIGTERM),
    after writing a checkpoint of that point."""


class FitState:
    """The state of one `fit` call that a checkpoint must hold, and the clocks of its phases."""

    def __init__(self, recorder: RunRecorder, seed: int, device: torch.device,
                 checkpoint: Callable[[dict], None] | None = None, every_s: float = 0.0,
                 stop: Callable[[], bool] | None = None):
        self.recorder, self.checkpoint = recorder, checkpoint
        self.every_s, self.stop = every_s, stop
        # phase 1 draws its batch order from seed + 1, phase 2 from seed, so phase 2 is the same
        # whether phase 1 ran or came from the cache
        self.generators = {"unsupervised": torch.Generator().manual_seed(seed + 1),
                           "supervised": torch.Generator().manual_seed(seed)}
        self.epoch_rng = self.generators["unsupervised"].get_state()
        self.result, self.pos = FitResult(), Position()
        self.partial: dict | None = None  # the running totals of a resumed epoch
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.saved_optimizer: dict | None = None  # states to load once phase 2 builds them
        self.saved_scheduler: dict | None = None
        self.elapsed_before = self.phase_before = 0.0
        self.memory = PeakMemory(device)
        self.start = self.phase_start = time.perf_counter()
        self.last_save = time.monotonic()

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state (the model's weights are loaded elsewhere);
        metrics rows written after it are dropped, so none appears twice."""
        self.pos = Position(**state["position"])
        self.result = FitResult(**state["result"])
        for name, rng in state["generators"].items():
            self.generators[name].set_state(rng)
        self.epoch_rng = self.generators[self.pos.phase].get_state()
        self.partial = state["partial"]
        self.saved_optimizer, self.saved_scheduler = state["optimizer"], state["scheduler"]
        self.elapsed_before, self.phase_before = state["elapsed_s"], state["phase_s"]
        self.recorder.truncate_metrics(state["metrics_rows"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def phase_seconds(self) -> float:
        return self.phase_before + time.perf_counter() - self.phase_start

    def save(self, partial: dict | None = None) -> None:
        """Hand the training state, as of the current position, to the checkpoint writer."""
        self.last_save = time.monotonic()
        if self.checkpoint is None:
            return
        generators = {name: (self.epoch_rng if name == self.pos.phase and self.pos.batch
                             else g.get_state()) for name, g in self.generators.items()}
        self.checkpoint({
            "position": asdict(self.pos), "generators": generators, "partial": partial,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "result": asdict(self.result), "metrics_rows": len(self.recorder.rows),
            "elapsed_s": self.elapsed(), "phase_s": self.phase_seconds(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    def after_batch(self, done: int, partial: Callable[[], dict | None]) -> None:
        """After every training batch: stop here (with a checkpoint) when asked to, and write a
        mid-epoch checkpoint when `every_s` seconds have passed since the last one."""
        self.pos.batch = done
        if self.stop is not None and self.stop():
            self.save(partial())
            raise Interrupted()
        if self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s:
            self.save(partial())

    def start_epoch(self, generator: torch.Generator) -> None:
        """Remember the batch order's generator as the epoch starts: a mid-epoch checkpoint
        replays the epoch's order from it."""
        self.epoch_rng = generator.get_state()

    def boundary(self, position: Position, last: bool = False) -> None:
        """Move to `position` (the start of an epoch), write a checkpoint and stop here if asked
        to; after a phase's `last` epoch, only move (the phase's end writes its own)."""
        self.pos = position
        if last:
            return
        self.save()
        if self.stop is not None and self.stop():
            raise Interrupted()

    def begin_phase(self, phase: str) -> None:
        """Start the clock and the memory record of a phase (kept when resuming into it)."""
        if self.pos.phase != phase:
            self.pos, self.phase_before = Position(phase, 0, 0, self.pos.step), 0.0
        self.phase_start = time.perf_counter()
        self.memory.start()

    def record_phase(self, name: str, epochs: int, samples: int) -> None:
        seconds = self.phase_seconds()
        self.result.phases.append({
            "name": name, "epochs": epochs, "wall_time_s": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1) if seconds else None,
            **self.memory.read()})
