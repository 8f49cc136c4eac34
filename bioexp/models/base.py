"""The shape every registered model shares: a body, then a head.

The body holds the layers that local rules train (it is the identity for backprop baselines); the
head is what the optimiser trains. The split lets the engine train local layers without running
the head, and, once the body is frozen, train the head on features computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; cross-entropy on logits unless a head says otherwise."""
        return F.cross_entropy(output, target)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)
