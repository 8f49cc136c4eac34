"""Autograd Functions that send errors backwards through a feedback matrix B instead of W.

Pure functions of tensors, no state. The forward pass is the ordinary linear or convolution
layer; the backward pass computes the input gradient with B in place of W (Lillicrap et al. 2016,
"Random synaptic feedback weights support error backpropagation for deep learning", Nature
Communications 7:13276), and the weight and bias gradients exactly as backprop does. With B = W
both are backprop.

When B itself requires grad, its gradient is W's: that is Kolen-Pollack learning (Kolen & Pollack
1994; Akrout et al. 2019, "Deep learning without weight transport", NeurIPS), in which the
optimiser gives B the same update as W, weight decay included, so B comes to equal W without
ever reading it.

Under autocast (`precision=bf16`) the forward pass runs in bf16 and so does the error that comes
back; the backward passes compute in the error's dtype (B and the saved input are cast to it,
as autocast casts W for a plain layer), and autograd returns each gradient in its input's dtype.
In fp32 the casts are no-ops. Nothing here waits for the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


class LinearFeedback(torch.autograd.Function):
    """y = x W^T + b; backward: dx = dy B, dW = dy^T x, db = sum(dy), and dB = dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, feedback = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        needs = ctx.needs_input_grad
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)  # bf16 under autocast
        if needs[0]:
            grad_x = grad_out @ feedback  # (..., out) @ (out, in) -> (..., in)
        if needs[1] or needs[3]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and needs[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w if needs[1] else None, grad_b, grad_w if needs[3] else None


class Conv2dFeedback(torch.autograd.Function):
    """2-D convolution whose input gradient is the transposed convolution with B, not W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, feedback = ctx.saved_tensors
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)  # bf16 under autocast
        stride, padding, dilation, groups = ctx.conv
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1] or needs[3], ctx.bias_shape is not None and needs[2]]
        # convolution_backward takes the input gradient from the `weight` it is given (B here)
        # and the weight gradient from the input, so one call computes both.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, feedback, ctx.bias_shape, stride, padding, dilation, False, [0, 0],
            groups, mask)
        return (grad_x, grad_w if needs[1] else None, grad_b, grad_w if needs[3] else None,
                None, None, None, None)


def linear_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    feedback: torch.Tensor) -> torch.Tensor:
    return LinearFeedback.apply(x, weight, bias, feedback)


def conv2d_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    feedback: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                    groups: int = 1) -> torch.Tensor:
    # convolution_backward takes int lists only, where F.conv2d also takes ints.
    return Conv2dFeedback.apply(x, weight, bias, feedback, _pair(stride), _pair(padding),
                                _pair(dilation), groups)


class DirectFeedback(torch.autograd.Function):
    """Direct feedback alignment's top-level Function (Nøkland 2016, "Direct Feedback Alignment
    Provides Learning in Deep Neural Networks", NeurIPS).

    forward(output, B_1..B_n, h_1..h_n) returns `output` unchanged. backward receives the output
    error e = dL/d(output) and returns it for `output`, and e B_i for every hidden activation
    h_i: each hidden layer gets the error through its own fixed random matrix, never through
    the layers above it (the markers cut that path in the forward pass).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        feedbacks, hidden = tensors[:n], tensors[n:]
        ctx.save_for_backward(*feedbacks)
        ctx.shapes = [h.shape for h in hidden]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feedbacks = ctx.saved_tensors
        # (B, C) @ (C, prod(hidden shape)) -> hidden shape
        grads = [(grad_out @ fb.to(grad_out.dtype)).view(shape)
                 for fb, shape in zip(feedbacks, ctx.shapes, strict=True)]
        return (grad_out, None, *([None] * len(feedbacks)), *grads)
