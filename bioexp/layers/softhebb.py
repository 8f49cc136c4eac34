"""Soft winner-take-all layers trained by SoftHebb (Moraitis et al. 2022; Journé et al. 2023).

A layer's output is its plain current u = W x (dense) or u = conv2d(x, W) (convolutional), the
quantity the rule needs; the models put the activation (the 2023 paper's "triangle",
`Triangle`) and the pooling after it. `local_update(x, u, lr)` applies the rule of
`bioexp.rules.softhebb` to the input the layer saw and the current it gave: the soft WTA
y = softmax(u / temperature) over the units (with anti-Hebbian non-winners), dW_k = sum of
y_k (x - u_k w_k), scaled to a largest entry of 1 (as the authors' code does), times each
unit's adaptive rate lr * lr_scale * |r_k - 1|^rate_power. W is a buffer, so the optimiser never
touches it.

Initial weights follow the authors' code (`train.py`, `check_dimension`): each entry drawn with a
scale that gives every unit a weight norm of about `init_radius` (their 25 for convolutions,
35 for the dense layer): Gaussian, std init_radius / sqrt(fan-in), where BatchNorm precedes the
layer; uniform in [0, sqrt(3) init_radius / sqrt(fan-in)) (`init="positive"`) where it does not.

`Standardize` is a statistics-free per-sample input normalisation (`model.norm=sample`); the
paper's is BatchNorm without parameters (`model.norm=batch`, the default): see the models.
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
    step_factors,
    unit_norms,
)

INITS = ("gaussian", "positive")  # how initial weights are drawn (see the module's docstring)
PADDINGS = ("reflect", "zeros")  # how a convolution pads its input (F.pad's modes)

# A unit whose norm moved less than this fraction of the way from init_radius to 1 is still
# where it started (unconverged).
STILL_NORM = 0.3  # the initial norms scatter around init_radius (a Gaussian draw)


class SoftHebbUnits(LocalLayer):
    """What the dense and the convolutional SoftHebb layers share: the weights, their settings,
    the win counts, the statistics and the Gaussian control. Subclasses give `forward` and
    `rule_update`."""

    version = RULE_VERSION

    def __init__(self, shape: tuple[int, ...], temperature: float, anti_hebbian: bool = True,
                 rate_power: float = 0.5, normalize_update: bool = True,
                 init_radius: float = 1.0, lr_scale: float = 1.0, init: str = "gaussian"):
        super().__init__()
        if temperature <= 0 or init_radius <= 0 or rate_power < 0 or lr_scale < 0:
            raise ValueError("temperature and init_radius must be above 0, rate_power and "
                             "lr_scale at least 0")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        fan_in = math.prod(shape[1:])
        if init == "gaussian":  # E|w_k|^2 = fan_in * (r / sqrt(fan_in))^2 = r^2
            w = torch.randn(shape) * (init_radius / math.sqrt(fan_in))
        else:  # uniform [0, a): E w^2 = a^2 / 3, so a = sqrt(3) r / sqrt(fan_in)
            w = torch.rand(shape) * (math.sqrt(3) * init_radius / math.sqrt(fan_in))
        self.register_buffer("weight", w)  # (H, ...): one row of input weights per unit
        self.register_buffer("wins", torch.zeros(shape[0]))  # samples or positions won
        self.temperature, self.anti_hebbian = float(temperature), bool(anti_hebbian)
        self.rate_power, self.normalize_update = float(rate_power), bool(normalize_update)
        self.init_radius, self.lr_scale, self.init = float(init_radius), float(lr_scale), init

    def rule_update(self, x: torch.Tensor, u: torch.Tensor,
                    winners: torch.Tensor | None = None) -> torch.Tensor:
        """dW, before scaling, for input `x` and current `u` (`winners`: u.argmax(1, keepdim))."""
        raise NotImplementedError

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """One SoftHebb step: dW from `rule_update` for input `x` and current `y`, each unit's
        step scaled by `lr * lr_scale` and its norm (`step_factors`), and the win counts."""
        winners = y.argmax(dim=1, keepdim=True)  # y is the layer's output: the current u
        dw = self.rule_update(x, y, winners)
        factors = step_factors(dw, self.weight, lr * self.lr_scale, self.rate_power,
                               self.normalize_update)  # (H,)
        self.weight.addcmul_(dw, factors.view(-1, *([1] * (dw.dim() - 1))))
        self.wins.add_(torch.bincount(winners.flatten(), minlength=len(self.wins))
                       .to(self.wins.dtype))

    @torch.no_grad()
    def gaussian_init_(self) -> None:
        """The Gaussian control: isotropic Gaussian filters, each rescaled to unit Euclidean
        norm, the norm the rule takes a unit to."""
        self.weight.normal_()
        self.weight /= unit_norms(self.weight).clamp_min(1e-12).view(
            -1, *([1] * (self.weight.dim() - 1)))

    def local_stats(self) -> dict[str, float]:
        """`weight_norm_mean`, `weight_norm_max` (the units' Euclidean norms),
        `units_converged` (the share within CONVERGED_NORM of 1) and `units_never_won`."""
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
                "epochs or schedule.unsupervised.lr (or model.lr_scales)")

    def receptive_fields(self) -> torch.Tensor:
        """(H, inputs of one unit): each unit's weights, flattened."""
        return self.weight.flatten(1)  # (H, inputs of one unit)

    def unit_usage(self) -> torch.Tensor:
        """(H,): the samples (dense) or positions (convolution) each unit won."""
        return self.wins

    def settings_repr(self) -> str:
        return (f"temperature={self.temperature:g}, anti_hebbian={self.anti_hebbian}, "
                f"rate_power={self.rate_power:g}, normalize_update={self.normalize_update}, "
                f"init={self.init}, init_radius={self.init_radius:g}, "
                f"lr_scale={self.lr_scale:g}")


class SoftHebbLinear(SoftHebbUnits):
    """u = x W^T for W (units, in_features) learnt by SoftHebb; no bias."""

    def __init__(self, in_features: int, units: int, temperature: float, **settings):
        super().__init__((units, in_features), temperature, **settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T  # (B, D) @ (D, H) -> (B, H)

    def rule_update(self, x: torch.Tensor, u: torch.Tensor,
                    winners: torch.Tensor | None = None) -> torch.Tensor:
        return softhebb_dense(x, u, self.weight, self.temperature, self.anti_hebbian,
                              winners=winners)

    def extra_repr(self) -> str:
        h, d = self.weight.shape
        return f"in_features={d}, units={h}, {self.settings_repr()}"


class SoftHebbConv2d(SoftHebbUnits):
    """u = conv2d(x, W) with stride 1 and `kernel_size // 2` pixels of padding on each side
    (`padding_mode`: "reflect", the authors', or "zeros"; an input no wider than the padding,
    which cannot be reflected, is padded by replicating its edge), so the output keeps the
    input's size for odd kernels; W (out_channels, in_channels, k, k) learnt by SoftHebb over
    every patch; no bias. The soft WTA competes over the channels at each position."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 temperature: float, padding_mode: str = "reflect", **settings):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), temperature,
                         **settings)
        # W stays channels-last, the layout of the CPU's fast convolutions and of their weight
        # gradient, so no step converts it (the values are the same in either layout)
        self.weight = self.weight.contiguous(memory_format=torch.channels_last)
        if padding_mode not in PADDINGS:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDINGS)}, got "
                             f"{padding_mode!r}")
        self.padding, self.padding_mode = kernel_size // 2, padding_mode

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it: padded, channels-last (the CPU's convolutions,
        their weight gradient and the pooling after them are several times faster so; the
        values are the same)."""
        if self.padding:
            p, mode = self.padding, self.padding_mode
            if mode == "reflect" and min(x.shape[-2:]) <= p:
                mode = "replicate"  # an image too small to reflect (tiny test images)
            x = F.pad(x, (p, p, p, p), mode="constant" if mode == "zeros" else mode)
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.contiguous(memory_format=torch.channels_last)  # a no-op unless loaded
        return F.conv2d(self.pad(x), w).contiguous(memory_format=torch.channels_last)

    def rule_update(self, x: torch.Tensor, u: torch.Tensor,
                    winners: torch.Tensor | None = None) -> torch.Tensor:
        return softhebb_conv(self.pad(x), u, self.weight, self.temperature, self.anti_hebbian,
                             winners=winners)

    def field_shape(self) -> tuple[int, int, int]:
        """(in_channels, k, k): the shape of one unit's receptive field, for plotting."""
        return tuple(self.weight.shape[1:])

    def extra_repr(self) -> str:
        h, c, k, _ = self.weight.shape
        return (f"in_channels={c}, out_channels={h}, kernel_size={k}, padding={self.padding}, "
                f"padding_mode={self.padding_mode}, {self.settings_repr()}")


class Triangle(nn.Module):
    """The 2023 paper's activation: relu(u - mean over units of u)^power, the mean taken over
    dimension 1 (the channels at each position of a convolution, the units of a dense layer)."""

    def __init__(self, power: float = 1.0):
        super().__init__()
        self.power = float(power)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = (u - u.mean(dim=1, keepdim=True)).relu_()
        if self.power == 1:
            return out
        # in place where no gradient needs relu's output (phase 1, features)
        return out.pow(self.power) if torch.is_grad_enabled() else out.pow_(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power:g}"


class Standardize(nn.Module):
    """(x - mean) / std over every dimension but the batch's, per sample.

    The paper puts BatchNorm(affine=False) before each SoftHebb layer (`model.norm=batch`).
    This is the statistics-free alternative (`model.norm=sample`): the same centring and
    scaling from each image's own statistics, so phase 1, the features computed for the
    read-out and the controls all see one deterministic normalisation, independent of the
    batch and of any pass over the data.
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
