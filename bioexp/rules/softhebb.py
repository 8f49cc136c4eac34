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

and the authors' code (NeuromorphicComputing/SoftHebb, `hebbconv.py`) scales a layer's whole
update so that its largest entry is 1 before eta_k multiplies it (`normalize_update`, on by
default), which makes the rate independent of the batch size and of the input's scale; this is
Krotov & Hopfield's scaling too (`bioexp.rules.krotov.normalized_step`). The official code
writes the competition with an inverse temperature, softmax(beta u); `temperature` here is
1 / beta.

Simplified: the rule uses the plain currents (no bias, no prior over units).

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

# Bump when the rule's arithmetic changes: it is part of the phase-1 cache key. 2: the update is
# scaled as dW * (1 / max|dW|) (Krotov's normalized_step), no longer dW / max|dW|. 3: the
# convolutional layer pads its input itself (reflect padding), subnormal soft-WTA outputs are
# flushed to 0, and the anti-Hebbian sign is set with a scatter instead of a one-hot tensor.
RULE_VERSION = 3


def soft_wta(u: torch.Tensor, temperature: float, anti_hebbian: bool = True,
             dim: int = 1, winners: torch.Tensor | None = None) -> torch.Tensor:
    """y = softmax(u / temperature) along the units' dimension `dim`; with `anti_hebbian`, every
    entry but each sample's (or position's) largest is negated (Journé et al. 2023). `winners`,
    when the caller has them, is `u.argmax(dim, keepdim=True)`."""
    y = torch.softmax(u / temperature, dim=dim)
    # Flush the subnormal probabilities (below 1.2e-38, far under float32's rounding of any
    # sum they enter) to 0: on x86 CPUs every operation on a subnormal is some 30 times slower,
    # and with currents as large as an initial norm of 25 gives, a good share of them are.
    y.masked_fill_(y < torch.finfo(y.dtype).tiny, 0.0)
    if not anti_hebbian:
        return y
    if winners is None:
        winners = u.argmax(dim=dim, keepdim=True)  # one per sample or position
    # Negate everything, then put the winners' own values back: the same as a one-hot mask,
    # without building one.
    return y.neg().scatter_(dim, winners, y.gather(dim, winners))


def softhebb_dense(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, temperature: float,
                   anti_hebbian: bool = True, winners: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """dW (H, D) = sum over the batch of y_k (x - u_k w_k), for u = x W^T (`winners`: see
    `soft_wta`)."""
    y = soft_wta(u, temperature, anti_hebbian, dim=1, winners=winners)
    return y.T @ x - (y * u).sum(dim=0)[:, None] * w


def softhebb_conv(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, temperature: float,
                  anti_hebbian: bool = True, stride: int = 1, padding: int = 0,
                  winners: torch.Tensor | None = None) -> torch.Tensor:
    """dW (H, C, k, k): the dense rule summed over every patch of every image, for
    u = conv2d(x, W, stride, padding); the softmax runs over the channels at each position
    (`winners`: see `soft_wta`)."""
    y = soft_wta(u, temperature, anti_hebbian, dim=1, winners=winners)
    # (H, C, k, k) in W's own layout (the element-wise steps after it run several times slower
    # on mixed layouts)
    hebb = torch.nn.grad.conv2d_weight(x, w.shape, y, stride=stride, padding=padding
                                       ).contiguous(memory_format=_layout(w))
    drive = (y * u).sum(dim=(0, 2, 3))  # sum over samples and positions of y_k u_k
    return hebb.addcmul_(drive.view(-1, 1, 1, 1), w, value=-1)  # hebb - drive_k w_k, in place


def _layout(w: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if w.dim() == 4 and w.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)


def unit_norms(w: torch.Tensor) -> torch.Tensor:
    """(H,): the Euclidean norm r_k of each unit's weights (the first dimension indexes units);
    a reduction over the other dimensions, so a channels-last `w` is not copied."""
    return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())))


def adaptive_rates(w: torch.Tensor, power: float) -> torch.Tensor:
    """(H,): |r_k - 1|^power, the factor of each unit's learning rate (Journé et al. 2023 use
    power 0.5); power 0 gives 1 for every unit, a plain shared rate."""
    if power == 0:
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    return (unit_norms(w) - 1).abs().pow(power)


def step_factors(dw: torch.Tensor, w: torch.Tensor, lr: float, rate_power: float,
                 normalize: bool = True) -> torch.Tensor:
    """(H,): what each unit's dW_k is multiplied by to give its weight change:
    lr * |r_k - 1|^rate_power, divided by max|dW| (the largest entry of the whole update) when
    `normalize`."""
    rates = adaptive_rates(w, rate_power) * lr
    if not normalize:
        return rates
    low, high = torch.aminmax(dw)  # max|dW| in one pass, without a temporary |dW|
    return rates * torch.maximum(-low, high).clamp_min(1e-30).reciprocal()


def softhebb_step(dw: torch.Tensor, w: torch.Tensor, lr: float, rate_power: float,
                  normalize: bool = True) -> torch.Tensor:
    """The weight change the layer adds: lr * |r_k - 1|^rate_power * dW_k, with dW scaled to a
    largest entry of 1 first when `normalize` (the layers add dW_k * `step_factors` in place)."""
    factors = step_factors(dw, w, lr, rate_power, normalize)
    return dw * factors.view(-1, *([1] * (w.dim() - 1)))
