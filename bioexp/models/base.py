"""The shape every registered model shares: a body, then a head, and its training step.

The body holds the layers that local rules train (it is the identity for backprop baselines); the
head is what the optimiser trains. The split lets the engine train local layers without running
the head, and, once the body is frozen, train the head on features computed once.

The training-step protocol: the engine trains a model one supervised batch at a time by calling
`model.train_step(x, y, optimizer)`, which updates the model and returns its metrics as 0-d
tensors on the device (no host sync):

- `loss` (required): the batch mean of the objective the step minimises, computed before the
  update; it must equal `model.training_loss(x, y)` on the same batch and random state. The
  engine sets its divergence limit from `training_loss` of the untrained model on a probe batch
  (100 times it, at least 100) and compares every step's `loss` with that limit, so the two must
  share one scale; a family whose objective is not `model.loss` (Forward-Forward's sum of layer
  losses) overrides both.
- `correct` (optional): a count of right predictions, for the training accuracy.
- any other name: averaged over the epoch into metrics.jsonl as `train_<name>`.

The default step is backprop's (forward, `loss`, backward, one optimiser step), which also serves
every family whose layers only change the backward pass (FA, sign-symmetry, DFA). A family that
trains otherwise (a loss per layer, its own plasticity, feedback weights that learn) overrides
`train_step`; state it keeps between steps belongs in buffers or in `get_extra_state`, so that
it is checkpointed and resumed with the weights.

A family whose rule is not the gradient of a loss through the network (predictive coding,
equilibrium propagation) still trains through the optimiser: its `train_step` writes the rule's
update, as minus a gradient, into each parameter's `.grad` and calls `optimizer.step()` (more
than once a batch if the rule updates during an inner loop). The phase's optimiser, rate
schedule, gradient clipping and checkpoints then serve it as they serve backprop, and the
parameters it trains count as trainable (a model with none has its supervised phase skipped).
What such a family must keep in mind:

- evaluation, feature precomputation and the divergence probe run under `torch.no_grad()`:
  `forward` (the prediction, a settling loop included) must not need autograd. Write an inner
  loop's dynamics out rather than taking them from `torch.autograd.grad`.
- `train_step` gets the batch and the optimiser only: anything that must change from step to
  step (a counter, an annealed constant) is state of the model, checkpointed with it.
- the `loss` it reports is measured on `model.loss`'s scale (the divergence limit is 100 times
  the untrained model's `training_loss`); an energy at equilibrium is not, a loss of the
  prediction is.
- forward hooks fire on every call: a local-rule layer (`LocalLayer`) in one phase would apply
  its rule at every step of an inner loop, so inner loops use plain `nn.Linear` layers; the
  representation `bioexp eval` pictures is the input of the last layer at its last call.
- `rule_gradients(x, y)`: the update direction its rule would take on a batch, as a gradient per
  parameter name, without updating; the engine logs its angle to backprop's gradient of
  `loss(model(x), y)` every epoch (`bioexp.alignment`), as it does for feedback layers. None
  (the default) for families whose update is their own backward pass.

Two hooks shape what the engine does around the supervised phase; their defaults change nothing:

- `phase1_stages()`: how phase 1 trains the body's local-rule layers. Empty (the default): all
  of them learn together, from the same pass over the images, for schedule.unsupervised.epochs.
  A list of `Stage`s: layer by layer, one stage after another, each for
  schedule.unsupervised.epochs; in a stage the engine runs `stage.forward` (the body up to the
  layers it trains) on the images, and only `stage.learners` apply their rule, while every
  other layer stays as it is. Checkpoints count the epochs of all stages in one sequence
  (stage s, epoch e of E is epoch s * E + e of phase 1), so a run stopped in any stage
  resumes exactly, and the phase-1 cache key names the stages.
- `prepare_features(batches)`: called once before the engine computes a frozen body's features
  for phase 2, with the training images in a fixed order: a body whose normalisation keeps
  statistics of its inputs (BatchNorm's running statistics) sets them here, so that a trained
  body and an untrained control are both normalised by the statistics of the training data.
  With `norm_statistics=True` the Classifier recomputes the running statistics of every
  BatchNorm of its body in one pass (`refit_batch_norm`); nothing by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.errors import ConfigError
from bioexp.registry import Range

ActivationName = Literal["relu", "tanh", "sigmoid", "gelu", "none"]
"""The type hint of an `activation` hyperparameter: the names `make_activation` knows."""
ACTIVATIONS = dict(zip(get_args(ActivationName),
                       (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity), strict=True))
# Hyperparameter types with their ranges, checked by the registry before a model is built.
Sizes = Annotated[Sequence[int], Range(low=1)]  # widths of layers, each at least 1
"""The type hint of a list of layer widths, each at least 1 (the list may be empty)."""
Probability = Annotated[float, Range(0, 1, high_open=True)]  # a dropout rate
"""The type hint of a dropout rate: a float in [0, 1)."""


Layers = Annotated[Sequence[int], Range(low=1, min_len=1)]
"""The type hint of a non-empty list of layer widths, each at least 1."""
Count = Annotated[int, Range(low=1)]
"""The type hint of a count of at least 1: settling or inference steps."""
Positive = Annotated[float, Range(low=0, low_open=True)]
"""The type hint of a float above 0: a rate, a temperature, a nudging strength."""
Positives = Annotated[Sequence[float], Range(low=0, low_open=True)]
"""The type hint of a list of floats above 0, one per layer."""


def make_activation(name: str) -> nn.Module:
    """A new activation module by name (`none` is the identity).

    Args:
        name: One of `ActivationName`.

    Returns:
        The module: `nn.ReLU()`, `nn.Tanh()`, `nn.Sigmoid()`, `nn.GELU()` or `nn.Identity()`.

    Raises:
        ConfigError: `name` is none of them.
    """
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


@dataclass(frozen=True)
class Stage:
    """One stage of a layer-by-layer phase 1 (see the module's docstring): the engine runs
    `forward` on the images and lets only the local-rule layers `learners` (inside it) learn.

    Attributes:
        forward: The body up to and including the layers this stage trains, called on a batch
            of images under `torch.no_grad()`.
        learners: The `LocalLayer`s inside `forward` whose rule runs in this stage; every other
            layer keeps its weights.
    """

    forward: nn.Module
    learners: tuple[nn.Module, ...]


@torch.no_grad()
def refit_batch_norm(module: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set the running statistics of every BatchNorm in `module` to those of `batches`: reset
    them, run every batch through `module` with the BatchNorms in training mode and a
    cumulative average (momentum None), and leave `module` in eval mode. A deeper BatchNorm
    sees inputs normalised by the statistics of the batch, as in training.

    Args:
        module: The module whose BatchNorms (those that track running statistics) are refit;
            it does nothing when there are none.
        batches: Input batches for `module`, each read once.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in batches:
            module(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        module.eval()


class Classifier(nn.Module):
    """`forward(x) = head(body(x))`, with the loss and prediction that belong to the head.

    `stages` and `norm_statistics` set the two hooks of the module's docstring
    (`phase1_stages`, `prepare_features`).

    Args:
        head: What the optimiser trains: the body's output to logits (B, classes).
        body: The layers that local rules train (None: the identity, as for backprop
            baselines). The engine runs phase 1 on it, and computes its features once for
            phase 2 when it is frozen (no parameter requires grad, no dropout).
        stages: The stages of a layer-by-layer phase 1 (empty: every local layer at once).
        norm_statistics: Refit the body's BatchNorm statistics to the training images before
            its features are computed (`prepare_features`).

    Attributes:
        body: The body (`nn.Identity` when none was given).
        head: The head.
    """

    def __init__(self, head: nn.Module, body: nn.Module | None = None,
                 stages: Sequence[Stage] = (), norm_statistics: bool = False):
        super().__init__()
        self.body = body if body is not None else nn.Identity()
        self.head = head
        self._on_features = False  # set by `on_features`
        self._stages = tuple(stages)  # a tuple of dataclasses: no submodules are registered
        self._norm_statistics = bool(norm_statistics)

    def phase1_stages(self) -> tuple[Stage, ...]:
        """The stages of a layer-by-layer phase 1; empty: every local layer learns at once.

        Returns:
            The `Stage`s, in the order they train.
        """
        return self._stages

    def prepare_features(self, batches: Iterable[torch.Tensor]) -> None:
        """Before a frozen body's features are computed: refit its BatchNorms' statistics to
        `batches` (the training images) when the model asks for it; else nothing.

        Args:
            batches: The training images (phase 1's, every one), in batches, in a fixed order.
        """
        if self._norm_statistics:
            refit_batch_norm(self.body, batches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch.

        Args:
            x: Images (B, C, H, W); inside `on_features`, the body's features instead.

        Returns:
            The head's output (B, classes): logits, unless the head says otherwise.
        """
        return self.head(x if self._on_features else self.body(x))

    @contextmanager
    def on_features(self) -> Iterator[None]:
        """Within the block the model's input is its frozen body's output, which the engine
        computed once: `forward` (and so `train_step`) runs the head alone."""
        self._on_features = True
        try:
            yield
        finally:
            self._on_features = False

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """One supervised batch by backprop: forward, loss, backward, one optimiser step.
        Returns the batch's mean `loss` and its number of `correct` predictions, on the device
        (no host sync).

        The engine calls it once per training batch, in training mode (under bf16 autocast
        with `precision=bf16`). A family that trains otherwise overrides it and keeps its
        contract (the module's docstring).

        Args:
            x: The batch's inputs (images, or the frozen body's features inside
                `on_features`).
            y: The batch's labels (B,), int64.
            optimizer: The phase's optimiser over every parameter that requires grad.

        Returns:
            Metrics as 0-d tensors on the device: `loss` (required: the batch mean of the
                objective, before the update), `correct` (optional: the number of right
                predictions), and any other name, averaged into metrics.jsonl as `train_<name>`.
        """
        output = self(x)
        loss = self.loss(output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "correct": (self.predict(output.detach()) == y).sum()}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective `train_step` minimises on the batch (x, y), its batch mean, as the step
        reports it as `loss`, without updating anything: here `loss(self(x), y)`.

        The engine calls it once, before phase 2's first step, in eval mode under
        `torch.no_grad()`, on a probe of 512 training images: 100 times its value (at least
        100) is the divergence limit for every step's `loss`.

        Args:
            x: A batch of inputs, as `train_step` takes them.
            y: Its labels (B,).

        Returns:
            A 0-d tensor: the loss, on the scale of `train_step`'s `loss`.
        """
        return self.loss(self(x), y)

    def rule_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The update the family's rule would make on the batch (x, y), as minus a gradient,
        per parameter name, without updating anything; None (here) when the update is the
        model's own backward pass of `loss`. The engine measures its angle to backprop's
        gradient (`bioexp.alignment`).

        Args:
            x: A batch of inputs, as `train_step` takes them.
            y: Its labels (B,).

        Returns:
            {parameter name: gradient} for the parameters the rule trains, or None.
        """
        return None

    def control_layers(self) -> tuple[nn.Module, ...]:
        """The layers a random-feature control (`control=random_features`) freezes at their
        initial weights in a model without local-rule layers: a family whose rule trains
        every layer with labels names its hidden layers, so that its control is the same
        architecture with only the output layer learning, by the same rule. Empty (here): the
        model has no such control.

        Returns:
            The modules whose parameters the control freezes.
        """
        return ()

    def apply_gradients(self, grads: Sequence[torch.Tensor],
                        optimizer: torch.optim.Optimizer) -> None:
        """Write `grads` (one per parameter, in `parameters()` order) into the parameters'
        `.grad` and take one optimiser step: how a rule that computes its own update trains
        through the phase's optimiser.

        Args:
            grads: Minus the update direction of every parameter, in `parameters()` order.
            optimizer: The phase's optimiser.
        """
        for p, g in zip(self.parameters(), grads, strict=True):
            p.grad = g.to(p.dtype)
        optimizer.step()

    def load_sources(self) -> str | None:
        """Copy in the weights that the config takes from elsewhere (another run's checkpoint,
        `cnn_fa`'s `model.conv_from`) and say what was loaded, in a sentence the run logs;
        ConfigError when they cannot be read. Called once, when a run starts from scratch (and
        by the checks before it), never on resume or evaluation: from its first checkpoint on,
        the run's own checkpoint holds them. Nothing (None) by default.

        Returns:
            What was loaded, in a sentence for the log; None when nothing was.

        Raises:
            ConfigError: The weights cannot be read or do not fit.
        """
        return None

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; cross-entropy on logits unless a head says otherwise.

        The default `train_step`, the evaluation (test and validation loss) and the alignment
        angles score the model's output with it.

        Args:
            output: The model's output for the batch (B, classes).
            target: The labels (B,).

        Returns:
            A 0-d tensor: the batch mean.
        """
        return F.cross_entropy(output, target)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """The predicted class of each sample: here the largest output.

        Args:
            output: The model's output for a batch (B, classes).

        Returns:
            Class indices (B,), int64; the accuracy counts where they equal the labels.
        """
        return output.argmax(dim=1)
