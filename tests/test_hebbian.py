"""The Hebbian family: rules against hand-computed updates, the layer, semihebb, both schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY
from torch import nn

from bioexp.engine import local_learning
from bioexp.errors import ConfigError
from bioexp.layers import HebbianLinear
from bioexp.layers.feedback import FALinear
from bioexp.plots import plot_receptive_fields
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model
from bioexp.rules.hebbian import Gupta, GuptaReference, Hebb, Oja, keep_top, make_rule
from bioexp.train import run

# x (B=2, D=3), y (B=2, H=2), W (D=3, H=2): the shapes of every rule.
X = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
Y = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
XTY = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])  # x^T y by hand


def test_hebb_is_x_transpose_y() -> None:
    dw, state = Hebb()(X, Y, W, {})
    assert torch.equal(dw, XTY) and state == {}


def test_oja_subtracts_w_times_y_transpose_y() -> None:
    # y^T y = [[10, 2], [2, 4]];  W y^T y = [[10, 2], [2, 4], [12, 6]]
    dw, _ = Oja()(X, Y, W, {})
    assert torch.equal(dw, torch.tensor([[-9.0, 0.0], [1.0, -4.0], [-7.0, -2.0]]))


def test_gupta_keeps_the_top_of_the_whole_matrix() -> None:
    # first step: nothing earlier to subtract; 6 entries, p = 50 -> ranks 3..5 kept: 3, 4, 5
    rule = Gupta(50)
    dw, _ = rule(X, Y, W, rule.initial_state(W))
    assert torch.equal(dw, torch.tensor([[0.0, 0.0], [3.0, 0.0], [5.0, 4.0]]))


def test_gupta_local_keeps_the_top_of_each_unit() -> None:
    # columns [1, 3, 5] and [2, 0, 4]; 3 entries each, p = 50 -> ranks 1..2 of each kept
    rule = Gupta(50, per_unit=True)
    dw, _ = rule(X, Y, W, rule.initial_state(W))
    assert torch.equal(dw, torch.tensor([[0.0, 2.0], [3.0, 0.0], [5.0, 4.0]]))


def test_gupta_threshold_is_the_running_mean_of_earlier_products() -> None:
    rule = Gupta(0)  # keep everything: only the threshold acts
    state = rule.initial_state(W)
    scales = [1.0, 2.0, 4.0]  # x scaled by s gives the product s * XTY
    updates = []
    for s in scales:
        dw, state = rule(s * X, Y, W, state)
        updates.append(dw)
    assert torch.equal(updates[0], XTY)
    assert torch.equal(updates[1], (2 - 1) * XTY)
    assert torch.equal(updates[2], (4 - (1 + 2) / 2) * XTY)  # 4 - mean(1, 2)
    assert torch.allclose(state["mean"], (1 + 2 + 4) / 3 * XTY) and state["steps"].item() == 3


def test_gupta_reference_subtracts_the_raw_mean_and_keeps_the_notebooks_rank() -> None:
    rule, lr = GuptaReference(50), 0.5
    state = rule.initial_state(W)
    # step 1: 0.5 XTY = [[.5, 1], [1.5, 0], [2.5, 2]]; rank 1 + round(0.5 * 5) = 3, the 3rd
    # smallest is 1, so 1 and up are kept (gupta's rank 4 would keep 1.5 and up only)
    step, state = rule(X, Y, W, state, lr=lr)
    assert torch.equal(step, torch.tensor([[0.0, 1.0], [1.5, 0.0], [2.5, 2.0]]))
    # step 2, x scaled by 4: 0.5 * 4 XTY - XTY / 1 = XTY; 3rd smallest 2
    step, state = rule(4 * X, Y, W, state, lr=lr)
    assert torch.equal(step, torch.tensor([[0.0, 2.0], [3.0, 0.0], [5.0, 4.0]]))
    # step 3: 0.5 XTY - (XTY + 4 XTY) / 2 = -2 XTY = [[-2, -4], [-6, 0], [-10, -8]]; 3rd: -6
    step, state = rule(X, Y, W, state, lr=lr)
    assert torch.equal(step, torch.tensor([[-2.0, -4.0], [-6.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(state["sum"], 6 * XTY) and state["steps"].item() == 3


def test_gupta_reference_layer_adds_its_step_unscaled() -> None:
    layer = HebbianLinear(3, 2, GuptaReference(50), normalize=False)
    layer.weight.copy_(W)
    y = layer(X)
    step, _ = GuptaReference(50)(X, y, W, GuptaReference(50).initial_state(W), lr=0.5)
    layer.local_update(X, y, lr=0.5)
    assert torch.equal(layer.weight, W + step)
    assert layer.rule_steps.item() == 1


def test_rules_do_not_mutate_their_arguments() -> None:
    for rule in (Hebb(), Oja(), Gupta(60), Gupta(60, per_unit=True), GuptaReference(60)):
        state = rule.initial_state(W)
        copies = [t.clone() for t in (X, Y, W, *state.values())]
        rule(X, Y, W, state)
        assert all(torch.equal(a, b) for a, b in zip((X, Y, W, *state.values()), copies,
                                                     strict=True))


@pytest.mark.parametrize("p", [10, 60, 90])
def test_sparsity_keeps_the_expected_fraction(p: int) -> None:
    update = torch.randn(100, 50, generator=torch.Generator().manual_seed(p))
    kept = keep_top(update, p) != 0
    assert kept.sum().item() == 5000 - math.floor(5000 * p / 100)
    assert update[kept].min() >= update[~kept].max()  # the largest entries are the kept ones
    kept_per_unit = keep_top(update, p, dim=0) != 0
    assert kept_per_unit.sum(dim=0).tolist() == [100 - math.floor(100 * p / 100)] * 50


def test_keep_top_at_zero_keeps_all_and_rejects_bad_percentiles() -> None:
    update = torch.randn(5, 4)
    assert torch.equal(keep_top(update, 0), update)
    with pytest.raises(ValueError, match="sparsity"):
        Gupta(100)
    with pytest.raises(ValueError, match="gupta_local"):
        make_rule("hebbian")


def test_layer_applies_lr_times_the_rule() -> None:
    layer = HebbianLinear(3, 2, Hebb(), normalize=False)
    layer.weight.copy_(W)
    y = layer(X)
    assert torch.equal(y, X @ W)
    layer.local_update(X, y, lr=0.5)
    assert torch.allclose(layer.weight, W + 0.5 * X.T @ (X @ W))


def test_normalisation_keeps_every_unit_at_unit_norm() -> None:
    torch.manual_seed(0)
    layer = HebbianLinear(20, 7, Hebb(), nn.ReLU(), normalize=True)
    assert torch.allclose(layer.weight.norm(dim=0), torch.ones(7))
    x = torch.rand(16, 20)
    for _ in range(5):
        layer.local_update(x, layer(x), lr=10.0)
    assert torch.allclose(layer.weight.norm(dim=0), torch.ones(7), atol=1e-6)


def test_rule_state_is_a_buffer_that_follows_the_weights() -> None:
    layer = HebbianLinear(3, 2, Gupta(50))
    keys = set(layer.state_dict())
    assert keys == {"weight", "rule_mean", "rule_steps"}
    assert not list(layer.parameters())
    layer.local_update(X, layer(X), lr=0.1)
    clone = HebbianLinear(3, 2, Gupta(50))
    clone.load_state_dict(layer.state_dict())
    assert clone.rule_steps.item() == 1 and torch.equal(clone.rule_mean, layer.rule_mean)


def small(**hparams) -> nn.Module:
    return build_model("semihebb", (1, 6, 6), 3, **{"hebbian": [12], **hparams})


def test_semihebb_builds_hebbian_body_and_chosen_head() -> None:
    model = small(hebbian=[12, 8], head=[5], rule="oja")
    hebbian = [m for m in model.body if isinstance(m, HebbianLinear)]
    assert [tuple(m.weight.shape) for m in hebbian] == [(36, 12), (12, 8)]
    assert all(isinstance(m.rule, Oja) for m in hebbian)
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [5, 3]
    fa = small(head_type="fa")
    assert isinstance(fa.head[0], FALinear)
    assert small(head=[]).head[0].in_features == 12  # a linear read-out


@pytest.mark.parametrize(("hparams", "key"), [
    ({"sparsity": 100.0}, "model.sparsity"),
    ({"sparsity": -1}, "model.sparsity"),
    ({"rule": "gupta_reference", "sparsity": 100.0}, "model.sparsity"),
    ({"rule": "gupta_reference", "sparsity": -5}, "model.sparsity"),
    ({"rule": "gupta_ref"}, "model.rule"),
    ({"hebbian": []}, "model.hebbian"),
    ({"head": [0]}, "model.head"),
])
def test_semihebb_rejects_bad_values(hparams: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        small(**hparams)


def test_optimizer_steps_leave_hebbian_weights_alone() -> None:
    torch.manual_seed(0)
    model = small(head=[5])
    before = model.body[1].weight.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    x, y = torch.rand(8, 1, 6, 6), torch.randint(3, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
    assert torch.equal(model.body[1].weight, before)
    with local_learning(model, lambda: 0.1), torch.no_grad():
        model(x)
    assert not torch.equal(model.body[1].weight, before)  # only the local rule moves them


@pytest.mark.parametrize("schedule", ["one_phase", "two_phase"])
@pytest.mark.parametrize("rule", ["hebb", "oja", "gupta", "gupta_local"])
def test_semihebb_end_to_end(tmp_path: Path, make_cfg, schedule: str, rule: str) -> None:
    # One phase: the Hebbian layers keep learning under the head. At the two-phase rate (1e-3)
    # their features drift faster than the head follows on this data (its train loss rises
    # from epoch 1 to 2 with hebb, gupta and gupta_local), so one phase runs at a Hebbian rate
    # they learn slowly at, and at a head rate that moves the head in its 8 steps: then the
    # loss falls by about 0.12 with every rule (and stays flat when the head never steps).
    one_phase = schedule == "one_phase"
    rates = (["schedule.unsupervised.lr=1e-5", "schedule.supervised.lr=0.02"] if one_phase
             else ["schedule.unsupervised.lr=0.001"])
    summary = run(make_cfg(*TINY, "model=semihebb", f"schedule={schedule}", f"model.rule={rule}",
                           "model.hebbian=[32]", *rates), tmp_path)
    assert summary["status"] == "completed", summary
    assert math.isfinite(summary["test_acc"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in rows].count("unsupervised") == (schedule == "two_phase")
    losses = [r["train_loss"] for r in rows if r["phase"] == "supervised"]
    assert losses[-1] < losses[-2] - (0.05 if one_phase else 0.0), losses
    assert (tmp_path / "plots" / "receptive_fields.png").stat().st_size > 0
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert torch.isfinite(state["body.1.weight"]).all()
    if rule.startswith("gupta"):  # the rule counts its steps: one per training batch it saw,
        # 2 supervised epochs of 256 / 64 batches in one phase, 1 epoch of ceil(256 / 100)
        assert state["body.1.rule_steps"].item() == (8 if one_phase else 3)


@pytest.mark.parametrize("schedule", ["one_phase", "two_phase"])
def test_plain_hebb_with_a_large_rate_diverges_with_a_clear_message(tmp_path: Path, make_cfg,
                                                                    schedule: str) -> None:
    summary = run(make_cfg(*TINY, "model=semihebb", f"schedule={schedule}", "model.rule=hebb",
                           "model.normalize=false", "model.hebbian=[32]",
                           "schedule.unsupervised.epochs=10", "schedule.unsupervised.lr=1e6"),
                  tmp_path)
    assert summary["status"] == "diverged", summary
    assert summary["diverged_at"]["local_layers"] == ["body.1"], summary
    assert "layer body.1" in summary["error"], summary["error"]
    assert "schedule.unsupervised.lr" in summary["error"], summary["error"]
    assert summary.get("test_acc") is None
    assert read_json(tmp_path / "summary.json")["status"] == "diverged"


def test_model_config_sets_its_own_hebbian_rate_and_the_command_line_wins(make_cfg) -> None:
    assert make_cfg("model=semihebb").schedule.unsupervised.lr == pytest.approx(1e-6)
    assert make_cfg("model=semihebb", "schedule.unsupervised.lr=0.5").schedule.unsupervised.lr \
        == 0.5
    assert make_cfg("experiment=semihebb_depth").schedule.unsupervised.lr == pytest.approx(1e-6)
    assert make_cfg("model=bp_mlp").schedule.unsupervised.lr == 0.02  # others keep the default


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_receptive_fields_plot_grey_and_colour_inputs(tmp_path: Path, shape: tuple) -> None:
    weights = torch.randn(12, math.prod(shape))
    path = plot_receptive_fields(weights, shape, tmp_path / "rf.png")
    assert path is not None and path.stat().st_size > 0
    assert plot_receptive_fields(torch.randn(12, 10), shape, tmp_path / "no.png") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("per_unit", [False, True])
def test_gupta_on_cuda_matches_the_cpu(per_unit: bool) -> None:
    torch.manual_seed(0)
    layer = HebbianLinear(50, 40, Gupta(60, per_unit=per_unit), nn.ReLU())
    on_gpu = HebbianLinear(50, 40, Gupta(60, per_unit=per_unit), nn.ReLU()).cuda()
    on_gpu.load_state_dict(layer.state_dict())
    assert on_gpu.rule_mean.device.type == "cuda"
    for _ in range(3):
        x = torch.rand(16, 50)
        layer.local_update(x, layer(x), 0.01)
        on_gpu.local_update(x.cuda(), on_gpu(x.cuda()), 0.01)
    assert torch.allclose(on_gpu.weight.cpu(), layer.weight, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_semihebb_trains_on_cuda(tmp_path: Path, make_cfg) -> None:
    args = [a for a in TINY if not a.startswith("device=")]
    summary = run(make_cfg(*args, "device=cuda", "model=semihebb", "schedule=one_phase",
                           "model.hebbian=[32]"), tmp_path)
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
