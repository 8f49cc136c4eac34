"""The SoftHebb family: the rule by hand (dense, and convolutional against the dense rule on
unfolded patches), the adaptive step, the layers, phase 1 on generated data, checkpoint and
resume, one-line errors for bad settings, and the random-feature controls."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from conftest import train_here as train

from bioexp.config import model_hyperparameters
from bioexp.engine import local_layers
from bioexp.errors import ConfigError
from bioexp.layers import SoftHebbConv2d, SoftHebbLinear
from bioexp.layers.softhebb import Standardize, Triangle
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model
from bioexp.rules.softhebb import (
    adaptive_rates,
    soft_wta,
    softhebb_conv,
    softhebb_dense,
    softhebb_step,
)
from bioexp.train import run, seed_everything

# With tau = 1 / ln 3, softmax((2, 1) / tau) = (9, 3) / 12 and softmax((0, 1) / tau) = (1, 3) / 4.
TAU = 1 / math.log(3)
W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # 2 units, 3 inputs
X = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # u = x W^T = (2, 1) and (0, 1)


def test_soft_wta_by_hand() -> None:
    u = X @ W.T
    assert torch.allclose(soft_wta(u, TAU, anti_hebbian=False),
                          torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # anti-Hebbian: every unit but the winner (unit 0, then unit 1) has its sign flipped
    assert torch.allclose(soft_wta(u, TAU), torch.tensor([[0.75, -0.25], [-0.25, 0.75]]))


def test_dense_rule_by_hand() -> None:
    u = X @ W.T
    # sample 0, u = (2, 1), y = (0.75, -0.25):
    #   unit 0:  0.75 * ((2, 1, 0) - 2 * (1, 0, 0)) = (0, 0.75, 0)
    #   unit 1: -0.25 * ((2, 1, 0) - 1 * (0, 1, 0)) = (-0.5, 0, 0)
    # sample 1, u = (0, 1), y = (-0.25, 0.75):
    #   unit 0: -0.25 * ((0, 1, 1) - 0 * (1, 0, 0)) = (0, -0.25, -0.25)
    #   unit 1:  0.75 * ((0, 1, 1) - 1 * (0, 1, 0)) = (0, 0, 0.75)
    expected = torch.tensor([[0.0, 0.5, -0.25], [-0.5, 0.0, 0.75]])
    assert torch.allclose(softhebb_dense(X, u, W, TAU), expected)
    # without anti-Hebbian plasticity (the 2022 rule), sample 0's unit 1 gets +0.25 * (2, 0, 0)
    # and sample 1's unit 0 gets +0.25 * (0, 1, 1)
    plain = torch.tensor([[0.0, 1.0, 0.25], [0.5, 0.0, 0.75]])
    assert torch.allclose(softhebb_dense(X, u, W, TAU, anti_hebbian=False), plain)
    assert torch.equal(W, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # not mutated


@pytest.mark.parametrize("anti_hebbian", [True, False])
def test_conv_rule_is_the_dense_rule_over_every_patch(anti_hebbian: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 5, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    u = F.conv2d(x, w, padding=1)  # (2, 4, 5, 6)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)  # (2 * 30, 27)
    flat_u = u.flatten(2).transpose(1, 2).reshape(-1, 4)  # the same patches' currents
    assert torch.allclose(flat_u, patches @ w.flatten(1).T, atol=1e-5)
    dense = softhebb_dense(patches, flat_u, w.flatten(1), 0.7, anti_hebbian)
    conv = softhebb_conv(x, u, w, 0.7, anti_hebbian, padding=1)
    assert conv.shape == w.shape
    assert torch.allclose(conv.flatten(1), dense, atol=1e-4)


def test_the_step_scales_by_the_largest_entry_and_the_distance_of_the_norm_from_1() -> None:
    w = torch.tensor([[2.0, 0.0], [0.0, 0.75]])  # norms 2 and 0.75
    assert torch.allclose(adaptive_rates(w, 0.5), torch.tensor([1.0, 0.5]))
    assert torch.allclose(adaptive_rates(w, 0.0), torch.ones(2))
    dw = torch.tensor([[4.0, -2.0], [1.0, 0.0]])
    # dw / max|dw| = ((1, -0.5), (0.25, 0)); unit rates 0.1 * (1, 0.5)
    expected = torch.tensor([[0.1, -0.05], [0.0125, 0.0]])
    assert torch.allclose(softhebb_step(dw, w, 0.1, 0.5), expected)
    assert torch.allclose(softhebb_step(dw, w, 0.1, 0.5, normalize=False), dw * torch.tensor(
        [[0.1], [0.05]]))


def test_layers_apply_the_rule_to_what_they_saw_and_count_wins() -> None:
    torch.manual_seed(0)
    dense = SoftHebbLinear(3, 2, TAU, init_radius=3.0)
    before = dense.weight.clone()
    dense.local_update(X, dense(X), 0.1)
    u = X @ before.T
    step = softhebb_step(softhebb_dense(X, u, before, TAU), before, 0.1, 0.5)
    assert torch.allclose(dense.weight, before + step)
    assert dense.wins.sum().item() == 2  # one winner per sample
    conv = SoftHebbConv2d(2, 5, 3, 1.0, init_radius=2.0, lr_scale=0.5, padding_mode="zeros")
    x = torch.randn(3, 2, 6, 6)
    w0, u = conv.weight.clone(), conv(x)
    assert u.shape == (3, 5, 6, 6)
    conv.local_update(x, u, 0.2)
    step = softhebb_step(softhebb_conv(x, u, w0, 1.0, padding=1), w0, 0.1, 0.5)
    assert torch.allclose(conv.weight, w0 + step, atol=1e-6)
    assert conv.wins.sum().item() == 3 * 36  # one winner per position
    assert conv.receptive_fields().shape == (5, 18) and conv.field_shape() == (2, 3, 3)


def test_triangle_and_standardize_by_hand() -> None:
    u = torch.tensor([[1.0, 2.0, 6.0]])  # mean 3
    assert torch.equal(Triangle()(u), torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.equal(Triangle(2.0)(u), torch.tensor([[0.0, 0.0, 9.0]]))
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 10.0]]]])
    assert torch.allclose(Standardize(eps=0)(x), torch.tensor([[[[-1.0, 1.0]]]] * 2))


def test_models_build_for_small_images_and_give_the_features_they_promise() -> None:
    for shape in ((1, 6, 6), (3, 32, 32), (1, 28, 28)):
        model = build_model("softhebb_cnn", shape, 3, channels=[2, 3, 4])
        assert model(torch.rand(2, *shape)).shape == (2, 3)
    model = build_model("softhebb_mlp", (1, 6, 6), 3, hidden=12, activation="softmax")
    assert model(torch.rand(2, 1, 6, 6)).shape == (2, 3)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.body.modules())


@pytest.mark.parametrize(("model", "key", "value", "words"), [
    ("softhebb_cnn", "inverse_temperatures", [1.0, 0.0, 1.0], "a list of float, each above 0"),
    ("softhebb_cnn", "powers", [1.0, -1.0, 1.0], "a list of float, each above 0"),
    ("softhebb_cnn", "lr_scales", [1.0, -0.1, 1.0], "a list of float, each at least 0"),
    ("softhebb_cnn", "rate_power", -0.5, "a float at least 0"),
    ("softhebb_cnn", "init_radius", 0.0, "a float above 0"),
    ("softhebb_cnn", "channels", [8, 0, 4], "a list of int, each at least 1"),
    ("softhebb_cnn", "kernels", [5, 0, 3], "a list of int, each at least 1"),
    ("softhebb_cnn", "padding", "circular", "one of reflect, zeros"),
    ("softhebb_cnn", "norm", "layer", "one of batch, sample"),
    ("softhebb_cnn", "dropout", 1.0, "a float in [0, 1)"),
    ("softhebb_mlp", "temperature", -2.0, "a float above 0"),
    ("softhebb_mlp", "hidden", 1, "an int at least 2"),
    ("softhebb_mlp", "activation", "relu", "one of triangle, softmax"),
])
def test_bad_settings_are_one_line_errors(model: str, key: str, value, words: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_model(model, (1, 28, 28), 10, **{key: value})
    assert str(excinfo.value) == f"model.{key} must be {words}, got {value!r}"


@pytest.mark.parametrize("key", ["kernels", "inverse_temperatures", "powers", "lr_scales"])
def test_a_per_layer_list_of_the_wrong_length_is_a_one_line_error(key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:  # three layers, two entries
        build_model("softhebb_cnn", (1, 28, 28), 10, channels=[4, 8, 16], **{key: [1, 1]})
    assert str(excinfo.value) == (f"model.{key} must have one entry per layer of "
                                  "model.channels (3), got 2: [1, 1]")
    # a longer list serves a shallower body with its first entries
    model = build_model("softhebb_cnn", (1, 28, 28), 10, channels=[4, 8])
    assert [c.lr_scale for c in local_layers(model)] == [1.0, 0.0625]


def test_the_cli_rejects_a_zero_inverse_temperature_in_one_line(bioexp, tmp_path: Path) -> None:
    result = bioexp("train", *TINY, "model=softhebb_cnn", "model.inverse_temperatures=[1,0,1]",
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert ("model.inverse_temperatures must be a list of float, each above 0, got [1, 0, 1]"
            in result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    result = bioexp("train", *TINY, "model=softhebb_cnn", "model.channels=[4,8,16,32]",
                    f"hydra.run.dir={tmp_path / 'run2'}")
    assert result.returncode == 2
    assert ("model.kernels must have one entry per layer of model.channels (4), got 3: "
            "[5, 3, 3]") in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


TWO_LAYERS = ("model.channels=[6,12]", "model.kernels=[5,3]",
              "model.inverse_temperatures=[1,0.65]", "model.powers=[0.7,1.4]",
              "model.lr_scales=[1,0.0625]")
SMALL_CNN = (*TINY, "threads=1", "model=softhebb_cnn", *TWO_LAYERS,
             "schedule.unsupervised.batch_size=10")


def unit_norm_gap(weight: torch.Tensor) -> float:
    """Mean over units of | |w_k| - 1 |."""
    return (weight.flatten(1).norm(dim=1) - 1).abs().mean().item()


def test_phase_1_learns_on_generated_data_and_the_head_learns(tmp_path: Path,
                                                              make_cfg) -> None:
    cfg = make_cfg(*SMALL_CNN, "data.n_train=512", "schedule.supervised.epochs=3")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["phase"] == "unsupervised"
    assert rows[0]["SoftHebbConv2d0.units_never_won"] < 6
    losses = [r["train_loss"] for r in rows if r["phase"] == "supervised"]
    assert losses[-1] < losses[0], losses
    assert summary["test_acc"] > 0.3  # chance: 0.1
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]
    start = unit_norm_gap(initial_layers(cfg)[0].weight)  # init_radius 25: a gap of about 24
    assert unit_norm_gap(state["body.1.weight"]) < 0.5 * start
    assert (tmp_path / "plots" / "receptive_fields.png").stat().st_size > 0


def initial_layers(cfg) -> list:
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, (1, 28, 28), 10, **model_hyperparameters(cfg))
    return local_layers(model)




def stopped_and_resumed(tmp_path: Path, monkeypatch, args: list[str],
                        stop_at: int) -> list[list[dict]]:
    """Train `args` whole, then again with a SIGINT after the `stop_at`-th SoftHebb
    convolution update, resumed; assert both runs end with the same weights, and return
    both runs' metrics rows without their times."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(*args, f"hydra.run.dir={whole}") == 0
    calls = []
    update = SoftHebbConv2d.local_update

    def update_then_stop(self, x, y, lr):
        update(self, x, y, lr)
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(SoftHebbConv2d, "local_update", update_then_stop)
    assert train(*args, f"hydra.run.dir={parts}") == 130
    monkeypatch.setattr(SoftHebbConv2d, "local_update", update)
    assert read_json(parts / "summary.json")["status"] == "interrupted"
    assert train(f"resume={parts}") == 0
    strip = ("epoch_time_s", "samples_per_s", "elapsed_s")
    weights = [torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
               for run_dir in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return [[{k: v for k, v in r.items() if k not in strip}
             for r in read_metrics(run_dir / "metrics.jsonl")] for run_dir in (whole, parts)]


def test_a_run_stopped_in_phase_1_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    args = [*SMALL_CNN, "schedule.unsupervised.epochs=2", "cache=false", "model.layerwise=false"]
    # the first layer's 6th batch, in the middle of epoch 2
    rows = stopped_and_resumed(tmp_path, monkeypatch, args, stop_at=2 * 6)
    assert rows[0] == rows[1]


@pytest.mark.parametrize("model", ["softhebb_cnn", "softhebb_mlp"])
def test_the_controls_leave_the_softhebb_layers_untrained(tmp_path: Path, make_cfg,
                                                          model: str) -> None:
    small = TWO_LAYERS if model == "softhebb_cnn" else ("model.hidden=24",)
    cfg = make_cfg(*TINY, f"model={model}", *small, "control=random_features")
    assert run(cfg, tmp_path / "random")["control"] == "random_features"
    state = torch.load(tmp_path / "random" / "checkpoints" / "last.pt",
                       weights_only=False)["model"]
    layers = initial_layers(cfg)
    names = [n for n in state if n.startswith("body.") and n.endswith(".weight")]
    assert len(names) == len(layers)
    assert all(torch.equal(state[n], layer.weight) for n, layer in zip(names, layers, strict=True))
    cfg = make_cfg(*TINY, f"model={model}", *small, "control=gaussian_features")
    assert run(cfg, tmp_path / "gaussian")["control"] == "gaussian_features"
    state = torch.load(tmp_path / "gaussian" / "checkpoints" / "last.pt",
                       weights_only=False)["model"]
    for name, layer in zip(names, layers, strict=True):  # redrawn, each filter of unit norm
        w = state[name].flatten(1)
        assert torch.allclose(w.norm(dim=1), torch.ones(len(w)), atol=1e-5)
        assert not torch.allclose(w, layer.weight.flatten(1))
    for run_dir in ("random", "gaussian"):
        phases = [r["phase"] for r in read_metrics(tmp_path / run_dir / "metrics.jsonl")]
        assert phases == ["supervised"] * 2


def test_a_layer_still_at_its_initial_norms_says_phase_1_was_too_short() -> None:
    torch.manual_seed(0)
    layer = SoftHebbConv2d(16, 8, 5, 1.0, init_radius=4.0)  # fan-in 400: norms close to 4
    warning = layer.unconverged()
    assert warning is not None and "only 0% of the 8 units" in warning
    assert layer.local_stats()["units_converged"] == 0.0
    with torch.no_grad():  # unit norms: where the rule takes a winning unit
        layer.weight /= layer.weight.flatten(1).norm(dim=1)[:, None, None, None]
    assert layer.unconverged() is None and layer.local_stats()["units_converged"] == 1.0
