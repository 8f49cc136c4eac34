"""Backprop baselines: a multilayer perceptron and a small LeNet-style CNN.

Both are trained end to end by backpropagation (Rumelhart, Hinton & Williams 1986) and are the
yardstick for every biologically plausible model in bioexp. The builders here are shared with
the feedback-alignment family, which swaps in its own layer classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from bioexp.errors import ConfigError
from bioexp.models.base import ActivationName, Classifier, Probability, Sizes, make_activation
from bioexp.registry import register_model


def mlp_layers(sizes: Sequence[int], act: str, dropout: float,
               linear: Callable[[int, int], nn.Module] = nn.Linear,
               mark_hidden: Callable[[], nn.Module] | None = None) -> list[nn.Module]:
    """Linear layers of `sizes` (input first, logits last), activation and dropout between.

    `mark_hidden`, when given, makes a module placed after each hidden activation (DFA's).
    """
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(make_activation(act))
            if mark_hidden is not None:
                layers.append(mark_hidden())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return layers


def conv_blocks(input_shape: Sequence[int], channels: Sequence[int], act: str,
                conv: Callable[..., nn.Module] = nn.Conv2d) -> tuple[list[nn.Module], int]:
    """Two 5x5 convolution (same padding) + activation + 2x2 max-pool blocks; also returns the
    flattened size of their output."""
    if len(channels) != 2:
        raise ConfigError(f"model.channels must list two channel counts, got {list(channels)}")
    c_in, height, width = input_shape
    blocks: list[nn.Module] = []
    for c_out in channels:
        blocks += [conv(c_in, c_out, kernel_size=5, padding=2), make_activation(act),
                   nn.MaxPool2d(2)]
        c_in = c_out
    return blocks, c_in * (height // 4) * (width // 4)


@register_model
def bp_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (512, 256),
           activation: ActivationName = "relu", dropout: Probability = 0.0) -> Classifier:
    """Multilayer perceptron trained by backprop (hidden sizes configurable)."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    return Classifier(nn.Sequential(nn.Flatten(), *mlp_layers(sizes, activation, dropout)))


@register_model
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: Sizes = (16, 32),
        hidden: Sizes = (256,), activation: ActivationName = "relu",
        dropout: Probability = 0.3) -> Classifier:
    """Two 5x5 convolution + 2x2 max-pool blocks, then fully connected layers, by backprop."""
    blocks, flat = conv_blocks(input_shape, channels, activation)
    fc = mlp_layers([flat, *hidden, num_classes], activation, dropout)
    return Classifier(nn.Sequential(*blocks, nn.Flatten(), *fc))
