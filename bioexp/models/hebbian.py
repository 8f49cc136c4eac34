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
from typing import Annotated, Literal

from torch import nn

from bioexp.layers import HebbianLinear
from bioexp.layers.feedback import FALinear
from bioexp.models.base import ActivationName, Classifier, Probability, Sizes, make_activation
from bioexp.models.baselines import mlp_layers
from bioexp.registry import Range, register_model
from bioexp.rules.hebbian import RuleName, make_rule


@register_model
def semihebb(input_shape: tuple[int, ...], num_classes: int,
             hebbian: Annotated[Sequence[int], Range(low=1, min_len=1)] = (2000,),
             head: Sizes = (), rule: RuleName = "gupta",
             sparsity: Annotated[float, Range(0, 100, high_open=True)] = 60.0,
             normalize: bool = True, activation: ActivationName = "relu",
             dropout: Probability = 0.0, head_type: Literal["fc", "fa"] = "fc") -> Classifier:
    """Hebbian layers (hebb, oja, gupta or gupta_local rule) under an FC or FA head."""
    sizes = [math.prod(input_shape), *hebbian]
    body = nn.Sequential(nn.Flatten(), *(
        HebbianLinear(fan_in, fan_out, make_rule(rule, sparsity), make_activation(activation),
                      normalize)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)))
    linear = FALinear if head_type == "fa" else nn.Linear
    layers = mlp_layers([hebbian[-1], *head, num_classes], activation, dropout, linear)
    return Classifier(head=nn.Sequential(*layers), body=body)
