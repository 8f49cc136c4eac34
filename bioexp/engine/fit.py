"""`fit`: a schedule's phases, written out.

Phase 1 (`two_phase` only, for models with local-rule layers) lets the local rules learn
without labels for `schedule.unsupervised.epochs`, or loads their result from the phase-1 cache;
a model that declares stages (`Classifier.phase1_stages`) has its layers learn one stage after
another, each for those epochs. Phase 2 trains every parameter that requires grad with the
model's own training step and the configured optimiser and learning-rate schedule; when the body
is frozen and deterministic, the model first sees the training images once
(`Classifier.prepare_features`: e.g. BatchNorm statistics), then its features are computed once
and the head trains on them. In `one_phase` the local layers learn
on every forward pass of phase 2. After each supervised epoch a metrics row records the losses
and accuracies, and models with feedback layers their alignment angles.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from bioexp.alignment import alignment_angles
from bioexp.cache import Phase1Cache
from bioexp.data import Dataset, Split
from bioexp.engine.local import (
    broken_local_layers,
    grown_local_layers,
    local_layers,
    local_learning,
    warn_unconverged,
    weight_norms,
)
from bioexp.engine.loops import (
    DIVERGENCE_FACTOR,
    NONFINITE,
    Diverged,
    evaluate,
    frozen_body,
    precompute,
    supervised_epoch,
    unsupervised_epoch,
)
from bioexp.engine.schedule import Schedule, SupervisedPhase
from bioexp.engine.state import FitResult, FitState, Position
from bioexp.records import RunRecorder

log = logging.getLogger(__name__)

ALIGNMENT_BATCH = 512  # training images on which alignment angles and the untrained loss are met


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`1 epoch`, `2 epochs`; `nouns` for irregular plurals (`batch`, `batches`)."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


@dataclass(frozen=True)
class Job:
    """What one `fit` call trains, on what, and how it reports."""

    model: nn.Module
    data: Dataset
    schedule: Schedule
    recorder: RunRecorder
    eval_batch_size: int = 1000
    progress: bool = False


def fit(model: nn.Module, data: Dataset, schedule: Schedule, recorder: RunRecorder, *,
        seed: int, eval_batch_size: int = 1000, progress: bool = False,
        checkpoint=None, checkpoint_every_s: float = 0.0, stop=None, resume: dict | None = None,
        phase1_cache: Phase1Cache | None = None) -> FitResult:
    """Run `schedule` on `model`, logging one metrics row per epoch; return the result.

    `checkpoint(state)` receives the training state (see `FitState`) before the first step,
    after every epoch, every `checkpoint_every_s` seconds at a batch boundary (0: never
    mid-epoch), and when `stop()` turns true, after which Interrupted is raised. `resume=state`
    continues from such a state (the model's weights must already be loaded) to the same result
    as an uninterrupted run.
    Raises Diverged when a loss or weight stops being finite or the loss explodes, naming the
    local-rule layers to blame, if any; rows written so far stay on disk.
    """
    job = Job(model, data, schedule, recorder, eval_batch_size, progress)
    state = FitState(recorder, seed, data.train.x.device, checkpoint, checkpoint_every_s, stop)
    if resume is not None:
        state.restore(resume)
        log.info("resuming: %s phase, epoch %d, after %s of it", state.pos.phase,
                 state.pos.epoch + 1, plural(state.pos.batch, "batch", "batches"))
    else:  # a checkpoint from the start, with the run's config: a run that dies or diverges
        state.save()  # in its first epoch is known to its folder, and is not trained again
    try:
        if has_phase1(model, schedule) and state.pos.phase == "unsupervised":
            phase1(job, state, phase1_cache)
        elif schedule.name == "two_phase" and not local_layers(model):
            log.info("phase 1 (unsupervised) skipped: the model has no local-rule layers")
        elif not schedule.local_rules:
            log.info("a control: the local-rule layers do not learn")
        phase2(job, state)
    except Diverged as exc:
        if not local_layers(model) or exc.reason != NONFINITE:
            raise
        broken = broken_local_layers(model, data.train.x[:ALIGNMENT_BATCH])
        raise Diverged(exc.phase, exc.epoch, exc.step, broken) from None
    return state.result


def has_phase1(model: nn.Module, schedule: Schedule) -> bool:
    """Whether `schedule` trains local-rule layers of `model` before its supervised phase."""
    return (schedule.name == "two_phase" and schedule.unsupervised.epochs > 0
            and schedule.local_rules and bool(local_layers(model)) and hasattr(model, "body"))


def learns_locally(model: nn.Module, schedule: Schedule) -> list[nn.Module]:
    """The local-rule layers that learn during the supervised phase (one phase), else []."""
    if schedule.name != "one_phase" or not schedule.local_rules:
        return []
    return local_layers(model)


def phase1(job: Job, state: FitState, cache: Phase1Cache | None) -> None:
    """Phase 1 from its start holds the cache entry's lock while it looks in the cache and,
    on a miss, trains and saves, so that parallel jobs needing the same entry train it once:
    the others wait, then load it. A resumed phase 1 never waits (it cannot use the entry)."""
    if cache is None or state.pos != Position():
        train_phase1(job, state, cache)
        return
    with cache.lock(state.stop):
        train_phase1(job, state, cache)


def train_phase1(job: Job, state: FitState, cache: Phase1Cache | None) -> None:
    """The local rules learn without labels; the body is then saved to (or came from) the
    phase-1 cache."""
    model, unsup, train = job.model, job.schedule.unsupervised, job.data.unsupervised
    locals_ = local_layers(model)
    n_batches = math.ceil(len(train) / unsup.batch_size)
    stages = phase1_stages(model)
    total = unsup.epochs * max(len(stages), 1)  # epochs of all stages, one after another
    if state.pos == Position() and cache is not None and cache.load(model.body):
        log.info("phase 1 (unsupervised): loaded from the cache (%s)", cache.path)
        state.result.phase1_cache_hit = True
        state.result.phases.append({"name": unsup.name, "epochs": total, "cached": True})
        state.pos = Position("supervised", 0, 0, total * n_batches)  # as if it ran
        # The phase's last row, as training it would end (its statistics are the loaded
        # layers'), so that compare, plots and loggers see phase 1 in this run too.
        job.recorder.log_metrics({
            "phase": "unsupervised", "epoch": total, "step": state.pos.step,
            **({"stage": len(stages)} if stages else {}),
            "lr": unsup.lr_at(unsup.epochs - 1), "cached": True,
            "elapsed_s": round(state.elapsed(), 3), **local_statistics(locals_)})
        warn_unconverged(locals_)
        return
    log.info("phase 1 (unsupervised): %s, %s%s", plural(unsup.epochs, "epoch"),
             plural(len(locals_), "local layer"),
             f", one stage after another ({len(stages)} stages)" if stages else "")
    state.begin_phase("unsupervised")
    generator = state.generators["unsupervised"]
    for epoch in range(state.pos.epoch, total):
        state.start_epoch(generator)
        t0, skip = time.perf_counter(), state.pos.batch
        # Stage s, epoch e of E is epoch s * E + e of the phase (Classifier.phase1_stages).
        stage, stage_epoch = divmod(epoch, unsup.epochs)
        if stages:
            unsupervised_epoch(stages[stage].forward, train, unsup, stage_epoch, generator,
                               job.progress, skip, state.after_batch,
                               learners=stages[stage].learners)
        else:
            unsupervised_epoch(getattr(model, "body", model), train, unsup, epoch, generator,
                               job.progress, skip, state.after_batch)
        seconds = time.perf_counter() - t0
        step = state.pos.step + n_batches
        job.recorder.log_metrics({
            "phase": "unsupervised", "epoch": epoch + 1, "step": step,
            **({"stage": stage + 1} if stages else {}),
            "lr": unsup.lr_at(stage_epoch), "epoch_time_s": round(seconds, 4),
            "samples_per_s": round(len(train) * (n_batches - skip) / n_batches / seconds, 1),
            "elapsed_s": round(state.elapsed(), 3), **local_statistics(locals_)})
        log.info("unsupervised epoch %d/%d%s: %.1fs", epoch + 1, total,
                 f" (stage {stage + 1}/{len(stages)})" if stages else "", seconds)
        state.boundary(Position("unsupervised", epoch + 1, 0, step),
                       last=epoch + 1 == total)
    state.record_phase(unsup.name, total, len(train) * total)
    warn_unconverged(locals_)
    if cache is not None:
        cache.save(model.body)
        state.result.phase1_cache_hit = False
    state.begin_phase("supervised")  # phase 2's clock starts at 0 in this checkpoint
    state.boundary(state.pos)


def phase1_stages(model: nn.Module) -> tuple:
    """The model's layer-by-layer stages of phase 1 (`Classifier.phase1_stages`); empty when
    every local layer learns at once."""
    stages = getattr(model, "phase1_stages", None)
    return tuple(stages()) if stages is not None else ()


def local_statistics(layers: list[nn.Module]) -> dict[str, float]:
    """Each local layer's `local_stats`, keyed like `KrotovLayer0.units_converged`."""
    return {f"{type(layer).__name__}{i}.{k}": v
            for i, layer in enumerate(layers) for k, v in layer.local_stats().items()}


@dataclass(frozen=True)
class Splits:
    """What phase 2 trains and evaluates on: images, or a frozen body's features."""

    train: Split
    test: Split
    val: Split | None


def phase2_inputs(job: Job) -> tuple[Splits, nn.Module | None]:
    """The splits phase 2 sees, and the frozen body whose features they are (None: images)."""
    data, model = job.data, job.model
    body = None if learns_locally(model, job.schedule) else frozen_body(model)
    if body is None:
        return Splits(data.train, data.test, data.val), None
    log.info("body is frozen: computing its features once for the supervised phase")
    batch = job.eval_batch_size
    prepare = getattr(model, "prepare_features", None)
    if prepare is not None:  # e.g. BatchNorm statistics of the training images (models.base)
        prepare(x for x, _ in data.unsupervised.batches(batch))
    val = precompute(body, data.val, batch) if data.val is not None else None
    return Splits(precompute(body, data.train, batch), precompute(body, data.test, batch),
                  val), body


def phase2(job: Job, state: FitState) -> None:
    """Phase 2 (or the only phase): the model's training step with the optimiser trains every
    parameter that requires grad. Its cost includes computing a frozen body's features."""
    model, sup = job.model, job.schedule.supervised
    if state.pos.phase == "supervised" and state.pos.epoch >= sup.epochs > 0:
        return  # resumed from the final checkpoint: the phase is done and recorded
    state.begin_phase("supervised")
    splits, body = phase2_inputs(job)
    with model.on_features() if body is not None else nullcontext():
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or sup.epochs == 0:
            untrained(job, state, splits, has_params=bool(params), body=body)
            return
        _, scheduler = make_optimizer(state, sup, params)
        probe = Split(splits.train.x[:ALIGNMENT_BATCH], splits.train.y[:ALIGNMENT_BATCH])
        if state.pos.epoch == 0 and state.pos.batch == 0:
            first_row(job, state, probe)
        local = learns_locally(model, job.schedule)
        if local:
            log.info("one phase: %s learn during the supervised epochs",
                     plural(len(local), "local layer"))
        for epoch in range(state.pos.epoch, sup.epochs):
            supervised_phase_epoch(job, state, splits, probe, epoch, local)
            with warnings.catch_warnings():  # a family may update without optimizer.step()
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                scheduler.step()
            state.boundary(Position("supervised", epoch + 1, 0, state.pos.step +
                                    math.ceil(len(splits.train) / sup.batch_size)),
                           last=epoch + 1 == sup.epochs)
    state.record_phase(sup.name, sup.epochs, len(splits.train) * sup.epochs)
    state.save()  # the final state: resuming it trains nothing more


def make_optimizer(state: FitState, sup: SupervisedPhase, params: list[nn.Parameter]
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The phase's optimiser and learning-rate schedule (constant when none is configured),
    with their state when resuming; gradient clipping, when asked for, runs before every
    optimiser step, whoever calls it."""
    optimizer = sup.optimizer(params, lr=sup.lr)
    if sup.grad_clip > 0:

        def clip(*_) -> None:  # a step pre-hook that returns anything but None is an error
            nn.utils.clip_grad_norm_(params, sup.grad_clip)

        optimizer.register_step_pre_hook(clip)
    scheduler = (sup.lr_schedule(optimizer) if sup.lr_schedule is not None
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0))
    if state.saved_optimizer is not None:
        optimizer.load_state_dict(state.saved_optimizer)
    if state.saved_scheduler is not None:
        scheduler.load_state_dict(state.saved_scheduler)
    state.optimizer, state.scheduler = optimizer, scheduler
    return optimizer, scheduler


def first_row(job: Job, state: FitState, probe: Split) -> None:
    """Before the first step: the untrained model's training loss on the probe (the scale of
    the `loss` its steps report, see `Classifier.train_step`) sets the divergence limit, and
    models with feedback layers log their starting angles (epoch 0)."""
    model = job.model
    state.result.loss_limit = DIVERGENCE_FACTOR * max(untrained_loss(model, probe), 1.0)
    angles = alignment_angles(model, probe.x, probe.y)
    if angles:  # the curve's starting point: before any update, about 90 degrees
        job.recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": state.pos.step,
                                  **angles})


def untrained_loss(model: nn.Module, probe: Split) -> float:
    """`model.training_loss` on the probe, in eval mode, leaving the random state as it was
    (a family may draw, as Forward-Forward draws its negative labels)."""
    was_training = model.training
    devices = [probe.x.device] if probe.x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        model.eval()
        loss = model.training_loss(probe.x, probe.y).item()
    model.train(was_training)
    return loss


def untrained(job: Job, state: FitState, splits: Splits, has_params: bool,
              body: nn.Module | None) -> None:
    """Phase 2 with nothing to train (no parameters, or no epochs): one evaluation row."""
    if has_params:
        log.warning("schedule.supervised.epochs=0: nothing trains the %s; the accuracy is that "
                    "of the untrained one", "head" if body is not None else "model")
    else:
        log.info("supervised phase skipped: no trainable parameters")
    test_loss, test_acc = evaluate(job.model, splits.test, job.eval_batch_size)
    job.recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": state.pos.step,
                              "test_loss": test_loss, "test_acc": test_acc,
                              "elapsed_s": round(state.elapsed(), 3)})
    state.result.test_acc = state.result.best_test_acc = test_acc


def supervised_phase_epoch(job: Job, state: FitState, splits: Splits, probe: Split,
                           epoch: int, local: list[nn.Module]) -> None:
    """One supervised epoch and its metrics row; in one phase the local layers learn too, at
    their own rate annealed over the supervised epochs."""
    model, sup, unsup = job.model, job.schedule.supervised, job.schedule.unsupervised
    generator = state.generators["supervised"]
    state.start_epoch(generator)
    t0, skip = time.perf_counter(), state.pos.batch
    lr = state.optimizer.param_groups[0]["lr"]
    rate = unsup.lr_at(epoch, sup.epochs)
    norms = weight_norms(local) if local else None
    try:
        with local_learning(model, lambda: rate) if local else nullcontext():
            train = supervised_epoch(model, state.optimizer, splits.train, sup, epoch,
                                     generator, job.progress, first_step=state.pos.step,
                                     partial=state.partial, after_batch=state.after_batch,
                                     loss_limit=state.result.loss_limit)
    except Diverged as exc:
        grown = grown_local_layers(model, norms, DIVERGENCE_FACTOR) if norms else []
        if exc.reason == NONFINITE or not grown:
            raise
        raise Diverged(exc.phase, exc.epoch, exc.step, grown, exc.reason,
                       f"grew over {DIVERGENCE_FACTOR:g}-fold in this epoch") from None
    state.partial = None
    log_epoch(job, state, splits, probe, epoch, train, lr, time.perf_counter() - t0, skip)


def log_epoch(job: Job, state: FitState, splits: Splits, probe: Split, epoch: int,
              train: dict, lr: float, seconds: float, skip: int) -> None:
    """The epoch's metrics row (validation, test, alignment, costs), the best accuracy so far,
    and a log line; Diverged when the last step left the weights non-finite."""
    model, sup, result, batch = job.model, job.schedule.supervised, state.result, \
        job.eval_batch_size
    n_batches = math.ceil(len(splits.train) / sup.batch_size)
    step = state.pos.step + n_batches
    row = {"phase": "supervised", "epoch": epoch + 1, "step": step, "lr": lr, **train}
    if splits.val is not None:
        row["val_loss"], row["val_acc"] = evaluate(model, splits.val, batch)
    row["test_loss"], row["test_acc"] = evaluate(model, splits.test, batch)
    row.update(alignment_angles(model, probe.x, probe.y))
    row.update(epoch_time_s=round(seconds, 4),
               samples_per_s=round(len(splits.train) * (n_batches - skip) / n_batches / seconds,
                                   1),
               elapsed_s=round(state.elapsed(), 3))
    job.recorder.log_metrics(row)
    if not all(math.isfinite(row[k]) for k in ("val_loss", "test_loss") if k in row):
        # The last step of the epoch made the weights non-finite; no training loss saw it.
        raise Diverged(sup.name, epoch + 1, step)
    if result.best_test_acc is None or row["test_acc"] > result.best_test_acc:
        result.best_test_acc, result.best_epoch = row["test_acc"], epoch + 1
    result.test_acc, result.val_acc = row["test_acc"], row.get("val_acc")
    log.info("epoch %d/%d: train loss %.4f acc %s | test loss %.4f acc %.4f | %.1fs",
             epoch + 1, sup.epochs, row["train_loss"],
             "n/a" if row["train_acc"] is None else f"{row['train_acc']:.4f}",
             row["test_loss"], row["test_acc"], seconds)
