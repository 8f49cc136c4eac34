"""Predictive coding (Whittington & Bogacz 2017, Neural Computation 29(5); Millidge, Tschantz &
Buckley 2022, Neural Computation 34(6); the PCX benchmark, Pinchetti et al., ICLR 2025):
`pc_mlp`, a discriminative predictive-coding network.

Every layer has value nodes x_l; x_0 is the image (clamped), and each layer predicts the next:

    a_l  = W_l x_{l-1} + b_l,    mu_l = f(a_l)   (mu_L = a_L: the output layer is linear)
    e_l  = x_l - mu_l                            (the prediction error)
    F    = sum_l 1/2 |e_l|^2                     (the energy, per image)

Learning a batch (`train_step`):

1. One feed-forward pass sets x_l = mu_l, so every hidden error is 0; the output x_L is then
   clamped to the one-hot target, and e_L = y - mu_L carries the whole error. F there equals
   the squared-error loss 1/2 |mu_L - y|^2, which is what `loss` reports.
2. Inference: T steps (`inference_steps`) of gradient descent on F in the hidden values, at
   rate gamma (`inference_lr`), all layers at once from the same state:

       dF/dx_l = e_l - W_{l+1}^T (f'(a_{l+1}) * e_{l+1})

3. Learning: the weights' gradient of F at the settled state, which needs only the error after
   a synapse and the activity before it:

       dF/dW_l = -(f'(a_l) * e_l) x_{l-1}^T,   dF/db_l = -f'(a_l) * e_l    (batch means)

   It is written into each parameter's `.grad` and the phase's optimiser applies it, as it
   would a gradient (PCX trains its weights with an optax optimiser the same way).

With `output_energy: cross_entropy` the output layer's term of F is the cross-entropy
-sum_k y_k log softmax(a_L)_k instead of 1/2 |y - a_L|^2 (PCX's energy for classification): its
error is e_L = y - softmax(a_L), everything else is unchanged, and the reported loss is the
cross-entropy of the feed-forward logits.

The incremental variant (`variant: incremental`, iPC: Salvatori et al., "A stable, fast, and
fully automatic learning algorithm for predictive coding networks", ICLR 2024) takes step 3 at
every inference step, from the same state as that step's value update: T optimiser steps a
batch, weights and values moving together.

Prediction is one feed-forward pass, mu_L (no inference without a target). With inference at
equilibrium and a small output error, -dF/dW_l equals backprop's gradient of the squared error
of the same feed-forward network (Whittington & Bogacz 2017); it departs as the error grows.
The first layer's drive W_1 x_0 + b_1 does not change during inference (x_0 is clamped), so it
is computed once; each inference step costs two products per layer above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.models.base import Classifier, Count, Positive, Sizes
from bioexp.models.energy import RowNorms, SettlingClassifier, set_row_norms, squared_error
from bioexp.registry import register_model

PCActivation = Literal["relu", "leaky_relu", "tanh", "sigmoid"]
Variant = Literal["standard", "incremental"]
OutputEnergy = Literal["squared_error", "cross_entropy"]
LEAK = 0.01  # leaky_relu's slope below 0


def _relu_slope(a: torch.Tensor) -> torch.Tensor:
    return (a > 0).to(a.dtype)


def _leaky_slope(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, 1.0, LEAK).to(a.dtype)


def _tanh_slope(a: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(a).square()


def _sigmoid_slope(a: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(a)
    return s * (1 - s)


# name -> (f, f'), both of the pre-activation a
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                             Callable[[torch.Tensor], torch.Tensor]]] = {
    "relu": (F.relu, _relu_slope),
    "leaky_relu": (lambda a: F.leaky_relu(a, LEAK), _leaky_slope),
    "tanh": (torch.tanh, _tanh_slope),
    "sigmoid": (torch.sigmoid, _sigmoid_slope),
}


class PCNet(nn.Module):
    """The feed-forward network whose predictions the value nodes settle around:
    `forward(x)` is mu_L, one pass with every value at its prediction."""

    def __init__(self, sizes: Sequence[int], activation: str):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:],
                                                                    strict=True))
        self.activation = activation
        self.f, self.slope = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.f(h)
        return h

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class PredictiveCoding(SettlingClassifier):
    """A Classifier whose head is a `PCNet` trained by predictive coding (the module's
    docstring): inference on the value nodes, then a local weight update, applied by the
    phase's optimiser. Its `rule_gradients` are the update of the settled state, for both
    variants (the incremental one moves its weights during inference, so its total update
    differs)."""

    def __init__(self, net: PCNet, inference_steps: int, inference_lr: float, variant: str,
                 output_energy: str = "squared_error"):
        super().__init__(head=net)
        self.inference_steps, self.inference_lr, self.variant = (
            inference_steps, inference_lr, variant)
        self.output_energy = output_energy

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The output layer's energy at the feed-forward state, batch mean: 1/2 |mu_L - y|^2
        (`squared_error`) or the cross-entropy of softmax(mu_L) (`cross_entropy`)."""
        if self.output_energy == "cross_entropy":
            return F.cross_entropy(output, target)
        return squared_error(output, target)

    def readout(self, logits: torch.Tensor) -> torch.Tensor:
        """What the clamped output is compared with: mu_L itself, or softmax(mu_L) for the
        cross-entropy energy (whose slope in mu_L is softmax(mu_L) - y)."""
        if self.output_energy == "cross_entropy":
            return torch.softmax(logits.float(), dim=1)
        return logits

    @torch.no_grad()
    def relax(self, x: torch.Tensor, target: torch.Tensor,
              optimizer: torch.optim.Optimizer | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Inference on one batch with the output clamped to `target` (B, classes): returns
        the feed-forward output mu_L (before any update) and the weight gradients dF/dW_l,
        dF/db_l of the settled state (in `parameters()` order). With `optimizer`, the
        optimiser steps on them after inference (standard) or at every inference step
        (incremental; the gradients returned are then those of the state after the last)."""
        net = self.head
        weights = [layer.weight for layer in net.layers]
        biases = [layer.bias for layer in net.layers]
        top = len(weights) - 1
        values = [x.flatten(1)]
        drives = []  # a_l
        for i in range(top + 1):
            drives.append(F.linear(values[-1], weights[i], biases[i]))
            values.append(net.f(drives[-1]) if i < top else drives[-1])
        predictions = values[1:]  # mu_l, the feed-forward state
        output = predictions[-1]
        # the value nodes accumulate many small steps: float32 even under bf16 autocast
        values = [values[0], *(v.to(torch.float32, copy=True) for v in values[1:-1]),
                  target.to(torch.float32)]
        target = values[-1]
        # errors of the feed-forward state: 0 in the hidden layers, y - mu_L at the output
        errors = [torch.zeros_like(v) for v in values[1:-1]] + [target - self.readout(output)]
        slopes = [net.slope(a) for a in drives[:-1]]
        incremental = self.variant == "incremental" and optimizer is not None
        gamma = self.inference_lr
        for _ in range(self.inference_steps):
            deltas = [s * e for s, e in zip(slopes, errors, strict=False)] + [errors[-1]]
            # hidden value x_{i+1}: dF/dx = e - W^T (f' e) of the next layer, from this state
            pulls = [deltas[i + 1] @ weights[i + 1] for i in range(top)]
            if incremental:  # the weights step from the same state as the values
                self.apply_gradients(self._gradients(values, deltas), optimizer)
            for i in range(top):
                values[i + 1].add_(errors[i], alpha=-gamma).add_(pulls[i], alpha=gamma)
            for i in range(top + 1):
                if i > 0 or incremental:  # a_1 changes only with W_1: x_0 is clamped
                    a = F.linear(values[i], weights[i], biases[i])
                    if i < top:
                        slopes[i], predictions[i] = net.slope(a), net.f(a)
                    else:
                        predictions[i] = a
                errors[i] = values[i + 1] - (predictions[i] if i < top
                                             else self.readout(predictions[i]))
        deltas = [s * e for s, e in zip(slopes, errors, strict=False)] + [errors[-1]]
        grads = self._gradients(values, deltas)
        if optimizer is not None and not incremental:
            self.apply_gradients(grads, optimizer)
        return output, grads

    @staticmethod
    def _gradients(values: list[torch.Tensor], deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """dF/dW_l = -delta_l^T x_{l-1} / B and dF/db_l = -mean(delta_l), per layer."""
        n = len(values[0])
        grads = []
        for x, delta in zip(values, deltas, strict=False):
            grads += [-(delta.T @ x) / n, -delta.mean(dim=0)]
        return grads


@register_model
def pc_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sizes = (128, 128, 128),
           activation: PCActivation = "tanh", inference_steps: Count = 5,
           inference_lr: Positive = 0.025, variant: Variant = "standard",
           output_energy: OutputEnergy = "cross_entropy",
           init_row_norms: RowNorms = None) -> Classifier:
    """Predictive-coding MLP (Whittington & Bogacz 2017): value nodes settle, then local updates.

    The output is clamped to the target, `inference_steps` steps of rate `inference_lr` relax
    the hidden values on the energy sum_l |x_l - f(W_l x_{l-1})|^2 / 2, and each weight moves by
    its prediction error times its presynaptic activity. `variant: incremental` updates the
    weights at every inference step (Salvatori et al. 2024). `output_energy: cross_entropy`
    replaces the output layer's squared error by the cross-entropy of its softmax, as PCX
    does for classification. `init_row_norms` (one per hidden layer) rescales the hidden
    layers' initial rows to those lengths. See the module's docstring.
    """
    sizes = [math.prod(input_shape), *hidden, num_classes]
    net = PCNet(sizes, activation)
    set_row_norms(net.layers[:-1], init_row_norms)
    return PredictiveCoding(net, inference_steps, inference_lr, variant,
                            output_energy)
