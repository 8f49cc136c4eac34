"""The schedule engine: an unsupervised epoch, a supervised epoch, evaluation, and `fit`.

Two schedules share these loops. `two_phase` first trains the local layers without labels
(unsupervised epochs), then freezes them and trains the head with the optimiser (supervised
epochs); when the frozen body is deterministic, the head trains on features computed once.
`one_phase` runs only supervised epochs, and local layers update on every forward pass of them.
Local layers are found by `isinstance(module, LocalLayer)` and updated under `torch.no_grad()`.
After every supervised epoch, models with feedback layers also log their alignment angles,
measured on a fixed batch of training images.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from bioexp.cache import Phase1Cache
from bioexp.data import Dataset, Split
from bioexp.feedback.alignment import alignment_angles
from bioexp.layers import LocalLayer
from bioexp.memory import PeakMemory
from bioexp.records import RunRecorder

log = logging.getLogger(__name__)

ALIGNMENT_BATCH = 512  # training images on which alignment angles are measured
# A training loss this many times the untrained model's (at least 1) is divergence, not learning.
DIVERGENCE_FACTOR = 100.0
NONFINITE = "values became NaN or infinite"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`1 epoch`, `2 epochs`; `nouns` for irregular plurals (`batch`, `batches`)."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


class Diverged(RuntimeError):
    """The loss or a local layer's weights stopped being finite, or the loss exploded.

    `epoch` counts from 1; `step` is the global optimiser step (as in metrics.jsonl), or None
    when only the end of the epoch is known. `layers` names the local-rule layers whose weights
    or outputs are no longer finite, when that is the cause; `reason` says what happened.
    """

    def __init__(self, phase: str, epoch: int, step: int | None, layers: Sequence[str] = (),
                 reason: str = NONFINITE,
                 layer_problem: str = "now holds or outputs NaN or infinite values"):
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        message = f"{phase} training diverged at {where}: {reason}"
        if layers:
            message += (f"; the local-rule layer {', '.join(layers)} {layer_problem} (lower "
                        "schedule.unsupervised.lr)")
        super().__init__(message)
        self.phase, self.epoch, self.step, self.layers = phase, epoch, step, list(layers)
        self.reason = reason


def holds_nonfinite(module: nn.Module) -> bool:
    """Whether any tensor of the module's state (weights, buffers) has a NaN or infinity."""
    return not all(torch.isfinite(t).all() for t in module.state_dict().values())


def weight_norms(layers: Sequence[LocalLayer]) -> list[float]:
    return [layer.weight.norm().item() for layer in layers]


def grown_local_layers(model: nn.Module, before: Sequence[float]) -> list[str]:
    """Names of local layers whose weights grew more than DIVERGENCE_FACTOR-fold since their
    norms were `before` (an exploding loss in a phase where they learn is then theirs)."""
    layers = local_layers(model)
    names = {module: name for name, module in model.named_modules() if module in layers}
    return [names[layer] for layer, now, then in zip(layers, weight_norms(layers), before,
                                                     strict=True)
            if now > DIVERGENCE_FACTOR * then]


