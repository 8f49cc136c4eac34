"""The two phases of a schedule, and the learning-rate schedules they follow.

Phase 1 (`UnsupervisedPhase`) trains local-rule layers at a rate that follows a named schedule
(Krotov & Hopfield 2019 anneal theirs linearly to zero). Phase 2 (`SupervisedPhase`) trains with
a torch optimiser and a torch learning-rate scheduler, both built from the Hydra config groups
`optimizer` and `lr_schedule` (`_target_: torch.optim.Adam`, `torch.optim.lr_scheduler.*`), so
any torch optimiser or scheduler works without code. The scheduler steps once per epoch. The
top-level keys `precision` and `cuda_graphs` reach the phases here (`tf32`, `cuda_graphs`,
`precision`); the loops apply them (`bioexp.engine.loops.numerics`).

The four named schedules are closed forms of the epoch (`Constant`, `Linear`, `Cosine`,
`Exponential`): the supervised configs hand them to `torch.optim.lr_scheduler.LambdaLR`, which
multiplies the base rate by them exactly as phase 1 does, so a rate never drifts by a rounding
(torch's CosineAnnealingLR computes the same curve recursively, a few ulps off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bioexp.errors import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (params, lr=...) -> optimiser
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class Constant:
    """Factor 1 in every epoch."""

    def __call__(self, epoch: int) -> float:
        return 1.0


@dataclass(frozen=True)
class Linear:
    """1 - epoch / epochs: to zero over the phase (Krotov & Hopfield 2019 anneal their rule so)."""

    epochs: int

    def __call__(self, epoch: int) -> float:
        return 1.0 - epoch / max(self.epochs, 1)


@dataclass(frozen=True)
class Cosine:
    """(1 + cos(pi epoch / epochs)) / 2: half a cosine from 1 to 0 over the phase."""

    epochs: int

    def __call__(self, epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * (epoch / max(self.epochs, 1))))


@dataclass(frozen=True)
class Exponential:
    """decay ** epoch."""

    decay: float

    def __call__(self, epoch: int) -> float:
        return self.decay ** epoch


# The named schedules of phase 1 (`schedule.unsupervised.lr_schedule`): (epochs, decay) -> factor.
RATE_SCHEDULES: dict[str, Callable[[int, float], Callable[[int], float]]] = {
    "constant": lambda epochs, decay: Constant(),
    "linear": lambda epochs, decay: Linear(epochs),
    "cosine": lambda epochs, decay: Cosine(epochs),
    "exponential": lambda epochs, decay: Exponential(decay),
}


def rate_factor(name: str, epochs: int, decay: float) -> Callable[[int], float]:
    """The named schedule of a phase of `epochs` epochs (`decay` for the exponential one)."""
    return RATE_SCHEDULES[name](epochs, decay)


@dataclass(frozen=True)
class UnsupervisedPhase:
    """Phase 1: local rules learn at `lr` times the `lr_schedule` factor of the epoch."""

    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"  # a name of RATE_SCHEDULES
    lr_decay: float = 0.95  # per epoch, for the exponential schedule
    tf32: bool = False  # CUDA matmuls in TF32 (precision=tf32); no effect on the CPU
    cuda_graphs: bool = False  # on CUDA, replay each epoch's local-rule steps as one CUDA graph
    name: ClassVar[str] = "unsupervised"

    def lr_at(self, epoch: int, epochs: int | None = None) -> float:
        """The rate of 0-based `epoch`, constant within it, in a phase of `epochs` epochs (this
        phase's own by default; one phase passes the supervised epochs, which the local layers
        then learn through)."""
        return self.lr * rate_factor(self.lr_schedule, epochs or self.epochs, self.lr_decay)(epoch)


def adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


@dataclass(frozen=True)
class SupervisedPhase:
    """Phase 2 (the only one of `one_phase`): `optimizer(params, lr=lr)` trains, and
    `lr_schedule(optimizer)`, when given, sets its rate after every epoch."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: OptimizerFactory = field(default=adam, compare=False)
    lr_schedule: SchedulerFactory | None = field(default=None, compare=False)
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    precision: str = "fp32"  # fp32 | tf32 (CUDA matmuls and convolutions) | bf16 (autocast)
    name: ClassVar[str] = "supervised"


# two_phase: the local rules learn first, without labels, then the supervised phase trains the
# head on the frozen body; one_phase: the local rules learn during the supervised phase.
SCHEDULE_KINDS = ("two_phase", "one_phase")


@dataclass(frozen=True)
class Schedule:
    name: str  # one of SCHEDULE_KINDS
    unsupervised: UnsupervisedPhase
    supervised: SupervisedPhase
    local_rules: bool = True  # False: local-rule layers keep their initial weights (a control)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule.name must be one of {', '.join(SCHEDULE_KINDS)}, got "
                              f"{self.name!r}")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Schedule:
        """The schedule of a run's config: `schedule.*`, and the `optimizer` and `lr_schedule`
        groups, instantiated as factories (`_partial_: true`)."""
        unsup, sup = (_settings(cfg.schedule[name], kind) for name, kind in (
            ("unsupervised", UnsupervisedPhase), ("supervised", SupervisedPhase)))
        optimizer = instantiate_group(cfg, "optimizer")
        lr_schedule = instantiate_group(cfg, "lr_schedule") if cfg.get("lr_schedule") else None
        precision = cfg.get("precision") or "fp32"
        # bf16 autocast is for the backprop steps: local rules keep fp32 (TF32 with tf32 only).
        return cls(cfg.schedule.name,
                   UnsupervisedPhase(**unsup, tf32=precision == "tf32",
                                     cuda_graphs=bool(cfg.get("cuda_graphs", False))),
                   SupervisedPhase(**sup, optimizer=optimizer, lr_schedule=lr_schedule,
                                   precision=precision),
                   local_rules=cfg.get("control") is None)


def instantiate_group(cfg: DictConfig, group: str) -> Any:
    """Hydra's `instantiate` of a config group's node; ConfigError naming the group when it
    fails."""
    try:
        return instantiate(cfg[group])
    except Exception as exc:  # Hydra wraps a missing class or a bad argument in many ways
        raise group_error(cfg, group, exc) from None


def group_error(cfg: DictConfig, group: str, exc: Exception) -> ConfigError:
    """One sentence for a config group whose torch object cannot be built: its class and the
    first line of the complaint."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = first.split(", set env var HYDRA_FULL_ERROR")[0]
    target = OmegaConf.select(cfg, f"{group}._target_")
    return ConfigError(f"{group} ({target}) cannot be built: {first}")


def _settings(node: DictConfig, kind: type) -> dict:
    """The keys of a phase's config node that are fields of `kind`."""
    known = {f.name for f in fields(kind)}
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k in known}

