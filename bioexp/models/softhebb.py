"""SoftHebb: soft winner-take-all layers learnt without labels or feedback, then a linear read-out.

Moraitis et al. 2022 ("SoftHebb: Bayesian inference in unsupervised Hebbian soft winner-take-all
networks", Neuromorph. Comput. Eng. 2:044017) and Journé et al. 2023 ("Hebbian deep learning
without feedback", ICLR), as the authors' code trains them (github.com/NeuromorphicComputing/
SoftHebb, preset `4SoftHebbCnnCIFAR`). Phase 1 trains the SoftHebb layers without labels, each
on what the layer below gives it, with no signal between layers: all at once, or one layer after
another (`layerwise`); phase 2 trains the linear read-out on the frozen body's features,
computed once. The rule is in `bioexp.rules.softhebb`, the layers in `bioexp.layers.softhebb`;
docs/softhebb.md lists the recipe item by item, with every departure and its measured effect.

- `softhebb_cnn` (the 2023 paper's network): per layer, BatchNorm without parameters
  (`norm=batch`), a SoftHebb convolution (reflect padding), the triangle activation
  relu(u - mean over channels of u)^power, and pooling: max 4x4, stride 2, padding 1, except
  average 2x2, stride 2 after the last layer. Per-layer settings are lists, one entry per
  layer: `kernels`, `inverse_temperatures` (the authors' beta of softmax(beta u): 1, 0.65,
  0.25, temperatures 1, 1.54, 4), `powers` of the triangle (0.7, 1.4, 1) and `lr_scales`
  (times schedule.unsupervised.lr = 0.08: 0.08, 0.005, 0.01). The paper's CIFAR-10 widths,
  channels=[96,384,1536], are the `softhebb_cnn_paper` bench preset; the default is a third
  as wide so that a phase-1 epoch at batch 10 fits a CPU. Then dropout 0.5 and the linear
  read-out (Adam 1e-3, 50 epochs, the rate halved at 20, 35, 50, 60, 70, 80 and 90% of them).
- `softhebb_mlp` (the 2022 paper's network): one dense soft-WTA layer of `hidden` units on the
  flattened, standardised image, its activation, then dropout and a linear read-out. It is not
  the authors' dense preset (`2SoftMlpMNIST`: no anti-Hebbian term, inverse temperature 12,
  rate power 0.2, an all-positive start of norm 35, raw pixels, softmax(5 u) as features): its
  settings were tuned on Fashion-MNIST; docs/softhebb.md lists the differences.

BatchNorm before each layer uses the statistics of its batch in phase 1 (batches of 10, as in
the authors' code); before phase 2 computes the features, one pass over the training images
sets its running statistics (`Classifier.prepare_features`), which the features then use: the
same for a trained body and for a control, which has no phase 1 (the authors' random control
keeps BatchNorm's initial statistics, mean 0 and variance 1).

Departures from the authors' code: one input channel (Fashion-MNIST); the default width; the
running statistics (a pass over the training images, not a moving average of the last batches
of phase 1); in `layerwise` phase 1 the layers below the one learning normalise with their
batch's statistics (theirs use the running ones); the controls are normalised like a trained
body. `read_out_norm` (off) adds a BatchNorm before the read-out, which theirs does not have.
Layer by layer, the authors' training order, is the default: on a validation split of
Fashion-MNIST (data.val_size=10000) it scored 0.13 points above all at once with two seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers.softhebb import (
    SoftHebbConv2d,
    SoftHebbLinear,
    Standardize,
    Triangle,
    pool_output,
)
from bioexp.models.base import Classifier, Positive, Positives, Probability, Sizes, Stage
from bioexp.registry import Range, register_model

Rate = Annotated[float, Range(low=0)]  # a factor of a learning rate, an exponent
Rates = Annotated[Sequence[float], Range(low=0)]  # one per layer
Padding = Literal["reflect", "zeros"]
Norm = Literal["batch", "sample"]
Kernel = Annotated[int, Range(low=1)]
Hidden = Annotated[int, Range(low=2)]  # a competition needs two units
MlpActivation = Literal["triangle", "softmax"]
HIDDEN_POOL = (4, 2, 1)  # max pooling after every layer but the last: kernel, stride, padding
LAST_POOL = (2, 2, 0)  # average pooling after the last layer


def conv_pool(side: int, last: bool) -> tuple[nn.Module, int]:
    """The pooling after a layer whose output is `side` pixels wide, and the side after it; no
    pooling where the window would leave nothing (tiny images)."""
    kernel, stride, padding = LAST_POOL if last else HIDDEN_POOL
    after = pool_output(side, kernel, stride, padding)
    if after < 1:
        return nn.Identity(), side
    pool = nn.AvgPool2d(kernel, stride, padding) if last else nn.MaxPool2d(kernel, stride,
                                                                           padding)
    return pool, after


def input_norm(norm: str, channels: int) -> nn.Module:
    """What normalises a SoftHebb layer's input: BatchNorm without parameters (`batch`; its
    running statistics are set before phase 2, see the module's docstring) or `Standardize`
    (`sample`)."""
    return nn.BatchNorm2d(channels, affine=False) if norm == "batch" else Standardize()


def softhebb_conv_body(input_shape: Sequence[int], channels: Sequence[int],
                       kernels: Sequence[int], inverse_temperatures: Sequence[float],
                       powers: Sequence[float], lr_scales: Sequence[float], settings: dict,
                       norm: str) -> tuple[nn.Sequential, int, list[SoftHebbConv2d]]:
    """The convolutional body, the number of features it gives, and its SoftHebb layers in
    order. `settings` are what every SoftHebb layer shares; the lists give each its own."""
    in_channels, side, _ = input_shape
    layers: list[nn.Module] = []
    convs: list[SoftHebbConv2d] = []
    for i, out_channels in enumerate(channels):
        size = kernels[i]
        conv = SoftHebbConv2d(in_channels, out_channels, size, 1 / inverse_temperatures[i],
                              lr_scale=lr_scales[i], **settings)
        layers += [input_norm(norm, in_channels), conv, Triangle(powers[i])]
        convs.append(conv)
        side = side + 2 * (size // 2) - size + 1
        pool, side = conv_pool(side, last=i == len(channels) - 1)
        layers.append(pool)
        in_channels = out_channels
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), in_channels * side * side, convs


def read_out(features: int, num_classes: int, dropout: float, norm: bool) -> list[nn.Module]:
    """With `norm`, BatchNorm without parameters (a linear probe's usual conditioning, e.g. He
    et al. 2022, "Masked autoencoders are scalable vision learners"; at test time a fixed
    affine map, so the read-out stays linear); dropout when above 0; the linear read-out,
    trained by backprop."""
    layers: list[nn.Module] = [nn.BatchNorm1d(features, affine=False)] if norm else []
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return [*layers, nn.Linear(features, num_classes)]


@register_model
def softhebb_cnn(input_shape: tuple[int, ...], num_classes: int,
                 channels: Sizes = (32, 128, 512), kernels: Sizes = (5, 3, 3),
                 inverse_temperatures: Positives = (1.0, 0.65, 0.25),
                 powers: Positives = (0.7, 1.4, 1.0), lr_scales: Rates = (1.0, 0.0625, 0.125),
                 rate_power: Rate = 0.5, init_radius: Positive = 25.0,
                 padding: Padding = "reflect", norm: Norm = "batch", layerwise: bool = True,
                 anti_hebbian: bool = True, normalize_update: bool = True,
                 read_out_norm: bool = False, dropout: Probability = 0.5) -> Classifier:
    """SoftHebb convolutional layers (Journe et al. 2023), learnt without labels, then a linear
    read-out.

    Layer i has `channels[i]` channels, a `kernels[i]` kernel, inverse temperature
    `inverse_temperatures[i]`, triangle power `powers[i]`, and learns at `lr_scales[i]` times
    schedule.unsupervised.lr; `layerwise` trains the layers one after another in phase 1. A
    per-layer list shorter than `channels` is an error; entries past the last layer are unused,
    so the three-layer defaults serve a body of one or two layers, as the authors' two- and
    three-block presets take the first layers' settings of their four-block one.
    """
    per_layer = {"kernels": kernels, "inverse_temperatures": inverse_temperatures,
                 "powers": powers, "lr_scales": lr_scales}
    for key, values in per_layer.items():
        if len(values) < len(channels):
            raise ConfigError(f"model.{key} must have one entry per layer of model.channels "
                              f"({len(channels)}), got {len(values)}: {list(values)!r}")
    settings = {"anti_hebbian": anti_hebbian, "rate_power": rate_power,
                "normalize_update": normalize_update, "init_radius": init_radius,
                "init": "gaussian", "padding_mode": padding}
    body, features, convs = softhebb_conv_body(input_shape, channels, kernels,
                                               inverse_temperatures, powers, lr_scales,
                                               settings, norm)
    # Stage i runs the body up to layer i's convolution: the rule needs nothing after it.
    stages = [Stage(body[:list(body).index(conv) + 1], (conv,)) for conv in convs]
    head = read_out(features, num_classes, dropout, read_out_norm)
    return Classifier(head=nn.Sequential(*head), body=body,
                      stages=stages if layerwise else (), norm_statistics=norm == "batch")


class SoftmaxOver(nn.Module):
    """softmax(u / temperature) over dimension 1: the soft WTA's own output, as features."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.softmax(u / self.temperature, dim=1)


@register_model
def softhebb_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Hidden = 2000,
                 temperature: Positive = 1.0, activation: MlpActivation = "triangle",
                 power: Positive = 1.0, rate_power: Rate = 0.5, init_radius: Positive = 4.0,
                 anti_hebbian: bool = True, normalize_update: bool = True,
                 read_out_norm: bool = True, dropout: Probability = 0.0) -> Classifier:
    """One dense SoftHebb soft winner-take-all layer (Moraitis et al. 2022), learnt without
    labels, then a linear read-out.

    The body gives the layer's currents; the head applies `activation` (the triangle, or the
    soft WTA's softmax at `temperature`) before the read-out.
    """
    layer = SoftHebbLinear(int(torch.tensor(input_shape).prod()), hidden, temperature,
                           anti_hebbian=anti_hebbian, rate_power=rate_power,
                           normalize_update=normalize_update, init_radius=init_radius)
    body = nn.Sequential(nn.Flatten(), Standardize(), layer)
    act = Triangle(power) if activation == "triangle" else SoftmaxOver(temperature)
    return Classifier(head=nn.Sequential(act, *read_out(hidden, num_classes, dropout,
                                                        read_out_norm)), body=body)
