"""Layers whose backward pass departs from backprop: FA, sign-symmetry, Kolen-Pollack and DFA.

One class per variant; each overrides one small method (`init_feedback` and `feedback`).
Fixed feedback matrices are buffers: they follow `.to(device)`, are saved in `state_dict`, and
the optimiser never sees them; Kolen-Pollack's B is a parameter, which the optimiser updates.
`exact_backprop(model)` switches every such layer back to plain backprop for a while; the
alignment angle compares the two updates that way.

- FA, Lillicrap et al. 2016 (Nature Communications 7:13276): B fixed and random.
- Sign-symmetry, Liao, Leibo & Poggio 2016 ("How important is weight symmetry in
  backpropagation?", AAAI; "uSF"): B = sign(W) times a scale, refreshed from W at every step.
- Kolen-Pollack, Akrout et al. 2019 ("Deep learning without weight transport", NeurIPS): B
  starts random and learns, receiving W's update, so it comes to equal W.
- DFA, Nøkland 2016 ("Direct feedback alignment provides learning in deep neural networks",
  NeurIPS): the output error reaches each hidden layer through its own fixed random matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn

from bioexp.feedback.functions import DirectFeedback, conv2d_feedback, linear_feedback

FeedbackInit = Literal["kaiming", "xavier"]
FEEDBACK_INITS = get_args(FeedbackInit)


def random_matrix(shape: Sequence[int], init: str) -> torch.Tensor:
    """A random matrix drawn like a weight: Kaiming uniform (nn.Linear's default) or Xavier."""
    if init not in FEEDBACK_INITS:
        raise ValueError(f"feedback init must be one of {', '.join(FEEDBACK_INITS)}, got {init!r}")
    b = torch.empty(*shape)
    if init == "kaiming":
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.xavier_uniform_(b)
    return b


class FeedbackLayer(nn.Module):
    """Base of every layer whose backward pass departs from backprop; `exact` restores it.

    The engine measures the alignment angle (`bioexp.alignment`) of every model that holds a
    FeedbackLayer: before phase 2's first step and after each of its epochs, it compares the
    gradient of each trainable Linear and Conv2d weight with the one exact backprop gives,
    which it gets by setting `exact` on every FeedbackLayer (`exact_backprop`). A subclass's
    forward pass must then backpropagate exactly; the forward values never change.

    Attributes:
        exact: While True, the layer backpropagates as plain backprop would (False by
            default; `exact_backprop` sets it for a while).
    """

    exact: bool = False


def random_feedback(weight: torch.Tensor, init: str, scale_to_weight: bool) -> torch.Tensor:
    """A random B of W's shape, optionally rescaled to W's Frobenius norm."""
    b = random_matrix(weight.shape, init)
    if scale_to_weight:
        b.mul_(weight.detach().norm() / b.norm())
    return b


class RandomFeedback(FeedbackLayer):
    """B fixed and random, optionally rescaled to W's Frobenius norm at initialisation."""

    def init_feedback(self, init: str, scale_to_weight: bool) -> None:
        self.register_buffer("feedback_weight", random_feedback(self.weight, init,
                                                                scale_to_weight))

    def feedback(self) -> torch.Tensor:
        return self.feedback_weight


class SignFeedback(FeedbackLayer):
    """B = sign(W) * mean|W|, recomputed from W at every forward pass.

    Each forward pass gets a fresh tensor (a backward pass may still need the previous one);
    the buffer keeps a copy of the latest B for inspection and checkpoints.
    """

    def init_feedback(self, init: str, scale_to_weight: bool) -> None:
        self.register_buffer("feedback_weight", torch.zeros_like(self.weight.detach()))

    def feedback(self) -> torch.Tensor:
        with torch.no_grad():
            b = torch.sign(self.weight) * self.weight.abs().mean()
            self.feedback_weight.copy_(b)
        return b


class KolenPollackFeedback(FeedbackLayer):
    """B learns: a parameter whose gradient is W's, so the optimiser gives it W's update, weight
    decay included, and W - B shrinks by the decay at every step (Kolen & Pollack 1994; Akrout
    et al. 2019, "Deep learning without weight transport", NeurIPS). It starts random, as FA's."""

    def init_feedback(self, init: str, scale_to_weight: bool) -> None:
        self.feedback_weight = nn.Parameter(random_feedback(self.weight, init, scale_to_weight))

    def feedback(self) -> torch.Tensor:
        return self.feedback_weight


class _FeedbackLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init: str = "kaiming", scale_to_weight: bool = False):
        super().__init__(in_features, out_features, bias)
        self.init_feedback(init, scale_to_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.weight.detach() if self.exact else self.feedback()  # exact: backprop
        return linear_feedback(x, self.weight, self.bias, b)


class _FeedbackConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, init: str = "kaiming",
                 scale_to_weight: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias)
        self.init_feedback(init, scale_to_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.weight.detach() if self.exact else self.feedback()  # exact: backprop
        return conv2d_feedback(x, self.weight, self.bias, b, self.stride, self.padding,
                               self.dilation, self.groups)


class FALinear(RandomFeedback, _FeedbackLinear):
    """Linear layer trained by feedback alignment (fixed random B)."""


class FAConv2d(RandomFeedback, _FeedbackConv2d):
    """2-D convolution trained by feedback alignment (fixed random B)."""


class SignLinear(SignFeedback, _FeedbackLinear):
    """Linear layer trained with sign-symmetric feedback."""


class SignConv2d(SignFeedback, _FeedbackConv2d):
    """2-D convolution trained with sign-symmetric feedback."""


class KPLinear(KolenPollackFeedback, _FeedbackLinear):
    """Linear layer trained by Kolen-Pollack learning (B gets W's update)."""


class KPConv2d(KolenPollackFeedback, _FeedbackConv2d):
    """2-D convolution trained by Kolen-Pollack learning (B gets W's update)."""


class DFAHidden(nn.Module):
    """Marks a hidden activation h for direct feedback alignment.

    While gradients are on, it hands h to its `DFAOutput` and passes on h.detach(): no error
    from the layers above reaches h by backprop; the DFAOutput's Function delivers e B_i instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self._owner: list[DFAOutput] = []  # a list, so the owner is not a registered child

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        if owner.exact or not torch.is_grad_enabled():
            return h
        owner.recorded.append(h)
        return h.detach()


class DFAOutput(FeedbackLayer):
    """Applied to the network output: routes the output error to every marked hidden layer.

    `feedback_i` (num_classes x hidden size i) is the fixed random matrix of marker i.
    """

    def __init__(self, markers: Sequence[DFAHidden], num_classes: int,
                 hidden_sizes: Sequence[int], init: str = "kaiming"):
        super().__init__()
        self.n_hidden = len(markers)
        for marker in markers:
            marker._owner.append(self)
        self.recorded: list[torch.Tensor] = []
        for i, size in enumerate(hidden_sizes):
            self.register_buffer(f"feedback_{i}", random_matrix((num_classes, size), init))

    def feedbacks(self) -> list[torch.Tensor]:
        return [getattr(self, f"feedback_{i}") for i in range(self.n_hidden)]

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        hidden, self.recorded = self.recorded, []
        if self.exact or not torch.is_grad_enabled():
            return output
        if len(hidden) != self.n_hidden:
            raise RuntimeError(f"DFA expected {self.n_hidden} marked activations in this forward "
                               f"pass, got {len(hidden)}")
        return DirectFeedback.apply(output, self.n_hidden, *self.feedbacks(), *hidden)


@contextmanager
def exact_backprop(model: nn.Module) -> Iterator[None]:
    """Within the block, every feedback layer of `model` backpropagates exactly.

    Args:
        model: A model; its `FeedbackLayer`s get `exact = True` until the block ends.
    """
    layers = [m for m in model.modules() if isinstance(m, FeedbackLayer)]
    for layer in layers:
        layer.exact = True
    try:
        yield
    finally:
        for layer in layers:
            layer.exact = False


def exact_gradient_note(model: nn.Module, use: str) -> str:
    """How an input gradient taken under `exact_backprop` was obtained, in words, for the
    records of its `use` (the attack, the gradient methods)."""
    if any(isinstance(m, FeedbackLayer) for m in model.modules()):
        return f"exact input gradient (feedback layers switched to exact backprop for {use})"
    return "exact input gradient"
