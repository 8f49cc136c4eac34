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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.errors import ConfigError
from bioexp.registry import Range

ActivationName = Literal["relu", "tanh", "sigmoid", "gelu", "none"]
ACTIVATIONS = dict(zip(get_args(ActivationName),
                       (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.Identity), strict=True))
# Hyperparameter types with their ranges, checked by the registry before a model is built.
Sizes = Annotated[Sequence[int], Range(low=1)]  # widths of layers, each at least 1
Probability = Annotated[float, Range(0, 1, high_open=True)]  # a dropout rate


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class Classifier(nn.Module):
    """`forward(x) = head(body(x))`, with the loss and prediction that belong to the head."""

    def __init__(self, head: nn.Module, body: nn.Module | None = None):
        super().__init__()
        self.body = body if body is not None else nn.Identity()
        self.head = head
        self._on_features = False  # set by `on_features`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        (no host sync)."""
        output = self(x)
        loss = self.loss(output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "correct": (self.predict(output.detach()) == y).sum()}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective `train_step` minimises on the batch (x, y), its batch mean, as the step
        reports it as `loss`, without updating anything: here `loss(self(x), y)`."""
        return self.loss(self(x), y)

    def load_sources(self) -> str | None:
        """Copy in the weights that the config takes from elsewhere (another run's checkpoint,
        `cnn_fa`'s `model.conv_from`) and say what was loaded, in a sentence the run logs;
        ConfigError when they cannot be read. Called once, when a run starts from scratch (and
        by the checks before it), never on resume or evaluation: from its first checkpoint on,
        the run's own checkpoint holds them. Nothing (None) by default."""
        return None

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; cross-entropy on logits unless a head says otherwise."""
        return F.cross_entropy(output, target)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)
