"""Equilibrium propagation (Scellier & Bengio 2017, "Equilibrium propagation: bridging the gap
between energy-based models and backpropagation", Frontiers in Computational Neuroscience 11;
symmetric nudging: Laborieux et al. 2021, "Scaling equilibrium propagation to deep ConvNets by
drastically reducing its gradient estimator bias", Frontiers in Neuroscience 15): `eqprop_mlp`.

A layered Hopfield-like network: the image s_0 = x is clamped, and the states s_1..s_L of the
hidden and output layers, each in [0, 1], settle under the primitive function (Laborieux
et al.'s formulation, in which the states are the units' firing rates):

    Phi(s) = sum_l s_l . (W_l s_{l-1} + b_l)

Each step updates every layer at once, from the same state, to rho of Phi's slope in it, with
rho(v) = min(max(v, 0), 1) (the hard sigmoid):

    s_l <- rho(W_l s_{l-1} + b_l + W_{l+1}^T s_{l+1})       (no W_{L+1} term at the output)

The nudged phases add -beta L(s_L, y) to Phi, L = 1/2 |s_L - one-hot(y)|^2, which pulls the
output towards the target: s_L <- rho(W_L s_{L-1} + b_L + beta (y - s_L)).

Learning a batch (`train_step`):

1. Free phase: from s = 0, `free_steps` (T1) steps; the output s_L is the prediction, and
   L(s_L, y) the reported loss.
2. Nudged phases, each `nudged_steps` (T2) steps from the free fixed point: at +beta and at
   -beta (symmetric nudging, whose estimate has no first-order bias in beta), or at +beta
   alone against the free state (`symmetric: false`, the original one-sided estimate).
3. The contrastive, local update: Phi's slope in W_l is s_l s_{l-1}^T, so

       dL/dW_l ~ -(1 / 2 beta) (s_l^+ (s_{l-1}^+)^T - s_l^- (s_{l-1}^-)^T),
       dL/db_l ~ -(1 / 2 beta) (s_l^+ - s_l^-)                              (batch means)

   written into `.grad` and applied by the phase's optimiser. With one-sided nudging the
   difference is between s^+ and the free state, over beta.

As beta shrinks, the symmetric estimate approaches the gradient of L at the free fixed point
(the equilibrium propagation theorem: Scellier & Bengio 2017, in this discrete-time form Ernoult
et al. 2019); with the hard sigmoid a saturated unit has slope 0 and stays put, so the limit is
the gradient of the fixed point by implicit differentiation. The first layer's drive
W_1 x + b_1 is computed once per batch; every other step costs two small products per layer.
Dynamics are written out (not settled by autograd, as the reference code does), so a prediction
runs under `torch.no_grad()`, and `forward` stays differentiable in the image and the weights
(backprop through the T1 steps) for FGSM, attributions and the alignment angle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bioexp.models.base import Classifier, Count, Layers, Positive
from bioexp.models.energy import RowNorms, SettlingClassifier, set_row_norms, squared_error
from bioexp.registry import register_model


def hard_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """rho(v) = min(max(v, 0), 1)."""
    return v.clamp(0.0, 1.0)


class EPNet(nn.Module):
    """The layered network and its dynamics; `forward(x)` is the output of the free phase."""

    def __init__(self, sizes: Sequence[int], free_steps: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                    strict=True))
        self.free_steps = free_steps

    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """W_1 x + b_1, constant while the image is clamped."""
        return self.layers[0](x.flatten(1))

    def zero_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(len(x), layer.out_features) for layer in self.layers]

    def settle(self, drive: torch.Tensor, states: list[torch.Tensor], steps: int,
               beta: float = 0.0, target: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`steps` synchronous updates of every layer from `states` (a new list; the input's
        tensors are not changed), nudged by `beta` towards `target` at the output."""
        layers, top = self.layers, len(self.layers) - 1
        for _ in range(steps):
            new = []
            for i in range(top + 1):
                v = drive if i == 0 else layers[i](states[i - 1])
                if i < top:
                    v = v + states[i + 1] @ layers[i + 1].weight
                elif beta:
                    v = v + beta * (target - states[i])
                new.append(hard_sigmoid(v))
            states = new
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.settle(self.input_drive(x), self.zero_states(x), self.free_steps)[-1]

    def extra_repr(self) -> str:
        return f"free_steps={self.free_steps}"


