"""The schedule engine: `fit(model, data, schedule, recorder, ...)` and what it is made of.

- `schedule.py`: the two phases and their learning-rate schedules (optimiser and scheduler
  from the Hydra config groups `optimizer` and `lr_schedule`);
- `loops.py`: one unsupervised epoch, one supervised epoch (the model's own training step),
  evaluation, and divergence;
- `local.py`: local-rule layers: finding them, letting them learn, checking them, and the
  untrained control (`control=...`);
- `state.py`: where a fit stands and what its checkpoint holds;
- `stop.py`: Ctrl-C, SIGTERM and SLURM's requeue signal, turned into a stop with a checkpoint;
- `fit.py`: the schedule's phases, written out.
"""

from bioexp.engine.fit import ALIGNMENT_BATCH, fit, has_phase1, plural
from bioexp.engine.local import local_layers, local_learning, start_control
from bioexp.engine.loops import (
    DIVERGENCE_FACTOR,
    Diverged,
    evaluate,
    frozen_body,
    precompute,
    supervised_epoch,
    unsupervised_epoch,
)
from bioexp.engine.schedule import Schedule, SupervisedPhase, UnsupervisedPhase
from bioexp.engine.state import FitResult, Interrupted, Position
from bioexp.engine.stop import StopRequest, checkpoint_before_requeue

__all__ = [
    "ALIGNMENT_BATCH", "DIVERGENCE_FACTOR", "Diverged", "FitResult", "Interrupted", "Position",
    "Schedule", "StopRequest", "SupervisedPhase", "UnsupervisedPhase", "checkpoint_before_requeue",
    "evaluate", "fit", "frozen_body", "has_phase1",
    "local_layers", "local_learning", "plural", "precompute", "start_control", "supervised_epoch",
    "unsupervised_epoch",
]
