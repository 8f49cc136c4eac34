"""semiHebb: Hebbian layers, trained by a local rule and no labels, under a supervised head.

The Hebbian body (`bioexp.layers.HebbianLinear` with a rule from `bioexp.rules.hebbian`) learns
on the forward pass: in the unsupervised phase of `two_phase`, or on every training batch of
`one_phase` while the head takes its optimiser step. The head is trained by backprop (`fc`) or
feedback alignment (`fa`). After HebbNet (Gupta, Ambikapathi & Ramasamy 2021, ICASSP) and the
semiHebb experiments of the Brown CLPS1291 project that bioexp grew from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers import HebbianLinear
from bioexp.layers.feedback import FALinear
from bioexp.models.base import Classifier, check_sizes, make_activation
from bioexp.models.baselines import mlp_layers
from bioexp.registry import register_model
from bioexp.rules.hebbian import RuleName, make_rule


@register_model
def semihebb(input_shape: tuple[int, ...], num_classes: int, hebbian: Sequence[int] = (2000,),
             head: Sequence[int] = (), rule: RuleName = "gupta", sparsity: float = 60.0,
             normalize: bool = True, activation: str = "relu", dropout: float = 0.0,
             head_type: Literal["fc", "fa"] = "fc") -> Classifier:
    """Hebbian layers (hebb, oja, gupta or gupta_local rule) under an FC or FA head."""
    check_sizes("model.hebbian", hebbian, allow_empty=False)
    check_sizes("model.head", head)
    if not 0 <= sparsity < 100:
        raise ConfigError(f"model.sparsity must be a percentile in [0, 100), got {sparsity!r}")
    sizes = [math.prod(input_shape), *hebbian]
    body = nn.Sequential(nn.Flatten(), *(
        HebbianLinear(fan_in, fan_out, make_rule(rule, sparsity), make_activation(activation),
                      normalize)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)))
    linear = FALinear if head_type == "fa" else nn.Linear
    layers = mlp_layers([hebbian[-1], *head, num_classes], activation, dropout, linear)
    return Classifier(head=nn.Sequential(*layers), body=body)
