"""Feedback alignment: autograd Functions, FA/sign/DFA layers, models and alignment angles."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, bioexp_command, output_of
from torch import nn

import bioexp as bioexp_api
from bioexp.alignment import alignment_angles, angle_degrees, measured_layers
from bioexp.data import Dataset, Split
from bioexp.engine import Interrupted, Schedule, SupervisedPhase, UnsupervisedPhase, fit
from bioexp.errors import ConfigError
from bioexp.feedback.functions import conv2d_feedback, linear_feedback
from bioexp.layers.feedback import (
    DFAOutput,
    FAConv2d,
    FALinear,
    KPConv2d,
    KPLinear,
    SignConv2d,
    SignLinear,
    exact_backprop,
)
from bioexp.records import CHECKPOINT, RunRecorder, read_json, read_metrics
from bioexp.registry import build_model
from bioexp.train import run

F64 = torch.float64
NEW_MODELS = ("fa_mlp", "sign_mlp", "dfa_mlp", "kp_mlp", "fa_cnn", "kp_cnn", "cnn_fa")
SMALL = {"fa_mlp": {"hidden": [6, 5]}, "sign_mlp": {"hidden": [6, 5]},
         "dfa_mlp": {"hidden": [6, 5]}, "kp_mlp": {"hidden": [6, 5]},
         "fa_cnn": {"channels": [4, 8], "hidden": [16]},
         "kp_cnn": {"channels": [4, 8], "hidden": [16]},
         "cnn_fa": {"channels": [2, 3], "hidden": [6]}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def rand(*shape: int, grad: bool = True, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=F64, generator=g).requires_grad_(grad)


def small_model(name: str, shape: tuple[int, ...] = (1, 8, 8), classes: int = 3,
                **kwargs) -> nn.Module:
    return build_model(name, shape, classes, **{**SMALL[name], "dropout": 0.0, **kwargs})


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------------------------
# 1. LinearFeedback / linear_feedback


@pytest.mark.parametrize("batch", [(7,), (2, 3)], ids=["2d", "3d"])
def test_linear_feedback_input_gradient_is_grad_output_times_b(batch: tuple[int, ...]) -> None:
    x, w, b = rand(*batch, 5, seed=0), rand(4, 5, seed=1), rand(4, seed=2)
    fb = rand(4, 5, grad=False, seed=3)
    out = linear_feedback(x, w, b, fb)
    close(out, F.linear(x, w, b))
    grad_out = rand(*batch, 4, grad=False, seed=4)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ fb)
    assert not torch.allclose(x.grad, grad_out @ w.detach())  # B really replaced W
    # Weight and bias gradients are backprop's, whatever B is.
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).backward(grad_out)
    close(w.grad, w2.grad)
    close(b.grad, b2.grad)
    assert fb.grad is None


@pytest.mark.parametrize("batch", [(7,), (2, 3)], ids=["2d", "3d"])
def test_linear_feedback_with_b_equal_w_is_nn_linear(batch: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    x = rand(*batch, 5, seed=1)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = rand(*batch, 4, grad=False, seed=2)
    layer(x_ref).backward(grad_out)
    ref = (x_ref.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    linear_feedback(x, w, b, w.detach()).backward(grad_out)
    for got, want in zip((x.grad, w.grad, b.grad), ref, strict=True):
        close(got, want)


def test_linear_feedback_without_bias() -> None:
    x, w, fb = rand(6, 5, seed=0), rand(4, 5, seed=1), rand(4, 5, grad=False, seed=2)
    out = linear_feedback(x, w, None, fb)
    close(out, x.detach() @ w.detach().T)
    grad_out = rand(6, 4, grad=False, seed=3)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ fb)
    close(w.grad, grad_out.T @ x.detach())


def test_linear_feedback_gradcheck_passes_only_when_b_is_w() -> None:
    x, w, b = rand(3, 4, seed=0), rand(2, 4, seed=1), rand(2, seed=2)
    assert torch.autograd.gradcheck(lambda x, w, b: linear_feedback(x, w, b, w.detach()),
                                    (x, w, b))
    fb = rand(2, 4, grad=False, seed=3)
    # Weight and bias gradients stay true with a random B; the input gradient does not.
    assert torch.autograd.gradcheck(lambda w, b: linear_feedback(x.detach(), w, b, fb), (w, b))
    assert not torch.autograd.gradcheck(lambda x: linear_feedback(x, w.detach(), None, fb),
                                        (x,), raise_exception=False)


# ---------------------------------------------------------------------------------------------
# 2. Conv2dFeedback / conv2d_feedback

CONV_SETTINGS = [  # stride, padding, dilation, groups
    ((1, 1), (0, 0), (1, 1), 1),
    ((2, 2), (1, 1), (1, 1), 1),
    ((1, 2), (2, 0), (1, 1), 1),
    ((3, 3), (1, 1), (1, 1), 1),  # output does not cover the 9x8 input exactly
    ((1, 1), (1, 1), (2, 2), 2),
]


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), CONV_SETTINGS)
def test_conv2d_feedback_with_b_equal_w_is_nn_conv2d(stride, padding, dilation, groups) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation,
                     groups=groups).double()
    x = rand(2, 4, 9, 8, seed=1)
    x_ref = x.detach().clone().requires_grad_()
    out_ref = conv(x_ref)
    grad_out = torch.randn_like(out_ref)
    out_ref.backward(grad_out)
    w, b = (p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias))
    out = conv2d_feedback(x, w, b, w.detach(), stride, padding, dilation, groups)
    close(out, out_ref)
    out.backward(grad_out)
    close(x.grad, x_ref.grad)
    close(w.grad, conv.weight.grad)
    close(b.grad, conv.bias.grad)


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), CONV_SETTINGS)
def test_conv2d_feedback_input_gradient_uses_b(stride, padding, dilation, groups) -> None:
    x, w = rand(2, 4, 9, 8, seed=0), rand(6, 4 // groups, 3, 3, seed=1)
    fb = rand(6, 4 // groups, 3, 3, grad=False, seed=2)
    out = conv2d_feedback(x, w, None, fb, stride, padding, dilation, groups)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    close(x.grad, torch.nn.grad.conv2d_input(x.shape, fb, grad_out, stride, padding, dilation,
                                             groups))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(x2, w2, None, stride, padding, dilation, groups).backward(grad_out)
    close(w.grad, w2.grad)
    assert not torch.allclose(x.grad, x2.grad)


def test_conv2d_feedback_gradcheck_with_b_equal_w() -> None:
    x, w, b = rand(1, 2, 4, 4, seed=0), rand(2, 2, 2, 2, seed=1), rand(2, seed=2)
    assert torch.autograd.gradcheck(
        lambda x, w, b: conv2d_feedback(x, w, b, w.detach(), (2, 2), (1, 1)), (x, w, b))


def test_conv2d_feedback_accepts_int_stride_and_padding_like_f_conv2d() -> None:
    x, w = rand(1, 2, 7, 7, seed=0), rand(3, 2, 3, 3, seed=1)
    conv2d_feedback(x, w, None, w.detach(), stride=2, padding=1).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv2d(x2, w2, None, stride=2, padding=1).sum().backward()
    close(x.grad, x2.grad)


# ---------------------------------------------------------------------------------------------
# 3. Layers

LAYERS = {
    "FALinear": lambda: FALinear(5, 4),
    "FAConv2d": lambda: FAConv2d(2, 3, 3, padding=1),
    "SignLinear": lambda: SignLinear(5, 4),
    "SignConv2d": lambda: SignConv2d(2, 3, 3, padding=1),
}


def layer_input(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = (3, 5) if isinstance(layer, nn.Linear) else (3, 2, 6, 6)
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("kind", LAYERS)
def test_feedback_matrix_is_a_buffer_not_a_parameter(kind: str) -> None:
    layer = LAYERS[kind]()
    assert "feedback_weight" in layer.state_dict()
    assert "feedback_weight" in dict(layer.named_buffers())
    assert all(p is not layer.feedback_weight for p in layer.parameters())
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}
    assert layer.feedback_weight.shape == layer.weight.shape


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["FALinear", "FAConv2d"])
def test_optimizer_step_changes_w_but_not_b(kind: str, optimizer: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    b0, w0 = layer.feedback_weight.clone(), layer.weight.detach().clone()
    opt = (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
           if optimizer == "sgd" else torch.optim.Adam(layer.parameters(), lr=0.1,
                                                       weight_decay=0.1))
    for _ in range(2):
        opt.zero_grad()
        layer(layer_input(layer)).square().sum().backward()
        opt.step()
    assert not torch.equal(layer.weight, w0)
    assert torch.equal(layer.feedback_weight, b0)


@pytest.mark.parametrize("kind", LAYERS)
def test_state_dict_round_trip_restores_b(kind: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    layer(layer_input(layer))  # sign layers fill B from W
    torch.manual_seed(1)
    fresh = LAYERS[kind]()
    assert not torch.equal(fresh.feedback_weight, layer.feedback_weight)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.feedback_weight, layer.feedback_weight)
    x = layer_input(layer).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    layer(x).sum().backward()
    fresh(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("kind", LAYERS)
def test_b_follows_dtype_conversion(kind: str) -> None:
    layer = LAYERS[kind]().to(F64)
    assert layer.feedback_weight.dtype == F64
    x = layer_input(layer, F64).requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert out.dtype == F64 and x.grad.dtype == F64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", LAYERS)
def test_b_follows_to_cuda(kind: str) -> None:
    layer = LAYERS[kind]().to("cuda")
    assert layer.feedback_weight.device.type == "cuda"
    x = layer_input(layer).cuda().requires_grad_()
    layer(x).sum().backward()
    assert x.grad.device.type == "cuda"


@pytest.mark.parametrize("make", [lambda: FALinear(30, 20, scale_to_weight=True),
                                  lambda: FAConv2d(3, 4, 5, scale_to_weight=True,
                                                   init="xavier")])
def test_scale_to_weight_matches_norms(make) -> None:
    layer = make()
    assert layer.feedback_weight.norm().item() == pytest.approx(layer.weight.norm().item(),
                                                                rel=1e-5)
    unscaled = FALinear(30, 20, init="xavier")
    assert unscaled.feedback_weight.norm().item() != pytest.approx(
        unscaled.weight.norm().item(), rel=1e-2)


@pytest.mark.parametrize(("make", "fan_in", "fan_out"), [
    (lambda init: FALinear(400, 100, init=init), 400, 100),
    (lambda init: FAConv2d(4, 8, 3, init=init), 36, 72),
])
def test_kaiming_and_xavier_feedback_bounds(make, fan_in: int, fan_out: int) -> None:
    torch.manual_seed(0)
    bounds = {"kaiming": 1 / math.sqrt(fan_in), "xavier": math.sqrt(6 / (fan_in + fan_out))}
    assert bounds["xavier"] > 1.3 * bounds["kaiming"]
    for init, bound in bounds.items():
        top = make(init).feedback_weight.abs().max().item()
        assert 0.9 * bound < top <= bound, init


def test_unknown_feedback_init_is_rejected() -> None:
    with pytest.raises(ValueError, match="feedback init"):
        FALinear(3, 2, init="gaussian")
    with pytest.raises(ConfigError, match="model.feedback_init"):
        build_model("fa_mlp", (4,), 2, feedback_init="gaussian")


@pytest.mark.parametrize("kind", ["SignLinear", "SignConv2d"])
def test_sign_feedback_is_sign_w_times_mean_abs_w_and_follows_w(kind: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()

    def expected() -> torch.Tensor:
        return torch.sign(layer.weight.detach()) * layer.weight.detach().abs().mean()

    x = layer_input(layer).requires_grad_()
    out = layer(x)
    assert torch.equal(layer.feedback_weight, expected())
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    if kind == "SignLinear":
        close(x.grad, grad_out @ expected())
    else:
        close(x.grad, torch.nn.grad.conv2d_input(x.shape, expected(), grad_out, 1, 1))
    before = layer.feedback_weight.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    opt.step()
    layer(layer_input(layer))
    assert torch.equal(layer.feedback_weight, expected())
    assert not torch.equal(layer.feedback_weight, before)


def test_sign_layer_can_be_applied_twice_before_backward() -> None:
    layer = SignLinear(5, 4)
    x = torch.randn(3, 5, requires_grad=True)
    (layer(x).sum() + layer(x * 2).sum()).backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["fa_mlp", "sign_mlp", "dfa_mlp"])
def test_exact_backprop_gives_plain_backprop_gradients_and_restores_the_rule(name: str) -> None:
    torch.manual_seed(0)
    model = small_model(name, (6,), 3).double()
    plain = build_model("bp_mlp", (6,), 3, hidden=[6, 5], dropout=0.0).double()
    with torch.no_grad():
        for src, dst in zip(linears(model), linears(plain), strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    x, y = rand(8, 6, grad=False, seed=1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def grads(m: nn.Module) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_()
        m.zero_grad()
        m.loss(m(xi), y).backward()
        return [xi.grad] + [p.grad.clone() for p in m.parameters()]

    want = grads(plain)
    with exact_backprop(model):
        got = grads(model)
    for g, w in zip(got, want, strict=True):
        close(g, w)
    # Afterwards the rule is back: the first hidden layer no longer gets backprop's gradient.
    after = grads(model)
    assert not torch.allclose(after[1], want[1])
    assert not any(getattr(m, "exact", False) for m in model.modules())


def test_exact_backprop_restores_the_rule_after_an_exception() -> None:
    model = small_model("fa_mlp", (6,), 3)
    with pytest.raises(KeyError), exact_backprop(model):
        raise KeyError("boom")
    assert not any(getattr(m, "exact", False) for m in model.modules())


def test_fa_mlp_hidden_gradient_flows_through_b_of_the_layer_above() -> None:
    torch.manual_seed(0)
    model = build_model("fa_mlp", (4,), 3, hidden=[5], dropout=0.0).double()
    first, last = linears(model)
    x, y = rand(6, 4, grad=False, seed=1), torch.tensor([0, 1, 2, 2, 1, 0])
    out = model(x)
    model.loss(out, y).backward()
    with torch.no_grad():
        a = first(x)
        e = (out.softmax(1) - F.one_hot(y, 3)) / len(y)
        delta = (e @ last.feedback_weight) * (a > 0)
        close(first.weight.grad, delta.T @ x)
        close(first.bias.grad, delta.sum(0))
        close(last.weight.grad, e.T @ a.relu())


# ---------------------------------------------------------------------------------------------
# 4. DFA


def dfa_tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("dfa_mlp", (1, 2, 2), 3, hidden=[5, 4], dropout=0.0).double()


def dfa_output(model: nn.Module) -> DFAOutput:
    return next(m for m in model.modules() if isinstance(m, DFAOutput))


def test_dfa_hidden_gradients_are_output_error_times_fixed_matrix() -> None:
    model = dfa_tiny()
    l1, l2, l3 = linears(model)
    b0, b1 = dfa_output(model).feedbacks()
    assert b0.shape == (3, 5) and b1.shape == (3, 4)
    pre: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, args, out: torch.Tensor) -> None:
        out.retain_grad()
        pre[module] = out

    for layer in (l1, l2):
        layer.register_forward_hook(keep)
    x = rand(6, 1, 2, 2, grad=False, seed=1)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    out = model(x)
    model.loss(out, y).backward()
    with torch.no_grad():
        xf = x.flatten(1)
        a1 = xf @ l1.weight.T + l1.bias
        h1 = a1.relu()
        a2 = h1 @ l2.weight.T + l2.bias
        h2 = a2.relu()
        close(out, h2 @ l3.weight.T + l3.bias)
        e = (out.softmax(1) - F.one_hot(y, 3)) / len(y)
        d1 = (e @ b0) * (a1 > 0)
        d2 = (e @ b1) * (a2 > 0)
    close(pre[l1].grad, d1)
    close(pre[l2].grad, d2)
    close(l1.weight.grad, d1.T @ xf)
    close(l1.bias.grad, d1.sum(0))
    close(l2.weight.grad, d2.T @ h1)
    close(l2.bias.grad, d2.sum(0))
    # The output layer learns by backprop.
    close(l3.weight.grad, e.T @ h2)
    close(l3.bias.grad, e.sum(0))
    assert dfa_output(model).recorded == []


def test_dfa_evaluation_under_no_grad_records_nothing_and_matches_the_grad_forward() -> None:
    model = dfa_tiny()
    out_layer = dfa_output(model)
    x = rand(4, 1, 2, 2, grad=False, seed=1)
    with torch.no_grad():
        quiet = model(x)
    assert out_layer.recorded == []
    for _ in range(3):  # forward passes without backward
        loud = model(x)
        assert out_layer.recorded == []
    assert torch.equal(quiet, loud.detach())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), quiet)
    assert out_layer.recorded == []


def test_dfa_model_has_no_extra_parameters_and_b_is_saved() -> None:
    model = dfa_tiny()
    state = model.state_dict()
    out_layer = dfa_output(model)
    names = [n for n, _ in model.named_buffers()]
    assert len(names) == 2 and all(n in state for n in names)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for m in linears(model) for p in m.parameters())
    fresh = build_model("dfa_mlp", (1, 2, 2), 3, hidden=[5, 4], dropout=0.0).double()
    fresh.load_state_dict(state)
    for a, b in zip(dfa_output(fresh).feedbacks(), out_layer.feedbacks(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 5. Alignment angles


def test_angle_degrees_known_values() -> None:
    a = torch.randn(4, 6)
    assert angle_degrees(a, a.clone()) == pytest.approx(0.0, abs=1e-5)
    assert angle_degrees(a, 3 * a) == pytest.approx(0.0, abs=1e-5)
    assert angle_degrees(a, -a) == pytest.approx(180.0, abs=1e-5)
    assert angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(90)
    g = torch.Generator().manual_seed(0)
    big = angle_degrees(torch.randn(200, 300, generator=g), torch.randn(200, 300, generator=g))
    assert abs(big - 90) < 3
    assert math.isnan(angle_degrees(torch.zeros(3, 3), a[:3, :3]))
    assert math.isnan(angle_degrees(a, torch.zeros_like(a)))


def probe_batch(shape: tuple[int, ...], n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *shape, generator=g), torch.randint(3, (n,), generator=g)


def test_alignment_is_zero_when_b_equals_w() -> None:
    torch.manual_seed(0)
    model = small_model("fa_mlp", (6,), 3)
    x, y = probe_batch((6,))
    random_b = alignment_angles(model, x, y)
    with torch.no_grad():
        for layer in linears(model):
            layer.feedback_weight.copy_(layer.weight)
    angles = alignment_angles(model, x, y)
    assert set(angles) == {"angle/head.1", "angle/head.3", "angle/head.5"}
    assert all(v == pytest.approx(0.0, abs=1e-3) for v in angles.values()), angles
    # With random B, the hidden layers' updates are not backprop's; the last layer's is.
    assert random_b["angle/head.1"] > 1 and random_b["angle/head.3"] > 1
    assert random_b["angle/head.5"] == pytest.approx(0.0, abs=1e-3)


def test_alignment_is_empty_for_backprop_models() -> None:
    for name, kwargs in [("bp_mlp", {"hidden": [6]}), ("cnn", {"channels": [2, 3],
                                                                "hidden": [6]})]:
        model = build_model(name, (1, 8, 8), 3, **kwargs)
        assert alignment_angles(model, *probe_batch((1, 8, 8))) == {}
        assert measured_layers(model) == []


@pytest.mark.parametrize("name", NEW_MODELS)
def test_alignment_has_one_key_per_trainable_layer_and_touches_nothing(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 3, **SMALL[name])  # default dropout: eval mode matters
    x, y = probe_batch((1, 8, 8))
    model.loss(model(x), y).backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.train()
    angles = alignment_angles(model, x, y)
    expected = {f"angle/{n}" for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(angles) == expected
    assert all(0 <= v <= 180 for v in angles.values()), angles
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and torch.equal(p.grad, grads[n]), n
    model.eval()
    alignment_angles(model, x, y)
    assert not model.training
    assert all(not getattr(m, "exact", False) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# 6. Models


@pytest.mark.parametrize("name", NEW_MODELS)
def test_new_models_learn_a_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    model = small_model(name)
    x, y = probe_batch((1, 8, 8), n=24)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def save_cnn_run(run_dir: Path, channels: list[int]) -> nn.Module:
    torch.manual_seed(3)
    model = build_model("cnn", (1, 8, 8), 3, channels=channels, hidden=[6])
    path = run_dir / CHECKPOINT
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return model


def with_sources(model: nn.Module) -> nn.Module:
    model.load_sources()
    return model


def test_cnn_fa_loads_and_freezes_convolutions_from_a_cnn_run(tmp_path: Path) -> None:
    source = save_cnn_run(tmp_path / "run", [2, 3])
    model = with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "run")))
    src_convs = [m for m in source.modules() if isinstance(m, nn.Conv2d)]
    convs = [m for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    for got, want in zip(convs, src_convs, strict=True):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
        assert not got.weight.requires_grad and not got.bias.requires_grad
    frozen = [c.weight.detach().clone() for c in convs]
    head = [p.detach().clone() for p in model.head.parameters()]
    x, y = probe_batch((1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model.loss(model(x), y).backward()
        opt.step()
    assert all(torch.equal(c.weight, w) for c, w in zip(convs, frozen, strict=True))
    assert any(not torch.equal(p, h) for p, h in zip(model.head.parameters(), head, strict=True))
    assert set(alignment_angles(model, x, y)) == {"angle/head.1", "angle/head.3"}


def test_cnn_fa_conv_from_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.conv_from"):
        with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "missing")))
    corrupt = tmp_path / "corrupt" / CHECKPOINT
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="model.conv_from"):
        with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "corrupt")))
    save_cnn_run(tmp_path / "wide", [4, 5])
    with pytest.raises(ConfigError, match="model.conv_from"):
        with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "wide")))
    no_model = tmp_path / "nomodel" / CHECKPOINT
    no_model.parent.mkdir(parents=True)
    torch.save({"epoch": 1}, no_model)
    with pytest.raises(ConfigError, match="model.conv_from"):
        with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "nomodel")))


# ---------------------------------------------------------------------------------------------
# 7. End to end


def image_data(n: int = 96, classes: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 1, 8, 8, generator=g)

    def split(m: int) -> Split:
        y = torch.randint(classes, (m,), generator=g)
        return Split(centres[y] + 0.5 * torch.randn(m, 1, 8, 8, generator=g), y)

    return Dataset("images", split(n), split(n // 2), None, classes)


def short_schedule(epochs: int = 3) -> Schedule:
    return Schedule("two_phase", UnsupervisedPhase(1, 16, 0.01), SupervisedPhase(epochs, 16, 0.01))


@pytest.mark.parametrize("name", ["fa_mlp", "dfa_mlp"])
def test_fit_logs_alignment_angles_every_epoch(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = small_model(name)
    recorder = RunRecorder(tmp_path)
    result = fit(model, image_data(), short_schedule(), recorder, seed=0)
    keys = {f"angle/{n}" for n, _ in measured_layers(model)}
    assert len(keys) == 3
    rows = [r for r in recorder.rows if r["phase"] == "supervised"]
    # epoch 0 is the measurement before any update, then one row per epoch
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["step"] == 0 and "test_acc" not in rows[0]
    for row in rows:
        assert keys <= set(row)
        assert all(0 <= row[k] <= 180 for k in keys)
    on_disk = read_metrics(tmp_path / "metrics.jsonl")
    assert all(keys <= set(r) for r in on_disk if r["phase"] == "supervised")
    assert result.test_acc > 0.5  # 3 separated clusters; chance is 1/3


def test_fit_cnn_fa_with_frozen_convolutions_measures_only_the_head(tmp_path: Path) -> None:
    save_cnn_run(tmp_path / "cnn", [2, 3])
    model = with_sources(small_model("cnn_fa", conv_from=str(tmp_path / "cnn")))
    convs = [m.weight.detach().clone() for m in model.body.modules()
             if isinstance(m, nn.Conv2d)]
    recorder = RunRecorder(tmp_path / "run")
    fit(model, image_data(), short_schedule(1), recorder, seed=0)
    row = recorder.rows[-1]
    assert {k for k in row if k.startswith("angle/")} == {"angle/head.1", "angle/head.3"}
    after = [m.weight for m in model.body.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.equal(a, b) for a, b in zip(after, convs, strict=True))


@pytest.mark.slow
def test_cnn_fa_resumes_and_evaluates_after_its_source_run_is_deleted(bioexp, tmp_path: Path
                                                                      ) -> None:
    """model.conv_from is read once, when the run starts: an interrupted cnn_fa run resumes, and
    is evaluated, from another folder after its (relatively named) source run is gone."""
    small = ("model.channels=[2,3]", "model.hidden=[8]", "threads=1")
    source = bioexp("train", *TINY, "model=cnn", *small, "hydra.run.dir=cnn")
    assert source.returncode == 0, output_of(source)
    run_dir = tmp_path / "fa"
    job = subprocess.Popen([*bioexp_command(), "train", *TINY, "model=cnn_fa", *small,
                            "model.conv_from=cnn", "schedule.supervised.epochs=60",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, stderr=subprocess.PIPE,
                           env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    deadline = time.monotonic() + 120
    while len(read_metrics(run_dir / "metrics.jsonl")) < 2:  # the first epoch's row
        assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=60)
    assert read_json(run_dir / "summary.json")["status"] == "interrupted"
    shutil.rmtree(tmp_path / "cnn")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = bioexp("train", f"resume={run_dir}", cwd=elsewhere)
    assert resumed.returncode == 0, output_of(resumed)
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    loaded = "model.conv_from: 2 convolution layers loaded from cnn/checkpoints/last.pt, frozen"
    assert (run_dir / "train.log").read_text().count(loaded) == 1  # when it started, only
    evaluated = bioexp("eval", str(run_dir), "--eps", "0,0.1", cwd=elsewhere)
    assert evaluated.returncode == 0, output_of(evaluated)
    loaded = bioexp_api.load_run(run_dir)
    assert not any(p.requires_grad for p in loaded.model.body.parameters())  # still frozen


def test_train_run_draws_alignment_plot_only_for_feedback_models(tmp_path: Path,
                                                                 make_cfg) -> None:
    fa = run(make_cfg(*TINY, "model=fa_mlp", "model.hidden=[16]"), tmp_path / "fa")
    assert fa["status"] == "completed"
    assert (tmp_path / "fa" / "plots" / "alignment.png").stat().st_size > 0
    rows = read_metrics(tmp_path / "fa" / "metrics.jsonl")
    assert all("angle/head.1" in r for r in rows if r["phase"] == "supervised")
    bp = run(make_cfg(*TINY, "model=bp_mlp", "model.hidden=[16]"), tmp_path / "bp")
    assert bp["status"] == "completed"
    assert (tmp_path / "bp" / "plots" / "curves.png").exists()
    assert not (tmp_path / "bp" / "plots" / "alignment.png").exists()


# ---------------------------------------------------------------------------------------------
# 8. Kolen-Pollack: B learns, receiving W's update


@pytest.mark.parametrize("make", [lambda: KPLinear(3, 2), lambda: KPConv2d(2, 3, 3, padding=1)],
                         ids=["linear", "conv"])
def test_kp_b_gets_w_gradient_and_the_same_sgd_step_shrinks_their_difference(make) -> None:
    """By hand on tiny tensors: dB = dW, so SGD with weight decay lambda at rate eta gives
    W - B exactly (1 - eta lambda) times what it was (Akrout et al. 2019, eq. for KP)."""
    torch.manual_seed(0)
    layer = make().double()
    assert "feedback_weight" in dict(layer.named_parameters())
    x = rand(4, 3, grad=False, seed=2) if isinstance(layer, nn.Linear) else \
        rand(4, 2, 5, 5, grad=False, seed=2)
    layer(x).square().sum().backward()
    assert torch.equal(layer.feedback_weight.grad, layer.weight.grad)
    difference = (layer.weight - layer.feedback_weight).detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.5).step()
    close(layer.weight - layer.feedback_weight, difference * (1 - 0.1 * 0.5))


def test_kp_exact_backprop_does_not_count_the_weight_twice() -> None:
    torch.manual_seed(0)
    layer, plain = KPLinear(5, 4).double(), nn.Linear(5, 4).double()
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    x = rand(3, 5, grad=False, seed=1)
    with exact_backprop(layer):
        layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    close(layer.weight.grad, plain.weight.grad)
    assert layer.feedback_weight.grad is None


def test_kp_mlp_aligns_b_with_w_under_weight_decay(tmp_path: Path) -> None:
    """Through the engine, with SGD at rate 0.05 and decay 0.1: W - B shrinks by exactly
    (1 - 0.005) per step, 180 steps, and the hidden layers' updates turn towards backprop's."""
    torch.manual_seed(0)
    model = build_model("kp_mlp", (1, 8, 8), 3, hidden=[16, 12])
    schedule = Schedule("two_phase", UnsupervisedPhase(0, 16, 0.01), SupervisedPhase(
        30, 16, 0.05, optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, weight_decay=0.1)))
    first = [(m.weight - m.feedback_weight).norm().item() for m in linears(model)]
    recorder = RunRecorder(tmp_path)
    fit(model, image_data(), schedule, recorder, seed=0)  # 96 images at batch 16: 6 steps
    last = [(m.weight - m.feedback_weight).norm().item() for m in linears(model)]
    for a, b in zip(first, last, strict=True):
        assert b / a == pytest.approx((1 - 0.05 * 0.1) ** 180, rel=1e-4)
    rows = [r for r in recorder.rows if r["phase"] == "supervised"]
    for key in ("angle/head.1", "angle/head.3"):
        assert rows[-1][key] < rows[0][key] - 30, (key, rows[0][key], rows[-1][key])


def test_kp_mlp_resumes_exactly(tmp_path: Path) -> None:
    """Stopped in its second epoch and resumed from the checkpoint, with B in the optimiser's
    state, it ends with the weights and metrics of an uninterrupted run."""
    def schedule() -> Schedule:
        return Schedule("two_phase", UnsupervisedPhase(0, 16, 0.01), SupervisedPhase(
            3, 16, 0.05, optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9,
                                                                 weight_decay=0.01)))

    def kp() -> nn.Module:
        torch.manual_seed(0)
        return build_model("kp_mlp", (1, 8, 8), 3, hidden=[16, 12])

    whole = kp()
    fit(whole, image_data(), schedule(), RunRecorder(tmp_path / "whole"), seed=0)
    part, saved, calls = kp(), {}, iter(range(10_000))

    def checkpoint(state: dict) -> None:
        saved.update(state=state, model={k: v.clone() for k, v in part.state_dict().items()})

    recorder = RunRecorder(tmp_path / "part")
    with pytest.raises(Interrupted):
        fit(part, image_data(), schedule(), recorder, seed=0, checkpoint=checkpoint,
            stop=lambda: next(calls) == 9)  # 6 batches an epoch: mid-way through the second
    assert saved["state"]["position"]["epoch"] == 1 and saved["state"]["position"]["batch"] > 0
    resumed = kp()
    resumed.load_state_dict(saved["model"])
    fit(resumed, image_data(), schedule(), recorder, seed=0, resume=saved["state"])
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                 resumed.state_dict().values(), strict=True))
    strip = ("epoch_time_s", "samples_per_s", "elapsed_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_metrics(p)]
            for p in (tmp_path / "whole" / "metrics.jsonl", tmp_path / "part" / "metrics.jsonl")]
    assert rows[0] == rows[1]