def broken_local_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names (as in `named_modules`) of local layers whose weights, or whose output for the
    batch `x`, hold a NaN or infinite value."""
    names = {module: name for name, module in model.named_modules()
             if isinstance(module, LocalLayer)}
    broken: list[str] = []

    def check(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if holds_nonfinite(layer) or not torch.isfinite(output).all():
            broken.append(names[layer])

    handles = [layer.register_forward_hook(check) for layer in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return broken


@dataclass(frozen=True)
class Phase:
    """The settings of one training phase (`schedule.unsupervised` or `schedule.supervised`)."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"
    lr_decay: float = 0.95
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 0.0

    @classmethod
    def from_cfg(cls, name: str, node: DictConfig) -> Phase:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in OmegaConf.to_container(node).items() if k in known}
        return cls(name=name, **values)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based `epoch`, constant within the epoch."""
        frac = epoch / max(self.epochs, 1)
        factor = {
            "constant": 1.0,
            "linear": 1.0 - frac,  # Krotov & Hopfield 2019 anneal their rule this way
            "cosine": 0.5 * (1.0 + math.cos(math.pi * frac)),
            "exponential": self.lr_decay ** epoch,
        }[self.lr_schedule]
        return self.lr * factor


@dataclass(frozen=True)
class Schedule:
    name: str  # "two_phase" or "one_phase"
    unsupervised: Phase
    supervised: Phase

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Schedule:
        return cls(cfg.name, Phase.from_cfg("unsupervised", cfg.unsupervised),
                   Phase.from_cfg("supervised", cfg.supervised))


def local_layers(model: nn.Module) -> list[LocalLayer]:
    return [m for m in model.modules() if isinstance(m, LocalLayer)]


def warn_unconverged(layers: Sequence[LocalLayer]) -> None:
    """Log, once per layer, when phase 1 left a layer far from where its rule converges."""
    for layer in layers:
        warning = layer.unconverged()
        if warning:
            log.warning("%s", warning)


@contextmanager
def local_learning(model: nn.Module, lr: Callable[[], float]) -> Iterator[None]:
    """While active, every local layer applies its rule after each forward call.

    The rule sees the layer's input and the output it just computed, so no layer runs twice.
    """

    def update(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        with torch.no_grad():
            layer.local_update(args[0].detach(), output.detach(), lr())

    handles = [layer.register_forward_hook(update) for layer in local_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def make_optimizer(params: list[nn.Parameter], phase: Phase) -> torch.optim.Optimizer:
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum,
                               weight_decay=phase.weight_decay)
    optimizer = torch.optim.AdamW if phase.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=phase.lr, weight_decay=phase.weight_decay)


def _bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, unit="batch",
                dynamic_ncols=True, initial=initial)


# after_batch(batches_done, partial): called after every training batch; `partial()` gives the
# epoch's running totals so far, for a checkpoint written in the middle of the epoch.
AfterBatch = Callable[[int, Callable[[], dict | None]], None]


def unsupervised_epoch(model: nn.Module, split: Split, phase: Phase, epoch: int,
                       generator: torch.Generator, progress: bool, skip: int = 0,
                       after_batch: AfterBatch | None = None) -> None:
    """One pass of the local rules over the training images; labels are never read. `skip`
    resumes the epoch after that many batches of the same order."""
    lr = phase.lr_at(epoch)
    body = model.body if hasattr(model, "body") else model
    n_batches = math.ceil(len(split) / phase.batch_size)
    with local_learning(body, lambda: lr), torch.no_grad(), \
            _bar(n_batches, f"unsupervised {epoch + 1}/{phase.epochs}", progress, skip) as bar:
        for done, (x, _) in enumerate(split.batches(phase.batch_size, generator, skip),
                                      start=skip + 1):
            body(x)
            bar.update()
            if after_batch is not None:
                after_batch(done, lambda: None)
    if any(holds_nonfinite(layer) for layer in local_layers(body)):
        raise Diverged(phase.name, epoch + 1, None)


def supervised_epoch(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                     optimizer: torch.optim.Optimizer, split: Split, phase: Phase, epoch: int,
                     generator: torch.Generator, progress: bool, first_step: int = 0,
                     partial: dict | None = None, after_batch: AfterBatch | None = None,
                     loss_limit: float | None = None) -> tuple[float, float]:
    """One optimiser pass; returns (train loss, train accuracy). Syncs with the device once.

    Losses are kept per step on the device, so a NaN, or a batch loss above `loss_limit`, is
    found at the end of the epoch with the exact step it first appeared in, without a host sync
    on every step. `partial` (from `after_batch`'s totals) resumes the epoch where a checkpoint
    left it.
    """
    model.train()
    lr = phase.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n_batches = math.ceil(len(split) / phase.batch_size)
    device = split.x.device
    losses = torch.zeros(n_batches, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    skip = 0
    if partial is not None:
        skip = len(partial["losses"])
        losses[:skip] = partial["losses"].to(device)
        correct += partial["correct"]

    def totals(done: int) -> dict:
        return {"losses": losses[:done].cpu(), "correct": int(correct)}

    with _bar(n_batches, f"supervised {epoch + 1}/{phase.epochs}", progress, skip) as bar:
        for step, (x, y) in enumerate(split.batches(phase.batch_size, generator, skip),
                                      start=skip):
            output = forward(x)
            loss = model.loss(output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if phase.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, phase.grad_clip)
            optimizer.step()
            losses[step] = loss.detach() * len(y)
            correct += (model.predict(output.detach()) == y).sum()
            bar.update()
            if after_batch is not None:
                after_batch(step + 1, lambda done=step + 1: totals(done))
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        raise Diverged(phase.name, epoch + 1, first_step + int((~finite).nonzero()[0]) + 1)
    if loss_limit is not None:
        sizes = torch.full_like(losses, phase.batch_size)
        sizes[-1] = len(split) - (n_batches - 1) * phase.batch_size
        exploded = losses > loss_limit * sizes
        if bool(exploded.any()):
            first = int(exploded.nonzero()[0])
            loss = float(losses[first] / sizes[first])
            raise Diverged(phase.name, epoch + 1, first_step + first + 1, reason=(
                f"the training loss reached {loss:.3g}, above {loss_limit:.3g} "
                f"({DIVERGENCE_FACTOR:g} times the untrained model's; lower the learning rate)"))
    return losses.sum().item() / len(split), correct.item() / len(split)


@torch.no_grad()
def evaluate(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], split: Split,
             batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    for x, y in split.batches(batch_size):
        output = forward(x)
        loss += model.loss(output, y) * len(y)
        correct += (model.predict(output) == y).sum()
    model.train(was_training)
    return loss.item() / len(split), correct.item() / len(split)


def frozen_body(model: nn.Module) -> nn.Module | None:
    """The model's body when features can be computed once: frozen, deterministic, not empty."""
    body = getattr(model, "body", None)
    if body is None or isinstance(body, nn.Identity):
        return None
    if any(p.requires_grad for p in body.parameters()):
        return None
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in body.modules()):
        return None
    return body


