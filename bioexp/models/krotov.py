"""Krotov & Hopfield's competing hidden units under a supervised head (2019, PNAS 116(16):7723).

Phase 1 trains the wide hidden layer (`bioexp.layers.KrotovLayer`) without labels; phase 2 trains
the head on its frozen currents, computed once. Heads:

- `krotov_fc` / `krotov_fa`: an activation (none, relu, or relu^n), then fully connected layers
  trained by backprop or by feedback alignment;
- `krotov_biocell_fc` / `krotov_biocell_fa`: the paper's classifier, h = relu(W v)^n,
  c = tanh(beta S h), loss sum_classes |c - t|^m with t = +1 for the true class and -1 otherwise,
  prediction argmax c; S trained by backprop or by FA.

The four models combine these layers as the Brown CLPS1291 project's "hybridBio" notebooks did
(after gatapia/unsupervised_bio_classifier).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers.feedback import FALinear
from bioexp.layers.krotov import KrotovInit, KrotovLayer, UnitNorm, UnitRows
from bioexp.models.base import Classifier, Probability, Sizes, make_activation
from bioexp.models.baselines import mlp_layers
from bioexp.registry import Range, register_model

Activation = Literal["none", "relu", "relu_power"]
Hidden = Annotated[int, Range(low=2)]  # units of the Krotov layer
Power = Annotated[float, Range(low=2)]  # the rule's p: Krotov & Hopfield use p >= 2
Strength = Annotated[float, Range(0, 1)]  # delta, the anti-Hebbian push
Rank = Annotated[int, Range(low=2, high_name="model.hidden")]  # k, the unit pushed away
LossPower = Annotated[float, Range(low=1)]  # BioLoss's m
Factor = Annotated[float, Range(low=0, low_open=True)]  # the factor of the head's input
Linear = Callable[..., nn.Module]


class ReluPower(nn.Module):
    """relu(x)^n."""

    def __init__(self, n: float):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).pow(self.n)

    def extra_repr(self) -> str:
        return f"n={self.n:g}"


class BioCell(nn.Module):
    """c = tanh(beta * S relu(currents)^n), one output in (-1, 1) per class."""

    def __init__(self, hidden: int, num_classes: int, n: float, beta: float,
                 linear: Linear = nn.Linear):
        super().__init__()
        self.hidden_power = ReluPower(n)
        self.readout = linear(hidden, num_classes, bias=False)  # S, (classes, H)
        self.beta = beta

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * self.readout(self.hidden_power(currents)))


class BioCellClassifier(Classifier):
    """A Classifier whose loss is Krotov & Hopfield's sum over classes of |c - t|^m."""

    def __init__(self, head: nn.Module, body: nn.Module, m: float):
        super().__init__(head, body)
        self.m = m

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`bio_loss` of the outputs (B, classes) against the labels (B,), with power `m`."""
        return bio_loss(output, target, self.m)


def bio_loss(c: torch.Tensor, target: torch.Tensor, m: float) -> torch.Tensor:
    """Mean over the batch of sum_classes |c - t|^m, t = +1 for the true class, -1 otherwise."""
    t = F.one_hot(target, c.shape[1]).to(c.dtype) * 2 - 1
    return (c - t).abs().pow(m).sum(dim=1).mean()


def krotov_body(input_shape: Sequence[int], hidden: int, p: float, k: int, delta: float,
                init: str, normalize_input: bool) -> nn.Sequential:
    if not 2 <= k <= hidden:
        raise ConfigError(f"model.k must be in [2, model.hidden = {hidden}], got {k}")
    layers: list[nn.Module] = [nn.Flatten()]
    if normalize_input:
        layers.append(UnitNorm())
    layers.append(KrotovLayer(math.prod(input_shape), hidden, p, k, delta, init))
    return nn.Sequential(*layers)


class Gain(nn.Module):
    """x times a fixed factor: the scale of the currents an activation such as relu^n sees."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def head_input(body: nn.Sequential, unit_rows: bool, gain: float) -> list[nn.Module]:
    """The head's first modules: currents of unit-length weight rows, when asked for, times
    `gain` when it is not 1. relu^n is not scale-free: a learnt row aligned with the images
    gives currents near 0.5, a random one near 1/sqrt(784), which relu^4.5 crushes to 1e-7,
    so a random-feature control needs its own gain (chosen on validation; docs/benchmark.md)."""
    return [*([UnitRows(body[-1])] if unit_rows else []), *([Gain(gain)] if gain != 1 else [])]