class EquilibriumPropagation(SettlingClassifier):
    """A Classifier whose head is an `EPNet` trained by equilibrium propagation (the module's
    docstring): a free phase, nudged phases, and the contrastive update, applied by the phase's
    optimiser."""

    def __init__(self, net: EPNet, beta: float, nudged_steps: int, symmetric: bool):
        super().__init__(head=net)
        self.beta, self.nudged_steps, self.symmetric = beta, nudged_steps, symmetric

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1/2 |s_L - one-hot(target)|^2 per image, batch mean, at the free fixed point."""
        return squared_error(output, target)

    @torch.no_grad()
    def relax(self, x: torch.Tensor, target: torch.Tensor,
              optimizer: torch.optim.Optimizer | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The free, then the nudged phases: the free phase's output and the EP estimate of
        the gradient of 1/2 |s_L - target|^2 (batch mean) in every parameter (in
        `parameters()` order), for targets (B, classes); one optimiser step on it when
        `optimizer` is given. The phases run in float32 whatever the caller's autocast: the
        update is a difference of two states O(beta) apart, which bf16's 8 bits of mantissa
        would blur (at beta 0.1, a cosine of 0.93 with float32's estimate)."""
        dtype = self.head.layers[0].weight.dtype  # float32 unless the model was converted
        with torch.autocast(x.device.type, enabled=False):  # the contrast needs float32
            output, grads = self._phases(x.to(dtype), target.to(dtype))
        if optimizer is not None:
            self.apply_gradients(grads, optimizer)
        return output, grads

    def _phases(self, x: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = self.head
        drive = net.input_drive(x)
        free = net.settle(drive, net.zero_states(x), net.free_steps)
        plus = net.settle(drive, free, self.nudged_steps, self.beta, target)
        if self.symmetric:
            minus, span = net.settle(drive, free, self.nudged_steps, -self.beta, target), \
                2 * self.beta
        else:
            minus, span = free, self.beta
        n, inputs = len(x), x.flatten(1)
        grads = []
        for i in range(len(plus)):
            below_plus = inputs if i == 0 else plus[i - 1]
            below_minus = inputs if i == 0 else minus[i - 1]
            weight = plus[i].T @ below_plus - minus[i].T @ below_minus
            grads += [-weight / (span * n), -(plus[i] - minus[i]).mean(dim=0) / span]
        return free[-1], grads



@register_model
def eqprop_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Layers = (512,),
               beta: Positive = 0.1, free_steps: Count = 30, nudged_steps: Count = 10,
               symmetric: bool = True, init_row_norms: RowNorms = None) -> Classifier:
    """Equilibrium propagation (Scellier & Bengio 2017) in a layered hard-sigmoid network.

    A free phase of `free_steps` settles the states; nudged phases of `nudged_steps` at +beta
    and -beta (symmetric nudging, Laborieux et al. 2021; `symmetric: false` for +beta alone)
    pull the output towards the target; each weight moves by the difference of the products of
    its two units' states between the phases. Prediction is the free phase's output.
    `init_row_norms` (one per hidden layer) rescales the hidden layers' initial rows to those
    lengths. See the module's docstring.
    """
    sizes = [math.prod(input_shape), *hidden, num_classes]
    net = EPNet(sizes, free_steps)
    set_row_norms(net.layers[:-1], init_row_norms)
    return EquilibriumPropagation(net, beta, nudged_steps, symmetric)
