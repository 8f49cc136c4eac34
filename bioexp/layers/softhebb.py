"""Soft winner-take-all layers trained by SoftHebb (Moraitis et al. 2022; Journé et al. 2023).

A layer's output is its plain current u = W x (dense) or u = conv2d(x, W) (convolutional), the
quantity the rule needs; the models put the activation (the 2023 paper's "triangle",
`Triangle`) and the pooling after it. `local_update(x, u, lr)` applies the rule of
`bioexp.rules.softhebb` to the input the layer saw and the current it gave: the soft WTA
y = softmax(u / temperature) over the units (with anti-Hebbian non-winners), dW_k = sum of
y_k (x - u_k w_k), scaled to a largest entry of 1, times each unit's adaptive rate
lr * lr_scale * |r_k - 1|^rate_power. W is a buffer, so the optimiser never touches it.

`Standardize` is the statistics-free input normalisation the models put before every SoftHebb
layer in place of the paper's BatchNorm(affine=False): see its docstring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bioexp.layers.local import LocalLayer, converged_share
from bioexp.rules.softhebb import (
    RULE_VERSION,
    softhebb_conv,
    softhebb_dense,
    softhebb_step,
    unit_norms,
)

# A unit whose norm moved less than this fraction of the way from init_radius to 1 is still
# where it started (unconverged).
STILL_NORM = 0.1


class SoftHebbUnits(LocalLayer):
    """What the dense and the convolutional SoftHebb layers share: the weights, their settings,
    the win counts, the statistics and the Gaussian control. Subclasses give `forward` and
    `rule_update`."""

    version = RULE_VERSION

    def __init__(self, shape: tuple[int, ...], temperature: float, anti_hebbian: bool = True,
                 rate_power: float = 0.5, normalize_update: bool = True,
                 init_radius: float = 1.0, lr_scale: float = 1.0):
        super().__init__()
        if temperature <= 0 or init_radius <= 0 or rate_power < 0 or lr_scale < 0:
            raise ValueError("temperature and init_radius must be above 0, rate_power and "
                             "lr_scale at least 0")
        w = torch.randn(shape)
        w *= init_radius / unit_norms(w).clamp_min(1e-12).view(-1, *([1] * (len(shape) - 1)))
        self.register_buffer("weight", w)  # (H, ...): one row of input weights per unit
        self.register_buffer("wins", torch.zeros(shape[0]))  # samples or positions won
        self.temperature, self.anti_hebbian = float(temperature), bool(anti_hebbian)
        self.rate_power, self.normalize_update = float(rate_power), bool(normalize_update)
        self.init_radius, self.lr_scale = float(init_radius), float(lr_scale)

    def rule_update(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """dW, before scaling, for input `x` and current `u`."""
        raise NotImplementedError

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        dw = self.rule_update(x, y)  # y is the layer's output: the current u
        self.weight.add_(softhebb_step(dw, self.weight, lr * self.lr_scale, self.rate_power,
                                       self.normalize_update))
        winners = y.argmax(dim=1).flatten()
        self.wins.add_(torch.bincount(winners, minlength=len(self.wins)).to(self.wins.dtype))

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        self.weight.normal_()  # unscaled: rows of norm about sqrt(fan-in)

    def local_stats(self) -> dict[str, float]:
        norms = unit_norms(self.weight)
        return {"weight_norm_mean": norms.mean().item(), "weight_norm_max": norms.max().item(),
                "units_converged": converged_share(norms),
                "units_never_won": int((self.wins == 0).sum().item())}

    def unconverged(self) -> str | None:
        """A sentence when most units' weight norms are still close to their initial
        `init_radius`: the rule has barely moved them. (The norms need not all reach 1: the
        anti-Hebbian updates of units that lose push theirs away from 1.)"""
        norms = unit_norms(self.weight)
        moved = ((norms - self.init_radius).abs() > STILL_NORM * abs(self.init_radius - 1))
        if moved.float().mean().item() >= 0.5:
            return None
        return (f"only {moved.float().mean().item():.0%} of the {len(norms)} units of a SoftHebb "
                f"layer moved their weight norm from its initial {self.init_radius:g} towards "
                f"1 (median norm now {norms.median().item():.2f}): phase 1 was too short for "
                "it, and its features are close to their random start; give it more images, "
                "epochs or schedule.unsupervised.lr (or model.deep_lr_scale)")

    def receptive_fields(self) -> torch.Tensor:
        return self.weight.flatten(1)  # (H, inputs of one unit)

    def unit_usage(self) -> torch.Tensor:
        return self.wins

    def settings_repr(self) -> str:
        return (f"temperature={self.temperature:g}, anti_hebbian={self.anti_hebbian}, "
                f"rate_power={self.rate_power:g}, normalize_update={self.normalize_update}, "
                f"init_radius={self.init_radius:g}, lr_scale={self.lr_scale:g}")


class SoftHebbLinear(SoftHebbUnits):
    """u = x W^T for W (units, in_features) learnt by SoftHebb; no bias."""

    def __init__(self, in_features: int, units: int, temperature: float, **settings):
        super().__init__((units, in_features), temperature, **settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T  # (B, D) @ (D, H) -> (B, H)

    def rule_update(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return softhebb_dense(x, u, self.weight, self.temperature, self.anti_hebbian)

    def extra_repr(self) -> str:
        h, d = self.weight.shape
        return f"in_features={d}, units={h}, {self.settings_repr()}"


class SoftHebbConv2d(SoftHebbUnits):
    """u = conv2d(x, W) with stride 1 and `kernel_size // 2` zero padding (the same size for
    odd kernels), W (out_channels, in_channels, k, k) learnt by SoftHebb over every patch; no
    bias. The soft WTA competes over the channels at each position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 temperature: float, **settings):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), temperature,
                         **settings)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last tensors make the CPU's convolutions, and the pooling after them,
        # several times faster; the values are the same.
        x = x.contiguous(memory_format=torch.channels_last)
        w = self.weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, padding=self.padding).contiguous(memory_format=torch.channels_last)

    def rule_update(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return softhebb_conv(x, u, self.weight, self.temperature, self.anti_hebbian,
                             padding=self.padding)

    def field_shape(self) -> tuple[int, int, int]:
        """(in_channels, k, k): the shape of one unit's receptive field, for plotting."""
        return tuple(self.weight.shape[1:])

    def extra_repr(self) -> str:
        h, c, k, _ = self.weight.shape
        return (f"in_channels={c}, out_channels={h}, kernel_size={k}, padding={self.padding}, "
                f"{self.settings_repr()}")


class Triangle(nn.Module):
    """The 2023 paper's activation: relu(u - mean over units of u)^power, the mean taken over
    dimension 1 (the channels at each position of a convolution, the units of a dense layer)."""

    def __init__(self, power: float = 1.0):
        super().__init__()
        self.power = float(power)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = (u - u.mean(dim=1, keepdim=True)).relu_()
        return out if self.power == 1 else out.pow_(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power:g}"


class Standardize(nn.Module):
    """(x - mean) / std over every dimension but the batch's, per sample.

    The paper puts BatchNorm(affine=False) before each SoftHebb layer. Per-sample statistics do
    the same centring and scaling without running statistics, so phase 1, the features the
    engine precomputes in eval mode and the random-feature controls (which skip phase 1 and
    would leave a BatchNorm's running statistics at their initial values) all see one and the
    same deterministic normalisation, independent of the batch.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        return (x - mean) / torch.sqrt(var + self.eps)


def pool_output(size: int, kernel: int, stride: int, padding: int) -> int:
    """The side of a pooling window's output for an input side of `size`."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1
