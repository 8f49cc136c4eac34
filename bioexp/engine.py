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
from dataclasses import dataclass, fields, replace

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


class Diverged(RuntimeError):
    """The loss or a local layer's weights stopped being finite.

    `epoch` counts from 1; `step` is the global optimiser step (as in metrics.jsonl), or None
    when only the end of the epoch is known. `layers` names the local-rule layers whose weights
    or outputs are no longer finite, when that is the cause.
    """

    def __init__(self, phase: str, epoch: int, step: int | None, layers: Sequence[str] = ()):
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        message = f"{phase} training diverged at {where}: values became NaN or infinite"
        if layers:
            message += (f"; the local-rule layer {', '.join(layers)} now holds or outputs "
                        "NaN or infinite values (lower schedule.unsupervised.lr)")
        super().__init__(message)
        self.phase, self.epoch, self.step, self.layers = phase, epoch, step, list(layers)


def holds_nonfinite(module: nn.Module) -> bool:
    """Whether any tensor of the module's state (weights, buffers) has a NaN or infinity."""
    return not all(torch.isfinite(t).all() for t in module.state_dict().values())


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


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, unit="batch",
                dynamic_ncols=True)


def unsupervised_epoch(model: nn.Module, split: Split, phase: Phase, epoch: int,
                       generator: torch.Generator, progress: bool) -> None:
    """One pass of the local rules over the training images; labels are never read."""
    lr = phase.lr_at(epoch)
    body = model.body if hasattr(model, "body") else model
    n_batches = math.ceil(len(split) / phase.batch_size)
    with local_learning(body, lambda: lr), torch.no_grad(), \
            _bar(n_batches, f"unsupervised {epoch + 1}/{phase.epochs}", progress) as bar:
        for x, _ in split.batches(phase.batch_size, generator):
            body(x)
            bar.update()
    if any(holds_nonfinite(layer) for layer in local_layers(body)):
        raise Diverged(phase.name, epoch + 1, None)