@torch.no_grad()
def precompute(body: nn.Module, split: Split, batch_size: int) -> Split:
    body.eval()
    features = torch.cat([body(x) for x, _ in split.batches(batch_size)])
    return Split(features, split.y)


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


def fit(model: nn.Module, data: Dataset, schedule: Schedule, recorder: RunRecorder, *,
        seed: int, eval_batch_size: int = 1000, progress: bool = False,
        checkpoint: Callable[[dict], None] | None = None, checkpoint_every_s: float = 0.0,
        stop: Callable[[], bool] | None = None, resume: dict | None = None,
        phase1_cache: Phase1Cache | None = None) -> FitResult:
    """Run `schedule` on `model`, logging one metrics row per epoch.

    `checkpoint(state)` receives the training state (position, batch-order generators, the
    epoch's running totals, optimiser, result so far, RNG, time) after every epoch, every
    `checkpoint_every_s` seconds at a batch boundary (0: never mid-epoch), and when `stop()`
    turns true, after which Interrupted is raised. `resume=state` continues from such a state
    (the model's weights must already be loaded) to the same result as an uninterrupted run:
    metrics rows written after the state are dropped first.

    Phase 1 draws its batch order from its own generator (seed + 1), phase 2 from another
    (seed), so phase 2 is the same whether phase 1 ran or its result came from `phase1_cache`.
    Raises Diverged when a loss or weight stops being finite, naming the local-rule layers that
    broke, if any; rows written so far stay on disk.
    """
    try:
        return _Fit(model, data, schedule, recorder, seed, eval_batch_size, progress,
                    checkpoint, checkpoint_every_s, stop, resume, phase1_cache).run()
    except Diverged as exc:
        if not local_layers(model) or exc.reason != NONFINITE:
            raise
        broken = broken_local_layers(model, data.train.x[:ALIGNMENT_BATCH])
        raise Diverged(exc.phase, exc.epoch, exc.step, broken) from None


