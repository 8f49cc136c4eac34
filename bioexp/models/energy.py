"""What the energy-based families share (predictive coding, `bioexp.models.predictive_coding`;
equilibrium propagation, `bioexp.models.equilibrium`): a network of `nn.Linear` layers that
settles on each batch, a rule that computes its own update from the settled state, the
squared-error loss of states, and the row lengths of their random-feature controls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.errors import ConfigError
from bioexp.models.base import Classifier, Positives

RowNorms = Positives | None
"""The type hint of `init_row_norms`: one positive row length per hidden layer, or null."""


@torch.no_grad()
def set_row_norms(layers: Sequence[nn.Linear], norms: Sequence[float] | None) -> None:
    """Rescale every row of each layer's weight to that layer's length in `norms` (one per
    layer; None leaves them): the scale a random-feature control needs to match a trained
    network's (`docs/controls.md`).

    Args:
        layers: The `nn.Linear` layers, in order.
        norms: Their row lengths, or None.

    Raises:
        ConfigError: `norms` does not have one entry per layer.
    """
    if norms is None:
        return
    if len(norms) != len(layers):
        raise ConfigError(f"model.init_row_norms must have one length per hidden layer "
                          f"({len(layers)}), got {len(norms)}")
    for layer, norm in zip(layers, norms, strict=True):
        layer.weight.mul_(norm / layer.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 |output - one-hot(target)|^2 summed over classes, batch mean: the loss of the
    energy-based families, whose outputs are states rather than logits.

    Args:
        output: The model's output for the batch (B, classes).
        target: The labels (B,).

    Returns:
        A 0-d tensor: the batch mean.
    """
    onehot = one_hot(target, output.shape[1], output.dtype)
    return 0.5 * (output - onehot).square().sum(dim=1).mean()


def one_hot(labels: torch.Tensor, classes: int, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    """The labels (B,) as one-hot rows (B, classes) of `dtype`."""
    return F.one_hot(labels, classes).to(dtype)


class SettlingClassifier(Classifier):
    """A Classifier whose head holds its `nn.Linear` layers in `head.layers` and is trained by a
    rule that settles the network on a batch and computes the update itself.

    A family implements `relax(x, target, optimizer=None)`: settle on the inputs with the output
    driven towards `target` (B, classes), and return the prediction before any update and the
    rule's gradients (minus its update, one per parameter in `parameters()` order). Given an
    optimiser, `relax` also applies the update (`apply_gradients`), as often as the rule
    updates; without one it changes nothing. The training step, the alignment angle's
    `rule_gradients` and the random-feature control follow from it.
    """

    def relax(self, x: torch.Tensor, target: torch.Tensor,
              optimizer: torch.optim.Optimizer | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Settle on a batch and compute (and, given `optimizer`, apply) the rule's update;
        returns the prediction before the update and the gradients, in `parameters()` order."""
        raise NotImplementedError(f"{type(self).__name__} must define relax()")

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """The labels as one-hot rows as wide as the output layer."""
        return one_hot(y, self.head.layers[-1].out_features)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """`relax` towards the one-hot labels, applying the rule's update; `loss` is
        `self.loss` of the prediction, before the update."""
        output, _ = self.relax(x, self.targets(y), optimizer)
        return {"loss": self.loss(output, y), "correct": (self.predict(output) == y).sum()}

    def rule_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """`relax`'s gradients on the batch, per parameter name, nothing applied."""
        _, grads = self.relax(x, self.targets(y))
        return {name: g for (name, _), g in zip(self.named_parameters(), grads, strict=True)}

    def control_layers(self) -> tuple[nn.Module, ...]:
        """Every layer but the output: `control=random_features` freezes them."""
        return tuple(self.head.layers[:-1])
