"""The loops: one unsupervised epoch, one supervised epoch, evaluation.

Each loop is written out in full and syncs with the device once per epoch: losses are kept per
step on the device, so a NaN (or an exploding loss) is found at the end of the epoch together
with the exact step it first appeared in. A supervised step is the model's own
(`model.train_step(x, y, optimizer)`, see `bioexp.models.base.Classifier`), so a family that
trains differently from backprop needs no special case here.

On CUDA nothing in a loop waits for the host between batches (no `.item()`, no branch on a
tensor's value), and the phases' numerics apply here: `numerics` allows TF32 (`precision=tf32`)
for an epoch and restores the setting after it, `precision=bf16` runs each supervised step under
bf16 autocast (on the CPU too), and `cuda_graphs=true` captures an unsupervised epoch's
local-rule steps in one CUDA graph (`EpochGraph`), replayed every epoch with that epoch's batch
order and rate. Evaluation stays in fp32.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn
from tqdm import tqdm

from bioexp.data import Split
from bioexp.engine.local import holds_nonfinite, local_layers, local_learning
from bioexp.engine.schedule import SupervisedPhase, UnsupervisedPhase

# A batch loss this many times the untrained model's (at least 1) is divergence, not learning.
DIVERGENCE_FACTOR = 100.0
NONFINITE = "values became NaN or infinite"

log = logging.getLogger(__name__)

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


@contextmanager
def numerics(device: torch.device, tf32: bool) -> Iterator[None]:
    """Within the block, CUDA float32 matmuls and convolutions may use TF32 when `tf32` (the
    setting is restored after it). The CPU has no TF32: there this does nothing."""
    if not tf32 or device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch 2.9 and later
        before = (matmul.fp32_precision, conv.conv.fp32_precision)
        matmul.fp32_precision = conv.conv.fp32_precision = "tf32"
    else:
        before = (matmul.allow_tf32, conv.allow_tf32)
        matmul.allow_tf32 = conv.allow_tf32 = True
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision, conv.conv.fp32_precision = before
        else:
            matmul.allow_tf32, conv.allow_tf32 = before


def autocast(device: torch.device, precision: str):
    """bf16 autocast for `precision=bf16` (CPU or CUDA); otherwise no autocast at all."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class EpochGraph:
    """An unsupervised epoch's local-rule steps, captured once in a CUDA graph and replayed.

    Static inputs: the epoch's batch order (`order`, the permutation `Split.batches` draws from
    the same generator) and the rate (`lr`, a 0-d tensor the layers read inside the graph). The
    training images stay where they are; each captured batch gathers its rows from them. Every
    local layer must say `graph_capturable` (no host sync in its step). Capture runs one batch of
    each shape first on a side stream (warm-up), then restores the body's state."""

    def __init__(self, body: nn.Module, split: Split, batch_size: int, tf32: bool):
        self.key = (split.x.data_ptr(), len(split), batch_size, tf32)
        device = split.x.device
        self.order = torch.zeros(len(split), dtype=torch.long, device=device)
        self.lr = torch.zeros((), device=device)
        self.graph = torch.cuda.CUDAGraph()
        saved = {k: v.clone() for k, v in body.state_dict().items()}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._steps(body, split, batch_size, warm_up=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        body.load_state_dict(saved)  # copies into the same storage: the graph's addresses
        with torch.cuda.graph(self.graph):
            self._steps(body, split, batch_size)

    def _steps(self, body: nn.Module, split: Split, batch_size: int,
               warm_up: bool = False) -> None:
        starts = list(range(0, len(split), batch_size))
        if warm_up:  # one full batch and the last (maybe partial) one: every shape once
            starts = sorted({starts[0], starts[-1]})
        with local_learning(body, lambda: self.lr), torch.no_grad():
            for start in starts:
                body(split.x[self.order[start:start + batch_size]])

    def replay(self, generator: torch.Generator, lr: float) -> None:
        n = len(self.order)
        self.order.copy_(torch.randperm(n, generator=generator), non_blocking=False)
        self.lr.fill_(lr)
        self.graph.replay()


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, EpochGraph] = weakref.WeakKeyDictionary()
_EAGER: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # bodies told cuda_graphs cannot apply


def epoch_graph(body: nn.Module, split: Split, phase: UnsupervisedPhase,
                skip: int) -> EpochGraph | None:
    """The body's captured epoch when `cuda_graphs` applies: CUDA, an epoch from its start, and
    local layers that can be captured; None (eager) otherwise, with one log line why."""
    if not phase.cuda_graphs or skip > 0:
        return None
    layers = local_layers(body)
    if split.x.device.type != "cuda" or not all(getattr(m, "graph_capturable", False)
                                                for m in layers):
        if body not in _EAGER:
            _EAGER.add(body)
            log.warning("cuda_graphs=true has no effect here (%s): the epochs run eagerly",
                        "not on CUDA" if split.x.device.type != "cuda"
                        else "a local layer's step cannot be captured")
        return None
    graph = _GRAPHS.get(body)
    if graph is None or graph.key != (split.x.data_ptr(), len(split), phase.batch_size,
                                      phase.tf32):
        graph = _GRAPHS[body] = EpochGraph(body, split, phase.batch_size, phase.tf32)
    return graph


def unsupervised_epoch(body: nn.Module, split: Split, phase: UnsupervisedPhase, epoch: int,
                       generator: torch.Generator, progress: bool, skip: int = 0,
                       after_batch: AfterBatch | None = None,
                       learners: Sequence[nn.Module] | None = None) -> None:
    """One pass of the local rules of `body` over the training images; labels are never read.
    `skip` resumes the epoch after that many batches of the same order. With `cuda_graphs` on
    CUDA the epoch is one graph replay (`after_batch` then runs once, at its end). `learners`
    (a stage of a layer-by-layer phase 1) restricts learning to those local layers of `body`;
    such an epoch runs eagerly."""
    lr = phase.lr_at(epoch)
    n_batches = math.ceil(len(split) / phase.batch_size)
    with numerics(split.x.device, phase.tf32), \
            _bar(n_batches, f"unsupervised {epoch + 1}/{phase.epochs}", progress, skip) as bar:
        graph = epoch_graph(body, split, phase, skip) if learners is None else None
        if graph is not None:
            graph.replay(generator, lr)
            bar.update(n_batches)
            if after_batch is not None:
                after_batch(n_batches, lambda: None)
        else:
            with learning(body, learners, lambda: lr), torch.no_grad():
                for done, (x, _) in enumerate(split.batches(phase.batch_size, generator, skip),
                                              start=skip + 1):
                    body(x)
                    bar.update()
                    if after_batch is not None:
                        after_batch(done, lambda: None)
    if any(holds_nonfinite(layer) for layer in local_layers(body)):
        raise Diverged(phase.name, epoch + 1, None)


@contextmanager
def learning(body: nn.Module, learners: Sequence[nn.Module] | None,
             lr: Callable[[], float]) -> Iterator[None]:
    """`local_learning` of every local layer of `body`, or of `learners` alone when given."""
    if learners is None:
        with local_learning(body, lr):
            yield
        return
    with ExitStack() as stack:
        for layer in learners:  # a LocalLayer's own local_layers is itself
            stack.enter_context(local_learning(layer, lr))
        yield


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

    with _bar(n_batches, f"supervised {epoch + 1}/{phase.epochs}", progress, skip) as bar, \
            numerics(device, phase.precision == "tf32"):
        for step, (x, y) in enumerate(split.batches(phase.batch_size, generator, skip),
                                      start=skip):
            with autocast(device, phase.precision):
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