def supervised_epoch(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                     optimizer: torch.optim.Optimizer, split: Split, phase: Phase, epoch: int,
                     generator: torch.Generator, progress: bool, first_step: int = 0
                     ) -> tuple[float, float]:
    """One optimiser pass; returns (train loss, train accuracy). Syncs with the device once.

    Losses are kept per step on the device, so a NaN is found at the end of the epoch with the
    exact step it first appeared in, without a host sync on every step.
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
    with _bar(n_batches, f"supervised {epoch + 1}/{phase.epochs}", progress) as bar:
        for step, (x, y) in enumerate(split.batches(phase.batch_size, generator)):
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
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        raise Diverged(phase.name, epoch + 1, first_step + int((~finite).nonzero()[0]) + 1)
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
    phases: list[dict] | None = None
    phase1_cache_hit: bool | None = None  # None when no phase-1 cache was given


def fit(model: nn.Module, data: Dataset, schedule: Schedule, recorder: RunRecorder, *,
        seed: int, eval_batch_size: int = 1000, progress: bool = False,
        checkpoint: Callable[[dict], None] | None = None,
        phase1_cache: Phase1Cache | None = None) -> FitResult:
    """Run `schedule` on `model`, logging one metrics row per epoch and checkpointing each epoch.

    Phase 1 draws its batch order from its own generator (seed + 1), phase 2 from another
    (seed), so phase 2 is the same whether phase 1 ran or its result came from `phase1_cache`.
    Raises Diverged when a loss or weight stops being finite, naming the local-rule layers that
    broke, if any; rows written so far stay on disk.
    """
    try:
        return _fit(model, data, schedule, recorder, seed=seed, eval_batch_size=eval_batch_size,
                    progress=progress, checkpoint=checkpoint, phase1_cache=phase1_cache)
    except Diverged as exc:
        if not local_layers(model):
            raise
        broken = broken_local_layers(model, data.train.x[:ALIGNMENT_BATCH])
        raise Diverged(exc.phase, exc.epoch, exc.step, broken) from None


def _fit(model: nn.Module, data: Dataset, schedule: Schedule, recorder: RunRecorder, *,
         seed: int, eval_batch_size: int, progress: bool,
         checkpoint: Callable[[dict], None] | None,
         phase1_cache: Phase1Cache | None) -> FitResult:
    generator = torch.Generator().manual_seed(seed)
    result = FitResult(phases=[])
    start = time.perf_counter()
    step = 0
    locals_ = local_layers(model)
    unsup, sup = schedule.unsupervised, schedule.supervised

    memory = PeakMemory(data.train.x.device)

    def record_phase(phase: Phase, seconds: float, samples: int) -> None:
        result.phases.append({"name": phase.name, "epochs": phase.epochs,
                              "wall_time_s": round(seconds, 3),
                              "samples_per_s": round(samples / seconds, 1) if seconds else None,
                              **memory.read()})

    if schedule.name == "two_phase" and not locals_:
        log.info("phase 1 (unsupervised) skipped: the model has no local-rule layers")
    elif schedule.name == "two_phase" and unsup.epochs > 0 and phase1_cache is not None \
            and phase1_cache.load(model.body):
        log.info("phase 1 (unsupervised): loaded from the cache (%s)", phase1_cache.path)
        result.phase1_cache_hit = True
        result.phases.append({"name": unsup.name, "epochs": unsup.epochs, "cached": True})
        step += unsup.epochs * math.ceil(len(data.train) / unsup.batch_size)  # as if it ran
    elif schedule.name == "two_phase" and unsup.epochs > 0:
        log.info("phase 1 (unsupervised): %d epochs, %d local layers", unsup.epochs, len(locals_))
        phase1_generator = torch.Generator().manual_seed(seed + 1)
        phase_start = time.perf_counter()
        memory.start()
        for epoch in range(unsup.epochs):
            t0 = time.perf_counter()
            unsupervised_epoch(model, data.train, unsup, epoch, phase1_generator, progress)
            seconds = time.perf_counter() - t0
            step += math.ceil(len(data.train) / unsup.batch_size)
            stats = {f"{type(layer).__name__}{i}.{k}": v
                     for i, layer in enumerate(locals_) for k, v in layer.local_stats().items()}
            recorder.log_metrics({"phase": "unsupervised", "epoch": epoch + 1, "step": step,
                                  "lr": unsup.lr_at(epoch), "epoch_time_s": round(seconds, 4),
                                  "samples_per_s": round(len(data.train) / seconds, 1),
                                  "elapsed_s": round(time.perf_counter() - start, 3), **stats})
            log.info("unsupervised epoch %d/%d: %.1fs", epoch + 1, unsup.epochs, seconds)
            if checkpoint:
                checkpoint({"phase": "unsupervised", "epoch": epoch + 1})
        record_phase(unsup, time.perf_counter() - phase_start, len(data.train) * unsup.epochs)
        if phase1_cache is not None:
            phase1_cache.save(model.body)
            result.phase1_cache_hit = False

    # Phase 2 (or the only phase): the optimiser trains every parameter that requires grad.
    # Its cost includes computing a frozen body's features.
    phase_start = time.perf_counter()
    memory.start()
    train, test, val, forward = data.train, data.test, data.val, model
    body = frozen_body(model) if not (schedule.name == "one_phase" and locals_) else None
    if body is not None:
        log.info("body is frozen: computing its features once for the supervised phase")
        train = precompute(body, train, eval_batch_size)
        test = precompute(body, test, eval_batch_size)
        val = precompute(body, val, eval_batch_size) if val is not None else None
        forward = model.head
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or sup.epochs == 0:
        log.info("supervised phase skipped: %s", "no trainable parameters" if not params
                 else "schedule.supervised.epochs is 0")
        test_loss, test_acc = evaluate(model, forward, test, eval_batch_size)
        recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": step,
                              "test_loss": test_loss, "test_acc": test_acc,
                              "elapsed_s": round(time.perf_counter() - start, 3)})
        result.test_acc = result.best_test_acc = test_acc
        return result
    optimizer = make_optimizer(params, sup)
    probe = slice(0, min(len(train), ALIGNMENT_BATCH))  # fixed batch for alignment angles
    initial_angles = alignment_angles(model, forward, train.x[probe], train.y[probe])
    if initial_angles:  # the curve's starting point: before any update, about 90 degrees
        recorder.log_metrics({"phase": "supervised", "epoch": 0, "step": step, **initial_angles})
    one_phase_local = schedule.name == "one_phase" and locals_
    if one_phase_local:
        log.info("one phase: %d local layers learn during the supervised epochs", len(locals_))
    for epoch in range(sup.epochs):
        t0 = time.perf_counter()
        # In one phase, the local rate follows its own schedule over the supervised epochs.
        lr_local = replace(unsup, epochs=sup.epochs).lr_at(epoch)
        learning = (local_learning(model, lambda lr=lr_local: lr) if one_phase_local
                    else nullcontext())
        with learning:
            train_loss, train_acc = supervised_epoch(model, forward, optimizer, train, sup, epoch,
                                                     generator, progress, first_step=step)
        seconds = time.perf_counter() - t0
        step += math.ceil(len(train) / sup.batch_size)
        row = {"phase": "supervised", "epoch": epoch + 1, "step": step, "lr": sup.lr_at(epoch),
               "train_loss": train_loss, "train_acc": train_acc}
        if val is not None:
            row["val_loss"], row["val_acc"] = evaluate(model, forward, val, eval_batch_size)
        row["test_loss"], row["test_acc"] = evaluate(model, forward, test, eval_batch_size)
        row.update(alignment_angles(model, forward, train.x[probe], train.y[probe]))
        row.update(epoch_time_s=round(seconds, 4), samples_per_s=round(len(train) / seconds, 1),
                   elapsed_s=round(time.perf_counter() - start, 3))
        recorder.log_metrics(row)
        if not all(math.isfinite(row[k]) for k in ("val_loss", "test_loss") if k in row):
            # The last step of the epoch made the weights non-finite; no training loss saw it.
            raise Diverged(sup.name, epoch + 1, step)
        if result.best_test_acc is None or row["test_acc"] > result.best_test_acc:
            result.best_test_acc, result.best_epoch = row["test_acc"], epoch + 1
        result.test_acc, result.val_acc = row["test_acc"], row.get("val_acc")
        log.info("epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
                 epoch + 1, sup.epochs, train_loss, train_acc, row["test_loss"], row["test_acc"],
                 seconds)
        if checkpoint:
            checkpoint({"phase": "supervised", "epoch": epoch + 1,
                        "optimizer": optimizer.state_dict()})
    record_phase(sup, time.perf_counter() - phase_start, len(train) * sup.epochs)
    return result
