"""SoftHebb: Hebbian plasticity in a soft winner-take-all layer, dense and convolutional.

Moraitis, Toichkin, Journé, Chua & Guo 2022 ("SoftHebb: Bayesian inference in unsupervised
Hebbian soft winner-take-all networks", Neuromorph. Comput. Eng. 2:044017) derive the rule for a
layer of H units with weights W (H, D): for an input x (D,), the currents are u = W x, the soft
winner-take-all output is y = softmax(u / tau) over the units, and

    dw_k = y_k (x - u_k w_k)                  (Oja-like: it drives |w_k| towards 1)

Journé, Garcia Rodriguez, Guo & Moraitis 2023 ("Hebbian deep learning without feedback", ICLR)
make it multilayer and convolutional, and add (the form implemented here):

- soft anti-Hebbian plasticity: y_k -> -y_k for every unit but the winner, argmax_k u_k;
- a per-unit adaptive learning rate that shrinks as the unit's weight norm r_k = |w_k| nears 1:
  eta_k = eta * |r_k - 1|^q, with q = 0.5 in the paper (`adaptive_rates`);

and this implementation (`normalize_update`, on by default) scales a layer's update so that its
largest entry is 1 before eta_k multiplies it, as Krotov & Hopfield's rule does
(`bioexp.rules.krotov.normalized_step`), which makes the rate independent of the batch size and
of the input's scale.

Simplified: the rule uses the plain currents (no bias, no prior over units), and every layer
learns from the same pass (the engine's phase 1), not one layer after another.

The convolutional rule is the same rule applied to every image patch, each patch one sample:
sum over batch and positions of y_k(b, p) (patch(b, p) - u_k(b, p) w_k). The Hebbian sum of
y_k * patch is the gradient of a convolution with respect to its weight, so
`torch.nn.grad.conv2d_weight` computes it without unfolding the patches.

Shapes: dense x (B, D), u and y (B, H), W (H, D); convolutional x (B, C, height, width), u and y
(B, H, P, Q), W (H, C, k, k). Every function returns a new tensor and mutates nothing; the
learning rate and the step are the caller's (the layer's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bioexp.rules.krotov import normalized_step

# Bump when the rule's arithmetic changes: it is part of the phase-1 cache key. 2: the update is
# scaled as dW * (1 / max|dW|) (Krotov's normalized_step), no longer dW / max|dW|.
RULE_VERSION = 2


def soft_wta(u: torch.Tensor, temperature: float, anti_hebbian: bool = True,
             dim: int = 1) -> torch.Tensor:
    """y = softmax(u / temperature) along the units' dimension `dim`; with `anti_hebbian`, every
    entry but each sample's (or position's) largest is negated (Journé et al. 2023)."""
    y = torch.softmax(u / temperature, dim=dim)
    if not anti_hebbian:
        return y
    winners = F.one_hot(u.argmax(dim=dim), u.shape[dim]).movedim(-1, dim).bool()
    return torch.where(winners, y, -y)


def softhebb_dense(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, temperature: float,
                   anti_hebbian: bool = True) -> torch.Tensor:
    """dW (H, D) = sum over the batch of y_k (x - u_k w_k), for u = x W^T."""
    y = soft_wta(u, temperature, anti_hebbian, dim=1)
    return y.T @ x - (y * u).sum(dim=0)[:, None] * w


def softhebb_conv(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, temperature: float,
                  anti_hebbian: bool = True, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """dW (H, C, k, k): the dense rule summed over every patch of every image, for
    u = conv2d(x, W, stride, padding); the softmax runs over the channels at each position."""
    y = soft_wta(u, temperature, anti_hebbian, dim=1)
    hebb = torch.nn.grad.conv2d_weight(x, w.shape, y, stride=stride, padding=padding)
    drive = (y * u).sum(dim=(0, 2, 3))  # sum over samples and positions of y_k u_k
    return hebb - drive.view(-1, *([1] * (w.dim() - 1))) * w


def unit_norms(w: torch.Tensor) -> torch.Tensor:
    """(H,): the Euclidean norm r_k of each unit's weights (the first dimension indexes units)."""
    return w.flatten(1).norm(dim=1)


def adaptive_rates(w: torch.Tensor, power: float) -> torch.Tensor:
    """(H,): |r_k - 1|^power, the factor of each unit's learning rate (Journé et al. 2023 use
    power 0.5); power 0 gives 1 for every unit, a plain shared rate."""
    if power == 0:
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    return (unit_norms(w) - 1).abs().pow(power)


def softhebb_step(dw: torch.Tensor, w: torch.Tensor, lr: float, rate_power: float,
                  normalize: bool = True) -> torch.Tensor:
    """The weight change the layer adds: lr * |r_k - 1|^rate_power * dW_k, with dW scaled to a
    largest entry of 1 first when `normalize`."""
    step = normalized_step(dw, 1.0) if normalize else dw
    rates = adaptive_rates(w, rate_power) * lr
    return step * rates.view(-1, *([1] * (w.dim() - 1)))
