"""SoftHebb: soft winner-take-all layers learnt without labels or feedback, then a linear read-out.

Moraitis et al. 2022 ("SoftHebb: Bayesian inference in unsupervised Hebbian soft winner-take-all
networks", Neuromorph. Comput. Eng. 2:044017) and Journé et al. 2023 ("Hebbian deep learning
without feedback", ICLR). Phase 1 trains every SoftHebb layer at once, each on what the layer
below gives it, with no signal between layers; phase 2 trains the linear read-out on the frozen
body's features, computed once. The rule and what this implementation simplifies are in
`bioexp.rules.softhebb`; the layers in `bioexp.layers.softhebb`.

- `softhebb_cnn` (the 2023 paper's network): per layer, a per-sample standardisation (for the
  paper's BatchNorm without parameters), a SoftHebb convolution, the triangle activation
  relu(u - mean over channels of u)^power, and pooling: max 4x4, stride 2, padding 1, except
  average 2x2, stride 2 after the last layer. The paper quadruples the channels per layer; its
  CIFAR-10 widths, model.channels=[96,384,1536], are for a GPU: the defaults here are narrower
  so that a run takes minutes on a CPU. Then the read-out: BatchNorm without parameters (a
  departure, `read_out_norm`, on by default: it conditions the linear probe), dropout, and a
  linear layer trained by backprop.
- `softhebb_mlp` (the 2022 paper's network): one dense soft-WTA layer of `hidden` units on the
  flattened, standardised image, its activation, then dropout and a linear read-out.

Departures from the paper: per-sample standardisation instead of BatchNorm before each SoftHebb
layer; BatchNorm without parameters before the read-out; every layer learns during the same
single pass over the images; one temperature and one learning-rate factor shared by the layers
after the first, and one triangle power for all (the authors' CIFAR-10 presets set each
layer's own: powers 0.7, 1.4, 1, temperature settings 1, 0.65, 0.25, rates 0.08, 0.005, 0.01);
zero padding, stride 1, no bias.
Settings were chosen on a validation split of Fashion-MNIST (data.val_size=10000).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from torch import nn

from bioexp.layers.softhebb import (
    SoftHebbConv2d,
    SoftHebbLinear,
    Standardize,
    Triangle,
    pool_output,
)
from bioexp.models.base import Classifier, Probability, Sizes
from bioexp.registry import Range, register_model

Positive = Annotated[float, Range(low=0, low_open=True)]  # a temperature, a power, a radius
Rate = Annotated[float, Range(low=0)]  # a factor of a learning rate, an exponent
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


def softhebb_conv_body(input_shape: Sequence[int], channels: Sequence[int], kernel: int,
                       deep_kernel: int, settings: dict, deep: dict,
                       power: float) -> tuple[nn.Sequential, int]:
    """The convolutional body and the number of features it gives. `settings` are the SoftHebb
    layers' settings, `deep` what layers after the first set otherwise."""
    in_channels, side, _ = input_shape
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(channels):
        size = kernel if i == 0 else deep_kernel
        layer_settings = settings if i == 0 else {**settings, **deep}
        layers += [Standardize(), SoftHebbConv2d(in_channels, out_channels, size,
                                                 **layer_settings), Triangle(power)]
        side = side + 2 * (size // 2) - size + 1
        pool, side = conv_pool(side, last=i == len(channels) - 1)
        layers.append(pool)
        in_channels = out_channels
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), in_channels * side * side


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
                 channels: Sizes = (32, 128, 512), kernel: Kernel = 5, deep_kernel: Kernel = 3,
                 temperature: Positive = 1.0, deep_temperature: Positive = 1.5,
                 deep_lr_scale: Rate = 0.1, power: Positive = 1.0, rate_power: Rate = 0.5,
                 init_radius: Positive = 4.0, anti_hebbian: bool = True,
                 normalize_update: bool = True, read_out_norm: bool = True,
                 dropout: Probability = 0.5) -> Classifier:
    """SoftHebb convolutional layers (Journe et al. 2023), learnt without labels, then a linear
    read-out.

    The first layer uses `kernel` and `temperature` and learns at schedule.unsupervised.lr;
    the others use `deep_kernel`, `deep_temperature` and `deep_lr_scale` times that rate.
    """
    settings = {"temperature": temperature, "anti_hebbian": anti_hebbian,
                "rate_power": rate_power, "normalize_update": normalize_update,
                "init_radius": init_radius}
    deep = {"temperature": deep_temperature, "lr_scale": deep_lr_scale}
    body, features = softhebb_conv_body(input_shape, channels, kernel, deep_kernel, settings,
                                        deep, power)
    head = read_out(features, num_classes, dropout, read_out_norm)
    return Classifier(head=nn.Sequential(*head), body=body)


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
