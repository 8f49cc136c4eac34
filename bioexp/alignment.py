"""The alignment angle: how far the update a learning rule delivers is from backprop's.

For each weight the rule trains, the angle in degrees between the rule's gradient and the
gradient exact backprop gives, on the same batch, in eval mode (no dropout noise). The rule's
gradient is the model's own backward pass for feedback layers (FA, sign, DFA, KP), and
`model.rule_gradients(x, y)` for a family that computes its update itself (predictive coding,
equilibrium propagation; see `bioexp.models.base`), where backprop's is the gradient of
`loss(model(x), y)` through the same forward pass. Lillicrap et al. 2016 show the feedback
angle falling well below 90 degrees as the forward weights come to align with B; 0 means the
rule delivers backprop's direction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bioexp.layers.feedback import FeedbackLayer, exact_backprop
from bioexp.models.base import Classifier


def has_own_rule(model: nn.Module) -> bool:
    """Whether the model computes its update itself (overrides `Classifier.rule_gradients`)."""
    rule = getattr(type(model), "rule_gradients", None)
    return rule is not None and rule is not getattr(Classifier, "rule_gradients", None)


def measured_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the trainable Linear and Conv2d layers of a model with feedback layers
    or a rule of its own; [] for other models."""
    if not (has_own_rule(model) or any(isinstance(m, FeedbackLayer) for m in model.modules())):
        return []
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad]


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors seen as vectors; NaN when either is zero."""
    a, b = a.flatten().double(), b.flatten().double()
    norms = a.norm() * b.norm()
    if norms == 0:
        return float("nan")
    cos = (a @ b / norms).clamp(-1.0, 1.0)
    return math.degrees(math.acos(cos.item()))


def alignment_angles(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """{"angle/<layer name>": degrees} for every measured layer; {} for other models.

    `model.loss` scores `model(x)` (x is the body's features while the model is `on_features`).
    """
    layers = measured_layers(model)
    if not layers:
        return {}
    weights = [m.weight for _, m in layers]
    was_training = model.training
    model.eval()
    try:
        own = model.rule_gradients(x, y) if has_own_rule(model) else None
        with torch.enable_grad():
            if own is not None:
                rule = [own[f"{name}.weight"] for name, _ in layers]
            else:
                rule = torch.autograd.grad(model.loss(model(x), y), weights)
            with exact_backprop(model):
                exact = torch.autograd.grad(model.loss(model(x), y), weights)
    finally:
        model.train(was_training)
    return {f"angle/{name}": angle_degrees(g, e)
            for (name, _), g, e in zip(layers, rule, exact, strict=True)}


def layer_roles(model: nn.Module) -> dict[str, str]:
    """{module name: role} of the measured layers, for legends: "conv 1 (1→16)",
    "hidden 1 (784→512)", ..., "output (256→10)" (sizes in→out; channels for convolutions).

    Forward order as `measured_layers` gives it; convolutions and fully connected layers are
    counted separately, and the last measured layer is the output.
    """
    layers = measured_layers(model)
    roles: dict[str, str] = {}
    counts = {"conv": 0, "hidden": 0}
    for i, (name, m) in enumerate(layers):
        conv = isinstance(m, nn.Conv2d)
        sizes = f"{m.in_channels}→{m.out_channels}" if conv else f"{m.in_features}→{m.out_features}"
        if i == len(layers) - 1:
            roles[name] = f"output ({sizes})"
            continue
        kind = "conv" if conv else "hidden"
        counts[kind] += 1
        roles[name] = f"{kind} {counts[kind]} ({sizes})"
    return roles
