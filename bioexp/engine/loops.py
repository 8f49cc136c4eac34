"""The loops: one unsupervised epoch, one supervised epoch, evaluation.

Each loop is written out in full and syncs with the device once per epoch: losses are kept per
step on the device, so a NaN (or an exploding loss) is found at the end of the epoch together
with the exact step it first appeared in. A supervised step is the model's own
(`model.train_step(x, y, optimizer)`, see `bioexp.models.base.Classifier`), so a family that
trains differently from backprop needs no special case here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from bioexp.data import Split
from bioexp.engine.local import holds_nonfinite, local_layers, local_learning
from bioexp.engine.schedule import SupervisedPhase, UnsupervisedPhase

# A batch loss this many times the untrained model's (at least 1) is divergence, not learning.
DIVERGENCE_FACTOR = 100.0
NONFINITE = "values became NaN or infinite"

# after_batch(batches_done, partial): called after every training batch; `partial()` gives the
# epoch's running totals so far, for a checkpoint written in the middle of the epoch.
AfterBatch = Callable[[int, Callable[[], dict | None]], None]


class Diverged(RuntimeError):
    """The loss or a local layer's weights stopped being finite, or the loss exploded.

    `epoch` counts from 1; `step` is the global optimiser step (as in metrics.jsonl), or None
    when only the end of the epoch is known. `layers` names the local-rule layers to blame, when
    known; `reason` says what happened, `layer_problem` what happened to those layers.
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


def _bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, unit="batch",
                dynamic_ncols=True, initial=initial)


def unsupervised_epoch(body: nn.Module, split: Split, phase: UnsupervisedPhase, epoch: int,
                       generator: torch.Generator, progress: bool, skip: int = 0,
                       after_batch: AfterBatch | None = None) -> None:
    """One pass of the local rules of `body` over the training images; labels are never read.
    `skip` resumes the epoch after that many batches of the same order."""
    lr = phase.lr_at(epoch)
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


def supervised_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split,
                     phase: SupervisedPhase, epoch: int, generator: torch.Generator,
                     progress: bool, first_step: int = 0, partial: dict | None = None,
                     after_batch: AfterBatch | None = None,
                     loss_limit: float | None = None) -> dict[str, float | None]:
    """One pass of the model's training step over the training split. Returns `train_loss`,
    `train_acc` (None when the step reports no `correct`) and the epoch's mean of any other
    metric the step reports, as `train_<name>`. `partial` (from `after_batch`'s totals) resumes
    the epoch where a checkpoint left it; Diverged names the first bad step."""
    model.train()
    n_batches = math.ceil(len(split) / phase.batch_size)
    device = split.x.device
    losses = torch.zeros(n_batches, device=device)  # per step: the batch's summed loss
    sums: dict[str, torch.Tensor] = {}  # `correct` counted, other metrics summed over samples
    skip = 0
    if partial is not None:
        skip = len(partial["losses"])
        losses[:skip] = partial["losses"].to(device)
        sums = {k: v.to(device) for k, v in partial["sums"].items()}

    def totals(done: int) -> dict:
        return {"losses": losses[:done].cpu(), "sums": {k: v.cpu() for k, v in sums.items()}}

    with _bar(n_batches, f"supervised {epoch + 1}/{phase.epochs}", progress, skip) as bar:
        for step, (x, y) in enumerate(split.batches(phase.batch_size, generator, skip),
                                      start=skip):
            metrics = model.train_step(x, y, optimizer)
            losses[step] = metrics.pop("loss") * len(y)
            for name, value in metrics.items():
                value = value if name == "correct" else value * len(y)
                sums[name] = sums[name] + value if name in sums else value
            bar.update()
            if after_batch is not None:
                after_batch(step + 1, lambda done=step + 1: totals(done))
    check_losses(losses, len(split), phase, epoch, first_step, loss_limit)
    n = len(split)
    result = {"train_loss": losses.sum().item() / n,
              "train_acc": sums.pop("correct").item() / n if "correct" in sums else None}
    return {**result, **{f"train_{k}": v.item() / n for k, v in sums.items()}}


def check_losses(losses: torch.Tensor, n: int, phase: SupervisedPhase, epoch: int,
                 first_step: int, loss_limit: float | None) -> None:
    """Diverged at the first step whose loss (summed over its batch of a split of `n`) is not
    finite, or whose mean is above `loss_limit`."""
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        raise Diverged(phase.name, epoch + 1, first_step + int((~finite).nonzero()[0]) + 1)
    if loss_limit is None:
        return
    sizes = torch.full_like(losses, phase.batch_size)
    sizes[-1] = n - (len(losses) - 1) * phase.batch_size
    exploded = losses > loss_limit * sizes
    if bool(exploded.any()):
        first = int(exploded.nonzero()[0])
        loss = float(losses[first] / sizes[first])
        raise Diverged(phase.name, epoch + 1, first_step + first + 1, reason=(
            f"the training loss reached {loss:.3g}, above {loss_limit:.3g} "
            f"({DIVERGENCE_FACTOR:g} times the untrained model's; lower the learning rate)"))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    for x, y in split.batches(batch_size):
        output = model(x)
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
