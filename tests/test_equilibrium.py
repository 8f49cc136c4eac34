"""Equilibrium propagation (`eqprop_mlp`): the phases and the update worked out by hand, the
estimate against the gradient at the free fixed point (symmetric and one-sided), training through
`bioexp train` with the alignment angle logged, exact resumption, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, check_bad_setting, check_exact_resume
from conftest import train_here as train

from bioexp.models.equilibrium import EquilibriumPropagation
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model

EP_TINY = (*TINY, "model=eqprop_mlp", "model.hidden=[32]", "cache=false", "threads=1")


def rho(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def tiny(symmetric: bool) -> EquilibriumPropagation:
    """2 -> 1 -> 2 with W_1 = [.4, .2], b_1 = .1, W_2 = [.5, -.5]^T, b_2 = [.2, .3], beta .5,
    two free steps and two nudged steps."""
    model = build_model("eqprop_mlp", (2,), 2, hidden=[1], beta=0.5, free_steps=2,
                        nudged_steps=2, symmetric=symmetric)
    first, second = model.head.layers
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.4, 0.2]]))
        first.bias.fill_(0.1)
        second.weight.copy_(torch.tensor([[0.5], [-0.5]]))
        second.bias.copy_(torch.tensor([0.2, 0.3]))
    return model


X, Y = torch.tensor([[1.0, 0.5]]), torch.tensor([0])  # target [1, 0]


def nudged(beta: float, h: float, out: list[float]) -> tuple[float, list[float]]:
    """Two synchronous steps from the free state (h, out), the output nudged by beta towards
    [1, 0]: h <- rho(.6 + .5 o_1 - .5 o_2), o_k <- rho(W_2k h + b_2k + beta (y_k - o_k))."""
    for _ in range(2):
        h, out = (rho(0.6 + 0.5 * out[0] - 0.5 * out[1]),
                  [rho(0.5 * h + 0.2 + beta * (1 - out[0])), rho(-0.5 * h + 0.3 - beta * out[1])])
    return h, out


def test_the_phases_and_the_update_worked_out_by_hand() -> None:
    """Free phase from 0, drive W_1 x + b_1 = .6: step 1 gives h = .6, o = rho(b_2) = [.2, .3];
    step 2 gives h = rho(.6 + .1 - .15) = .55, o = rho([.3 + .2, -.3 + .3]) = [.5, 0]: loss
    (1 - .5)^2 / 2 = .125. Nudged at +.5: h = .85 then .95, o = [.725, .025] then [.7625, 0];
    at -.5: h = .85 then .7, o = [.225, .025] then [.2375, 0]. Symmetric update, SGD at lr 1:
    dW_1 = -(h+ - h-) x / (2 beta), dW_2 = -(o+ h+ - o- h-) / (2 beta), the biases alike."""
    free_h, free_out = 0.55, [0.5, 0.0]
    plus_h, plus_out = nudged(0.5, free_h, free_out)
    minus_h, minus_out = nudged(-0.5, free_h, free_out)
    assert (plus_h, minus_h) == (pytest.approx(0.95), pytest.approx(0.7))
    model = tiny(symmetric=True)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = model.train_step(X, Y, torch.optim.SGD(model.parameters(), lr=1.0))
    assert metrics["loss"].item() == pytest.approx(0.125)
    assert metrics["correct"].item() == 1
    grads = [-(plus_h - minus_h) * X[0] / 1.0, torch.tensor([-(plus_h - minus_h)]),
             -torch.tensor([[plus_out[k] * plus_h - minus_out[k] * minus_h] for k in (0, 1)]),
             -torch.tensor([plus_out[k] - minus_out[k] for k in (0, 1)])]
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), (p0 - g).view_as(p0))


def test_one_sided_nudging_compares_with_the_free_state() -> None:
    """One-sided: the same +beta phase against the free state (h = .55, o = [.5, 0]), over beta."""
    free_h, free_out = 0.55, [0.5, 0.0]
    plus_h, plus_out = nudged(0.5, free_h, free_out)
    model = tiny(symmetric=False)
    before = [p.detach().clone() for p in model.parameters()]
    model.train_step(X, Y, torch.optim.SGD(model.parameters(), lr=1.0))
    grads = [-(plus_h - free_h) * X[0] / 0.5, torch.tensor([-(plus_h - free_h) / 0.5]),
             -torch.tensor([[plus_out[k] * plus_h - free_out[k] * free_h] for k in (0, 1)]) / 0.5,
             -torch.tensor([plus_out[k] - free_out[k] for k in (0, 1)]) / 0.5]
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), (p0 - g).view_as(p0))


def estimate_errors(beta: float, symmetric: bool) -> tuple[list[float], list[float]]:
    """On an 8-6-5-4 network in float64 whose units all settle inside (0, 1) (weights at a quarter,
    biases .5), 16 images: the EP estimate against the gradient of the loss at the free fixed point,
    by backprop through 200 steps of the settled dynamics. Returns (cosine, relative error)
    per parameter."""
    torch.manual_seed(0)
    model = build_model("eqprop_mlp", (8,), 4, hidden=[6, 5], beta=beta, free_steps=200,
                        nudged_steps=200, symmetric=symmetric).double()
    with torch.no_grad():
        for layer in model.head.layers:
            layer.weight.mul_(0.25)
            layer.bias.fill_(0.5)
    x = torch.rand(16, 8, dtype=torch.float64)
    y = torch.randint(4, (16,))
    target = torch.nn.functional.one_hot(y, 4).double()
    net = model.head
    with torch.no_grad():  # the free phase has reached its fixed point, inside (0, 1)
        free = net.settle(net.input_drive(x), net.zero_states(x), 200)
        again = net.settle(net.input_drive(x), free, 1)
    assert max((a - b).abs().max().item() for a, b in zip(free, again, strict=True)) < 1e-12
    assert all(((s > 0.05) & (s < 0.95)).all() for s in free)  # no unit near a kink of rho
    exact = torch.autograd.grad(model.loss(model(x), y), list(model.parameters()))
    _, grads = model.relax(x, target)
    cosines = [float(g.flatten() @ e.flatten() / (g.norm() * e.norm()))
               for g, e in zip(grads, exact, strict=True)]
    errors = [float((g - e).norm() / e.norm()) for g, e in zip(grads, exact, strict=True)]
    return cosines, errors


def test_symmetric_nudging_approaches_the_gradient_and_one_sided_is_worse() -> None:
    """The EP theorem: as beta shrinks, the estimate tends to the gradient of the loss at the
    free fixed point; one-sided nudging has a bias of first order in beta, the symmetric
    estimate of second order (Laborieux et al. 2021)."""
    cos_sym, err_sym = estimate_errors(0.01, symmetric=True)
    _, err_sym_large = estimate_errors(0.1, symmetric=True)
    cos_one, err_one = estimate_errors(0.01, symmetric=False)
    assert min(cos_sym) > 0.999 and min(cos_one) > 0.99, (cos_sym, cos_one)
    assert max(err_sym) < max(err_sym_large) / 10, (err_sym, err_sym_large)  # about beta^2
    assert max(err_one) > 10 * max(err_sym), (err_one, err_sym)


def test_the_loss_falls_and_the_alignment_angle_is_logged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(*EP_TINY, "data.n_train=1000", "data.n_test=200",
                 "schedule.supervised.epochs=4", "schedule.supervised.batch_size=50",
                 "schedule.supervised.lr=0.003", "model.beta=0.5",  # angles of some degrees
                 f"hydra.run.dir={run}") == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "supervised"]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert read_json(run / "summary.json")["test_acc"] > 0.3  # chance: 0.1
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        angles = [v for k, v in row.items() if k.startswith("angle/")]
        # at beta 0.5 an output unit held at 0 by rho still gets an EP update, where backprop
        # through rho gives it none: the output layer's angle can exceed 90 degrees here
        assert len(angles) == 2 and all(1 < a <= 180 for a in angles), row


def test_an_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    check_exact_resume(EquilibriumPropagation, EP_TINY, tmp_path, monkeypatch)


@pytest.mark.parametrize(("override", "key"), [
    ("model.beta=0", "model.beta"),
    ("model.beta=-0.5", "model.beta"),
    ("model.free_steps=0", "model.free_steps"),
    ("model.nudged_steps=0", "model.nudged_steps"),
    ("model.hidden=[]", "model.hidden"),
    ("schedule.supervised.lr=-0.01", "schedule.supervised.lr"),
])
def test_a_bad_setting_is_one_line(make_cfg, override: str, key: str) -> None:
    check_bad_setting(make_cfg, "eqprop_mlp", override, key)


def test_a_bf16_step_runs_its_phases_in_float32() -> None:
    """Under bf16 autocast (`precision=bf16`) the phases still run in float32: the update is a
    difference of two states beta apart, which bf16 would blur (a cosine of 0.93 with the
    float32 estimate at beta 0.1)."""
    torch.manual_seed(0)
    model = build_model("eqprop_mlp", (1, 8, 8), 10, hidden=[64])
    x, y = torch.rand(32, 1, 8, 8), torch.randint(10, (32,))
    target = torch.nn.functional.one_hot(y, 10).float()
    _, exact = model.relax(x, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = model.relax(x, target)
    for a, b in zip(low, exact, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