def feature_activation(name: str, n: float) -> nn.Module:
    return ReluPower(n) if name == "relu_power" else make_activation(name)


def _fc_model(input_shape: Sequence[int], num_classes: int, hidden: int, p: float, k: int,
              delta: float, init: str, normalize_input: bool, unit_rows: bool, gain: float,
              activation: str, n: float, head: Sequence[int], dropout: float,
              linear: Linear) -> Classifier:
    body = krotov_body(input_shape, hidden, p, k, delta, init, normalize_input)
    layers = mlp_layers([hidden, *head, num_classes], "relu", dropout, linear)
    return Classifier(head=nn.Sequential(*head_input(body, unit_rows, gain),
                                         feature_activation(activation, n), *layers), body=body)


def _biocell_model(input_shape: Sequence[int], num_classes: int, hidden: int, p: float, k: int,
                   delta: float, init: str, normalize_input: bool, unit_rows: bool,
                   gain: float, n: float, m: float, beta: float,
                   linear: Linear) -> BioCellClassifier:
    body = krotov_body(input_shape, hidden, p, k, delta, init, normalize_input)
    cell = BioCell(hidden, num_classes, n, beta, linear)
    head = nn.Sequential(*head_input(body, unit_rows, gain), cell)
    return BioCellClassifier(head, body, m)


@register_model
def krotov_fc(input_shape: tuple[int, ...], num_classes: int, hidden: Hidden = 2000,
              p: Power = 3.0, k: Rank = 7, delta: Strength = 0.4, init: KrotovInit = "uniform",
              normalize_input: bool = True, unit_rows: bool = True, gain: Factor = 1.0,
              activation: Activation = "relu_power", n: float = 4.5,
              head: Sizes = (256, 1024), dropout: Probability = 0.0) -> Classifier:
    """Krotov-Hopfield hidden layer, then fully connected layers trained by backprop."""
    return _fc_model(input_shape, num_classes, hidden, p, k, delta, init, normalize_input,
                     unit_rows, gain, activation, n, head, dropout, nn.Linear)


@register_model
def krotov_fa(input_shape: tuple[int, ...], num_classes: int, hidden: Hidden = 2000,
              p: Power = 3.0, k: Rank = 7, delta: Strength = 0.4, init: KrotovInit = "uniform",
              normalize_input: bool = True, unit_rows: bool = True, gain: Factor = 1.0,
              activation: Activation = "relu_power", n: float = 4.5,
              head: Sizes = (256, 1024), dropout: Probability = 0.0) -> Classifier:
    """Krotov-Hopfield hidden layer, then fully connected layers trained by feedback alignment."""
    return _fc_model(input_shape, num_classes, hidden, p, k, delta, init, normalize_input,
                     unit_rows, gain, activation, n, head, dropout, FALinear)


@register_model
def krotov_biocell_fc(input_shape: tuple[int, ...], num_classes: int, hidden: Hidden = 2000,
                      p: Power = 3.0, k: Rank = 7, delta: Strength = 0.4,
                      init: KrotovInit = "uniform", normalize_input: bool = True,
                      unit_rows: bool = True, gain: Factor = 1.0, n: float = 4.5,
                      m: LossPower = 6.0, beta: float = 1.0) -> BioCellClassifier:
    """Krotov-Hopfield hidden layer under the paper's BioCell classifier, S by backprop."""
    return _biocell_model(input_shape, num_classes, hidden, p, k, delta, init, normalize_input,
                          unit_rows, gain, n, m, beta, nn.Linear)


@register_model
def krotov_biocell_fa(input_shape: tuple[int, ...], num_classes: int, hidden: Hidden = 2000,
                      p: Power = 3.0, k: Rank = 7, delta: Strength = 0.4,
                      init: KrotovInit = "uniform", normalize_input: bool = True,
                      unit_rows: bool = True, gain: Factor = 1.0, n: float = 4.5,
                      m: LossPower = 6.0, beta: float = 1.0) -> BioCellClassifier:
    """krotov_biocell_fc under the reference's FA name: the same computation, since FA leaves the
    only trained layer's own gradient as it is."""
    return _biocell_model(input_shape, num_classes, hidden, p, k, delta, init, normalize_input,
                          unit_rows, gain, n, m, beta, FALinear)