class _Fit:
    """One call of `fit`: the schedule's loops and the state a checkpoint needs."""

    def __init__(self, model: nn.Module, data: Dataset, schedule: Schedule,
                 recorder: RunRecorder, seed: int, eval_batch_size: int, progress: bool,
                 checkpoint: Callable[[dict], None] | None, checkpoint_every_s: float,
                 stop: Callable[[], bool] | None, resume: dict | None,
                 phase1_cache: Phase1Cache | None):
        self.model, self.data, self.schedule, self.recorder = model, data, schedule, recorder
        self.eval_batch_size, self.progress = eval_batch_size, progress
        self.checkpoint, self.every_s, self.stop = checkpoint, checkpoint_every_s, stop
        self.phase1_cache = phase1_cache
        self.generators = {"unsupervised": torch.Generator().manual_seed(seed + 1),
                           "supervised": torch.Generator().manual_seed(seed)}
        self.epoch_rng = self.generators["unsupervised"].get_state()
        self.result, self.pos = FitResult(), Position()
        self.partial: dict | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_state: dict | None = None
        self.elapsed_before = self.phase_before = 0.0
        self.memory = PeakMemory(data.train.x.device)
        if resume is not None:
            self._restore(resume)
        self.start = self.phase_start = time.perf_counter()
        self.last_save = time.monotonic()

    # -- checkpoints

    def _restore(self, state: dict) -> None:
        self.pos = Position(**state["position"])
        self.result = FitResult(**state["result"])
        for name, rng in state["generators"].items():
            self.generators[name].set_state(rng)
        self.epoch_rng = self.generators[self.pos.phase].get_state()
        self.partial, self.optimizer_state = state["partial"], state["optimizer"]
        self.elapsed_before, self.phase_before = state["elapsed_s"], state["phase_s"]
        self.recorder.truncate_metrics(state["metrics_rows"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resuming: %s phase, epoch %d, after %s of it", self.pos.phase,
                 self.pos.epoch + 1, plural(self.pos.batch, "batch", "batches"))

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
            "result": asdict(self.result), "metrics_rows": len(self.recorder.rows),
            "elapsed_s": self.elapsed(), "phase_s": self.phase_seconds(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    def after_batch(self, done: int, partial: Callable[[], dict | None]) -> None:
        self.pos.batch = done
        if self.stop is not None and self.stop():
            self.save(partial())
            raise Interrupted()
        if self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s:
            self.save(partial())

    def boundary(self, position: Position) -> None:
        """Move to `position` (the start of an epoch), write a checkpoint, and stop here if
        asked to."""
        self.pos = position
        self.save()
        if self.stop is not None and self.stop():
            raise Interrupted()

    def begin_phase(self, phase: str) -> None:
        """Start the clock and the memory record of a phase (kept when resuming into it)."""
        if self.pos.phase != phase:
            self.pos, self.phase_before = Position(phase, 0, 0, self.pos.step), 0.0
        self.phase_start = time.perf_counter()
        self.memory.start()

    def record_phase(self, phase: Phase, samples: int) -> None:
        seconds = self.phase_seconds()
        self.result.phases.append({
            "name": phase.name, "epochs": phase.epochs, "wall_time_s": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1) if seconds else None,
            **self.memory.read()})

    # -- the schedule

    def run(self) -> FitResult:
        schedule, locals_ = self.schedule, local_layers(self.model)
        unsup = schedule.unsupervised
        has_phase1 = schedule.name == "two_phase" and unsup.epochs > 0 and bool(locals_)
        if schedule.name == "two_phase" and not locals_:
            log.info("phase 1 (unsupervised) skipped: the model has no local-rule layers")
        elif has_phase1 and self.pos.phase == "unsupervised":
            self.phase1(locals_)
        self.phase2(locals_)
        return self.result

    def phase1(self, locals_: list[LocalLayer]) -> None:
        model, unsup, train = self.model, self.schedule.unsupervised, self.data.train
        n_batches = math.ceil(len(train) / unsup.batch_size)
        fresh = self.pos == Position()
        if fresh and self.phase1_cache is not None and self.phase1_cache.load(model.body):
            log.info("phase 1 (unsupervised): loaded from the cache (%s)", self.phase1_cache.path)
            self.result.phase1_cache_hit = True
            self.result.phases.append({"name": unsup.name, "epochs": unsup.epochs,
                                       "cached": True})
            self.pos = Position("supervised", 0, 0, unsup.epochs * n_batches)  # as if it ran
            warn_unconverged(locals_)
            return
        log.info("phase 1 (unsupervised): %s, %s", plural(unsup.epochs, "epoch"),
                 plural(len(locals_), "local layer"))
        self.begin_phase("unsupervised")
        generator = self.generators["unsupervised"]
        for epoch in range(self.pos.epoch, unsup.epochs):
            self.epoch_rng = generator.get_state()
            t0, skip = time.perf_counter(), self.pos.batch
            unsupervised_epoch(model, train, unsup, epoch, generator, self.progress, skip,
                               self.after_batch)
            seconds = time.perf_counter() - t0
            step = self.pos.step + n_batches
            stats = {f"{type(layer).__name__}{i}.{k}": v
                     for i, layer in enumerate(locals_) for k, v in layer.local_stats().items()}
            self.recorder.log_metrics({
                "phase": "unsupervised", "epoch": epoch + 1, "step": step,
                "lr": unsup.lr_at(epoch), "epoch_time_s": round(seconds, 4),
                "samples_per_s": round(len(train) * (n_batches - skip) / n_batches / seconds, 1),
                "elapsed_s": round(self.elapsed(), 3), **stats})
            log.info("unsupervised epoch %d/%d: %.1fs", epoch + 1, unsup.epochs, seconds)
            if epoch + 1 < unsup.epochs:
                self.boundary(Position("unsupervised", epoch + 1, 0, step))
            else:
                self.pos = Position("unsupervised", epoch + 1, 0, step)
        self.record_phase(unsup, len(train) * unsup.epochs)
        warn_unconverged(locals_)
        if self.phase1_cache is not None:
            self.phase1_cache.save(model.body)
            self.result.phase1_cache_hit = False
        self.begin_phase("supervised")  # phase 2's clock starts at 0 in this checkpoint
        self.boundary(self.pos)

    def phase2(self, locals_: list[LocalLayer]) -> None:
        """Phase 2 (or the only phase): the optimiser trains every parameter that requires
        grad. Its cost includes computing a frozen body's features."""
        model, schedule, recorder, result = self.model, self.schedule, self.recorder, self.result
        sup, unsup, batch = schedule.supervised, schedule.unsupervised, self.eval_batch_size
        if self.pos.phase == "supervised" and self.pos.epoch >= sup.epochs > 0:
            return  # resumed from the final checkpoint: the phase is done and recorded
        self.begin_phase("supervised")
        train, test, val, forward = self.data.train, self.data.test, self.data.val, model
        body = frozen_body(model) if not (schedule.name == "one_phase" and locals_) else None
        if body is not None:
            log.info("body is frozen: computing its features once for the supervised phase")
            train, test = precompute(body, train, batch), precompute(body, test, batch)
            val = precompute(body, val, batch) if val is not None else None
            forward = model.head
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or sup.epochs == 0:
            if params:
                log.warning("schedule.supervised.epochs=0: nothing trains the %s; the accuracy "
                            "is that of the untrained one", "head" if body is not None else
                            "model")
            else:
                log.info("supervised phase skipped: no trainable parameters")
            test_loss, test_acc = evaluate(model, forward, test, batch)
            recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": self.pos.step,
                                  "test_loss": test_loss, "test_acc": test_acc,
                                  "elapsed_s": round(self.elapsed(), 3)})
            result.test_acc = result.best_test_acc = test_acc
            return
        self.optimizer = optimizer = make_optimizer(params, sup)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        probe = slice(0, min(len(train), ALIGNMENT_BATCH))  # fixed batch for alignment angles
        if self.pos.epoch == 0 and self.pos.batch == 0:
            untrained, _ = evaluate(model, forward, Split(train.x[probe], train.y[probe]),
                                    ALIGNMENT_BATCH)
            result.loss_limit = DIVERGENCE_FACTOR * max(untrained, 1.0)
            initial = alignment_angles(model, forward, train.x[probe], train.y[probe])
            if initial:  # the curve's starting point: before any update, about 90 degrees
                recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": self.pos.step,
                                      **initial})
        one_phase_local = schedule.name == "one_phase" and locals_
        if one_phase_local:
            log.info("one phase: %s learn during the supervised epochs",
                     "1 local layer" if len(locals_) == 1 else f"{len(locals_)} local layers")
        n_batches = math.ceil(len(train) / sup.batch_size)
        generator = self.generators["supervised"]
        for epoch in range(self.pos.epoch, sup.epochs):
            self.epoch_rng = generator.get_state()
            t0, skip = time.perf_counter(), self.pos.batch
            # In one phase, the local rate follows its own schedule over the supervised epochs.
            lr_local = replace(unsup, epochs=sup.epochs).lr_at(epoch)
            learning = (local_learning(model, lambda lr=lr_local: lr) if one_phase_local
                        else nullcontext())
            norms = weight_norms(locals_) if one_phase_local else None
            try:
                with learning:
                    train_loss, train_acc = supervised_epoch(
                        model, forward, optimizer, train, sup, epoch, generator, self.progress,
                        first_step=self.pos.step, partial=self.partial,
                        after_batch=self.after_batch, loss_limit=result.loss_limit)
            except Diverged as exc:
                grown = grown_local_layers(model, norms) if norms is not None else []
                if exc.reason == NONFINITE or not grown:
                    raise
                raise Diverged(exc.phase, exc.epoch, exc.step, grown, exc.reason,
                               f"grew over {DIVERGENCE_FACTOR:g}-fold in this epoch") from None
            self.partial = None
            seconds = time.perf_counter() - t0
            step = self.pos.step + n_batches
            row = {"phase": "supervised", "epoch": epoch + 1, "step": step,
                   "lr": sup.lr_at(epoch), "train_loss": train_loss, "train_acc": train_acc}
            if val is not None:
                row["val_loss"], row["val_acc"] = evaluate(model, forward, val, batch)
            row["test_loss"], row["test_acc"] = evaluate(model, forward, test, batch)
            row.update(alignment_angles(model, forward, train.x[probe], train.y[probe]))
            row.update(epoch_time_s=round(seconds, 4),
                       samples_per_s=round(len(train) * (n_batches - skip) / n_batches / seconds,
                                           1),
                       elapsed_s=round(self.elapsed(), 3))
            recorder.log_metrics(row)
            if not all(math.isfinite(row[k]) for k in ("val_loss", "test_loss") if k in row):
                # The last step of the epoch made the weights non-finite; no training loss saw it.
                raise Diverged(sup.name, epoch + 1, step)
            if result.best_test_acc is None or row["test_acc"] > result.best_test_acc:
                result.best_test_acc, result.best_epoch = row["test_acc"], epoch + 1
            result.test_acc, result.val_acc = row["test_acc"], row.get("val_acc")
            log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
                     epoch + 1, sup.epochs, train_loss, train_acc, row["test_loss"],
                     row["test_acc"], seconds)
            if epoch + 1 < sup.epochs:
                self.boundary(Position("supervised", epoch + 1, 0, step))
            else:
                self.pos = Position("supervised", epoch + 1, 0, step)
        self.record_phase(sup, len(train) * sup.epochs)
        self.save()  # the final state: resuming it trains nothing more
