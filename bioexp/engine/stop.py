"""Stopping a fit from outside: Ctrl-C and SIGTERM (`StopRequest`), and SLURM's signal before
a time limit or a pre-emption (`checkpoint_before_requeue`).

Both end training the same way: the engine polls the request at each batch boundary, writes a
checkpoint there and raises `Interrupted` (engine/state.py); the run folder keeps what was done,
and `resume=` (or the requeued job) continues it.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while a run trains. The first signal asks the engine to stop
    at the next batch boundary, where it writes a checkpoint; a second one stops at once (the
    previous checkpoint stays). Called, it says whether a stop was asked for."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt()
        self.signal = signal.Signals(signum).name
        log.warning("%s: stopping after the current batch, with a checkpoint (send it again to "
                    "stop at once)", self.signal)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle both signals inside the block (only the main thread can; elsewhere the
        default behaviour stays)."""
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def checkpoint_before_requeue() -> Iterator[None]:
    """In a job that submitit started (hydra/launcher=slurm), submitit's signal before the time
    limit or at pre-emption (SIGUSR2) would requeue the job at once, wherever training is. Here
    it stops the run as SIGTERM does, at the next batch boundary with a checkpoint, and only then
    hands over to submitit, which requeues the job; the requeued job resumes the run."""
    submitit = sys.modules.get("submitit")
    sig = submitit.JobEnvironment._usr_sig() if submitit is not None else None
    requeue = signal.getsignal(sig) if sig is not None else None
    if not type(getattr(requeue, "__self__", None)).__module__.startswith("submitit"):
        yield
        return
    caught: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(stop, "__self__", None), StopRequest):
            stop(signum, frame)  # training: stop after this batch, with a checkpoint
        else:
            requeue(signum, frame)  # not training: requeue now

    try:
        signal.signal(sig, handle)
    except ValueError:  # not the main thread: submitit's handler stays
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        if caught:
            requeue(caught[0], None)  # requeues the job and exits
        raise
    finally:
        signal.signal(sig, requeue)
