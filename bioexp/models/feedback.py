"""The feedback-alignment family as whole networks: FA, sign-symmetry and DFA MLPs, an all-FA
CNN, and `cnn_fa`, backprop-trained (or loaded and frozen) convolutions under an FA head.

The MLPs share `bp_mlp`'s defaults so that the four compare like for like; `cnn_fa` is the
comparison made by the Brown CLPS1291 project that bioexp grew from.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers.feedback import (
    DFAHidden,
    DFAOutput,
    FAConv2d,
    FALinear,
    FeedbackInit,
    KPConv2d,
    KPLinear,
    SignLinear,
)
from bioexp.models.base import ActivationName, Classifier, Probability, Sizes
from bioexp.models.baselines import conv_blocks, mlp_layers
from bioexp.records import CHECKPOINT
from bioexp.registry import register_model


@register_model
def fa_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (512, 256),
           activation: ActivationName = "relu", dropout: Probability = 0.0,
           feedback_init: FeedbackInit = "kaiming", feedback_scale: bool = False) -> Classifier:
    """MLP trained by feedback alignment: errors flow back through fixed random matrices."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    linear = partial(FALinear, init=feedback_init, scale_to_weight=feedback_scale)
    return Classifier(nn.Sequential(nn.Flatten(), *mlp_layers(sizes, activation, dropout, linear)))


@register_model
def kp_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (512, 256),
           activation: ActivationName = "relu", dropout: Probability = 0.0,
           feedback_init: FeedbackInit = "kaiming") -> Classifier:
    """MLP trained by Kolen-Pollack learning: B starts random and gets W's update, decay too."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    linear = partial(KPLinear, init=feedback_init)
    return Classifier(nn.Sequential(nn.Flatten(), *mlp_layers(sizes, activation, dropout, linear)))


@register_model
def kp_cnn(input_shape: tuple[int, ...], num_classes: int, channels: Sizes = (16, 32),
           hidden: Sizes = (256,), activation: ActivationName = "relu", dropout: Probability = 0.3,
           feedback_init: FeedbackInit = "kaiming") -> Classifier:
    """`cnn`'s architecture with every layer, convolutions included, trained by Kolen-Pollack."""
    blocks, flat = conv_blocks(input_shape, channels, activation,
                               partial(KPConv2d, init=feedback_init))
    fc = mlp_layers([flat, *hidden, num_classes], activation, dropout,
                    partial(KPLinear, init=feedback_init))
    return Classifier(nn.Sequential(*blocks, nn.Flatten(), *fc))


@register_model
def sign_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (512, 256),
             activation: ActivationName = "relu", dropout: Probability = 0.0) -> Classifier:
    """MLP trained with sign-symmetric feedback: errors flow back through sign(W) * mean|W|."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    return Classifier(nn.Sequential(nn.Flatten(),
                                    *mlp_layers(sizes, activation, dropout, SignLinear)))


@register_model
def dfa_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (512, 256),
            activation: ActivationName = "relu", dropout: Probability = 0.0,
            feedback_init: FeedbackInit = "kaiming") -> Classifier:
    """MLP trained by direct feedback alignment: the output error goes straight to each layer."""
    markers: list[DFAHidden] = []

    def mark() -> DFAHidden:
        markers.append(DFAHidden())
        return markers[-1]

    sizes = [math.prod(input_shape), *hidden, num_classes]
    layers = mlp_layers(sizes, activation, dropout, mark_hidden=mark)
    output = DFAOutput(markers, num_classes, list(hidden), feedback_init)
    return Classifier(nn.Sequential(nn.Flatten(), *layers, output))


@register_model
def fa_cnn(input_shape: tuple[int, ...], num_classes: int, channels: Sizes = (16, 32),
           hidden: Sizes = (256,), activation: ActivationName = "relu", dropout: Probability = 0.3,
           feedback_init: FeedbackInit = "kaiming", feedback_scale: bool = False) -> Classifier:
    """`cnn`'s architecture with every layer, convolutions included, trained by FA."""
    options = {"init": feedback_init, "scale_to_weight": feedback_scale}
    blocks, flat = conv_blocks(input_shape, channels, activation, partial(FAConv2d, **options))
    fc = mlp_layers([flat, *hidden, num_classes], activation, dropout,
                    partial(FALinear, **options))
    return Classifier(nn.Sequential(*blocks, nn.Flatten(), *fc))


class FrozenConvolutions(Classifier):
    """A body of convolutions that, given `conv_from` (a `cnn` run folder), starts from that
    run's convolutions and stays frozen. The architecture freezes them; `load_sources` copies the
    weights in, once, when a run starts (never on resume or evaluation, so the source run may
    move or go once this run has a checkpoint)."""

    def __init__(self, head: nn.Module, body: nn.Module, conv_from: str | None):
        super().__init__(head=head, body=body)
        self.conv_from = conv_from
        if conv_from is not None:
            body.requires_grad_(False)

    def load_sources(self) -> str | None:
        """Copy the convolutions of the `cnn` run in `model.conv_from` into the body, and say
        so; None without `conv_from`. ConfigError when that run's checkpoint is missing or
        does not fit."""
        if self.conv_from is None:
            return None
        count = load_frozen_convolutions(self.body, Path(self.conv_from))
        return (f"model.conv_from: {count} convolution layers loaded from "
                f"{Path(self.conv_from) / CHECKPOINT}, frozen")


@register_model
def cnn_fa(input_shape: tuple[int, ...], num_classes: int, channels: Sizes = (16, 32),
           hidden: Sizes = (256,), activation: ActivationName = "relu", dropout: Probability = 0.3,
           feedback_init: FeedbackInit = "kaiming", feedback_scale: bool = False,
           conv_from: str | None = None) -> Classifier:
    """Backprop-trained convolutions (or frozen ones from a `cnn` run) under an FA head."""
    blocks, flat = conv_blocks(input_shape, channels, activation)
    fc = mlp_layers([flat, *hidden, num_classes], activation, dropout,
                    partial(FALinear, init=feedback_init, scale_to_weight=feedback_scale))
    return FrozenConvolutions(nn.Sequential(nn.Flatten(), *fc), nn.Sequential(*blocks), conv_from)


def load_frozen_convolutions(body: nn.Module, run_dir: Path) -> int:
    """Copy the convolution weights of a run's checkpoint into `body`, in order; how many
    layers."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"model.conv_from: {run_dir} has no checkpoint ({CHECKPOINT})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as exc:  # a damaged or foreign file can fail in many ways
        raise ConfigError(f"model.conv_from: {path} is not a readable bioexp checkpoint "
                          f"({type(exc).__name__})") from None
    convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
    keys = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4]
    if len(keys) != len(convs):
        raise ConfigError(f"model.conv_from: the checkpoint in {run_dir} has {len(keys)} "
                          f"convolution layers, this model has {len(convs)}")
    with torch.no_grad():
        for conv, key in zip(convs, keys, strict=True):
            if state[key].shape != conv.weight.shape:
                raise ConfigError(
                    f"model.conv_from: {key} in {run_dir} has shape {tuple(state[key].shape)}, "
                    f"this model needs {tuple(conv.weight.shape)} (match model.channels)")
            conv.weight.copy_(state[key])
            conv.bias.copy_(state[key.removesuffix("weight") + "bias"])
    return len(convs)
