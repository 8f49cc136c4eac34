"""`checkpoint_before_requeue` without a SLURM cluster: a stand-in `submitit` module whose handler
of SIGUSR2 (the signal SLURM sends before the time limit) records the requeues it is asked for.

The real path (a cluster, submitit, a requeued job resuming) is in test_slurm.py, which skips
where no cluster can start; this one runs everywhere and checks the hand-over itself: outside
training SIGUSR2 requeues at once, while training it asks the run to stop at the next batch
boundary and the requeue follows only when the stop has left the block.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from collections.abc import Iterator

import pytest

from bioexp.engine.state import Interrupted
from bioexp.engine.stop import StopRequest, checkpoint_before_requeue


class Requeuer:
    """Stands in for submitit's signal handler; only its class's module name matters."""

    __module__ = "submitit.core.job_environment"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: object = None) -> None:
        self.calls.append(signum)


@pytest.fixture
def submitit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Requeuer]:
    """A fake `submitit` in sys.modules, and its requeue handler installed for SIGUSR2 (the
    process's own handler is put back afterwards)."""
    fake = types.ModuleType("submitit")
    fake.JobEnvironment = type("JobEnvironment", (), {
        "_usr_sig": staticmethod(lambda: signal.SIGUSR2)})
    monkeypatch.setitem(sys.modules, "submitit", fake)
    requeuer = Requeuer()
    previous = signal.signal(signal.SIGUSR2, requeuer.checkpoint_and_try_requeue)
    try:
        yield requeuer
    finally:
        signal.signal(signal.SIGUSR2, previous)


def usr2() -> None:
    """SIGUSR2 to this process; its Python handler has run when this returns."""
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.01)  # an interruptible call: pending handlers run here at the latest


def test_outside_training_sigusr2_requeues_at_once(submitit: Requeuer) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with checkpoint_before_requeue():
        assert signal.getsignal(signal.SIGUSR2) != submitit.checkpoint_and_try_requeue
        usr2()
        assert submitit.calls == [signal.SIGUSR2]
    assert submitit.calls == [signal.SIGUSR2]  # once
    assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_while_training_sigusr2_stops_the_run_and_then_requeues(submitit: Requeuer) -> None:
    stop = StopRequest()
    with pytest.raises(Interrupted), checkpoint_before_requeue(), stop.installed():
        usr2()
        assert stop() and stop.signal == "SIGUSR2"  # stop after this batch
        assert submitit.calls == [], "requeued before the run wrote its checkpoint"
        raise Interrupted()  # what the engine raises after that checkpoint
    assert submitit.calls == [signal.SIGUSR2]  # when the stop left the block
    assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # StopRequest's handlers are gone


def test_a_stop_without_sigusr2_does_not_requeue(submitit: Requeuer) -> None:
    """Ctrl-C or SIGTERM stops the run, and the job is not requeued by bioexp."""
    with pytest.raises(KeyboardInterrupt), checkpoint_before_requeue():
        raise KeyboardInterrupt()
    assert submitit.calls == []
    assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue


def test_without_submitit_handler_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No submitit module, or another handler of its signal: the block leaves SIGUSR2 alone."""
    monkeypatch.delitem(sys.modules, "submitit", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    with checkpoint_before_requeue():
        assert signal.getsignal(signal.SIGUSR2) == before
