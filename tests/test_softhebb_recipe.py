"""`softhebb_cnn` as the authors' code trains it: per-layer settings, reflect padding, the initial
norm, one step against the authors' arithmetic, layer-by-layer phase 1 (order, frozen layers,
exact resume, cache key), BatchNorm statistics for trained and control bodies, and the
read-out's halving schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from test_softhebb import TWO_LAYERS, stopped_and_resumed

from bioexp.data import load_dataset
from bioexp.layers import SoftHebbConv2d
from bioexp.layers.softhebb import Triangle
from bioexp.models.base import refit_batch_norm
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model
from bioexp.rules.softhebb import softhebb_dense
from bioexp.train import run

LAYERWISE = (*TINY, "threads=1", "model=softhebb_cnn", *TWO_LAYERS,
             "schedule.unsupervised.batch_size=16", "model.layerwise=true")


def test_the_per_layer_settings_reach_their_layers() -> None:
    model = build_model("softhebb_cnn", (1, 28, 28), 10, channels=[4, 8, 16],
                        kernels=[5, 3, 1], inverse_temperatures=[1.0, 0.5, 0.25],
                        powers=[0.7, 1.4, 1.0], lr_scales=[1.0, 0.1, 0.2])
    convs = [m for m in model.body if isinstance(m, SoftHebbConv2d)]
    assert [c.weight.shape[2] for c in convs] == [5, 3, 1]
    assert [c.temperature for c in convs] == [1.0, 2.0, 4.0]  # 1 / inverse temperature
    assert [c.lr_scale for c in convs] == [1.0, 0.1, 0.2]
    assert [m.power for m in model.body if isinstance(m, Triangle)] == [0.7, 1.4, 1.0]
    assert [c.weight.shape[0] for c in convs] == [4, 8, 16]
    norms = [m for m in model.body if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [1, 4, 8] and not any(n.affine for n in norms)


def test_reflect_padding_in_the_forward_pass_and_in_the_rule() -> None:
    torch.manual_seed(0)
    layer = SoftHebbConv2d(2, 4, 3, 0.7, init_radius=2.0)  # reflect by default
    x = torch.randn(3, 2, 5, 6)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    u = layer(x)
    assert torch.allclose(u, F.conv2d(padded, layer.weight), atol=1e-5)
    assert not torch.allclose(u, F.conv2d(x, layer.weight, padding=1), atol=1e-3)
    # the rule sees the reflected patches: the dense rule over them
    patches = F.unfold(padded, 3).transpose(1, 2).reshape(-1, 18)
    flat_u = u.flatten(2).transpose(1, 2).reshape(-1, 4)
    dense = softhebb_dense(patches, flat_u, layer.weight.flatten(1), 0.7)
    assert torch.allclose(layer.rule_update(x, u).flatten(1), dense, atol=1e-4)


def test_the_initial_weights_are_gaussian_with_norms_near_the_radius() -> None:
    torch.manual_seed(0)
    layer = SoftHebbConv2d(96, 384, 3, 1.0, init_radius=25.0)  # fan-in 864
    w = layer.weight.flatten(1)
    assert w.std().item() == pytest.approx(25 / math.sqrt(864), rel=0.02)
    assert w.mean().abs().item() < 0.01
    assert w.norm(dim=1).mean().item() == pytest.approx(25.0, rel=0.02)
    positive = SoftHebbConv2d(96, 384, 3, 1.0, init_radius=25.0, init="positive")
    assert positive.weight.min().item() >= 0
    assert positive.weight.flatten(1).norm(dim=1).mean().item() == pytest.approx(25.0, rel=0.02)


def authors_step(x: torch.Tensor, w: torch.Tensor, beta: float, lr: float, pad: int,
                 rate_power: float = 0.5) -> torch.Tensor:
    """The authors' arithmetic (hebbconv.py, HebbSoftKrotovConv2d), written out here: reflect
    padding, softmax(beta u) over channels, every non-winner negated, the Hebbian term as a
    convolution of the input with the outputs over the batch, the whole update divided by its
    largest entry (+1e-30), each unit's rate lr (|r_k - 1| + 1e-10)^rate_power."""
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    u = F.conv2d(xp, w)
    b, h, p, q = u.shape
    flat = u.transpose(0, 1).reshape(h, -1)
    y = -torch.softmax(beta * flat, dim=0)
    win = flat.argmax(dim=0)
    cols = torch.arange(flat.shape[1])
    y[win, cols] = -y[win, cols]
    y = y.view(h, b, p, q).transpose(0, 1)
    yx = F.conv2d(xp.transpose(0, 1), y.transpose(0, 1)).transpose(0, 1)
    yu = (y * u).sum(dim=(0, 2, 3))
    dw = yx - yu.view(-1, 1, 1, 1) * w
    dw = dw / (dw.abs().amax() + 1e-30)
    rate = lr * ((w.flatten(1).norm(dim=1) - 1).abs() + 1e-10) ** rate_power
    return w + rate.view(-1, 1, 1, 1) * dw


@pytest.mark.parametrize(("beta", "lr_scale"), [(1.0, 1.0), (0.65, 0.0625), (0.25, 0.125)])
def test_one_step_equals_the_authors_arithmetic(beta: float, lr_scale: float) -> None:
    torch.manual_seed(1)
    layer = SoftHebbConv2d(3, 6, 3, 1 / beta, init_radius=25.0, lr_scale=lr_scale)
    x = torch.randn(4, 3, 8, 8)
    expected = authors_step(x, layer.weight.clone(), beta, 0.08 * lr_scale, pad=1)
    layer.local_update(x, layer(x), 0.08)
    assert torch.allclose(layer.weight, expected, rtol=1e-4, atol=1e-5)


def test_layerwise_phase_1_trains_the_lower_layer_first_and_nothing_else_meanwhile(
        tmp_path: Path, make_cfg, monkeypatch) -> None:
    calls: list[tuple[int, list[torch.Tensor]]] = []
    update, forward = SoftHebbConv2d.local_update, SoftHebbConv2d.forward
    convs: list[SoftHebbConv2d] = []
    forwards: list[int] = []

    def spy_update(self, x, y, lr):
        if self not in convs:
            convs.append(self)
        calls.append((convs.index(self), [c.weight.clone() for c in convs]))
        update(self, x, y, lr)

    def spy_forward(self, x):
        forwards.append(id(self))
        return forward(self, x)

    monkeypatch.setattr(SoftHebbConv2d, "local_update", spy_update)
    monkeypatch.setattr(SoftHebbConv2d, "forward", spy_forward)
    cfg = make_cfg(*LAYERWISE, "cache=false")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary
    batches = math.ceil(256 / 16)
    assert [i for i, _ in calls] == [0] * batches + [1] * batches  # one stage, then the next
    # during stage 2 the first layer stays where stage 1 left it
    assert all(torch.equal(weights[0], calls[batches][1][0]) for _, weights in calls[batches:])
    # stage 1 runs the body only up to the first layer: the second is never called in it
    assert len(set(forwards[:batches])) == 1
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["phase"] == "unsupervised"]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, 1), (2, 2)]
    assert read_json(tmp_path / "summary.json")["phases"][0]["epochs"] == 2


def test_a_run_stopped_in_the_second_stage_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    args = [*LAYERWISE, "schedule.unsupervised.epochs=2", "cache=false"]
    # stage 2 (after 2 epochs of 16 batches each), 6th batch
    rows = stopped_and_resumed(tmp_path, monkeypatch, args, stop_at=2 * 16 + 5)
    assert rows[0] == rows[1]
    assert [r.get("stage") for r in rows[0] if r["phase"] == "unsupervised"] == [1, 1, 2, 2]


def test_the_phase_1_cache_tells_layerwise_from_all_at_once(tmp_path: Path, make_cfg) -> None:
    base = (*TINY, "threads=1", "model=softhebb_cnn", *TWO_LAYERS)
    first = run(make_cfg(*base, "model.layerwise=false"), tmp_path / "a")
    again = run(make_cfg(*base, "model.layerwise=false"), tmp_path / "b")
    other = run(make_cfg(*base, "model.layerwise=true"), tmp_path / "c")
    status = [s["phase1_cache"]["status"] for s in (first, again, other)]
    assert status == ["miss", "hit", "miss"]
    assert other["phase1_cache"]["key"] != first["phase1_cache"]["key"]


def test_refit_batch_norm_gives_the_statistics_of_the_data() -> None:
    norm = torch.nn.BatchNorm2d(2, affine=False)
    x = torch.randn(60, 2, 4, 4) * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1) + 1.0
    refit_batch_norm(torch.nn.Sequential(norm), x.split(20))
    assert torch.allclose(norm.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, x.var(dim=(0, 2, 3)), rtol=0.05)
    assert not norm.training and norm.momentum == 0.1


@pytest.mark.parametrize("control", [None, "random_features", "gaussian_features"])
def test_features_are_normalised_by_the_training_images_statistics(tmp_path: Path, make_cfg,
                                                                    control) -> None:
    """Trained or control, the first BatchNorm ends with the training images' statistics, not
    its initial mean 0 and variance 1 (which a control would otherwise keep)."""
    extra = [f"control={control}"] if control else []
    cfg = make_cfg(*TINY, "threads=1", "model=softhebb_cnn", *TWO_LAYERS, *extra)
    assert run(cfg, tmp_path)["status"] == "completed"
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]
    images = load_dataset(cfg.data, "unit").unsupervised.x
    assert state["body.0.running_mean"].item() == pytest.approx(images.mean().item(), rel=1e-3)
    assert state["body.0.running_var"].item() == pytest.approx(images.var().item(), rel=0.02)
    assert state["body.4.running_var"].min().item() > 0  # the second layer's input too


def test_the_read_out_rate_halves_where_the_authors_code_halves_it(make_cfg) -> None:
    from hydra.utils import instantiate
    cfg = make_cfg("model=softhebb_cnn")
    assert cfg.schedule.supervised.epochs == 50 and cfg.schedule.unsupervised.batch_size == 10
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = instantiate(cfg.lr_schedule)(optimizer)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # their CustomStepLR: int(50 * r) for r in 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9
    halvings = [int(50 * r) for r in (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)]
    expected = [1e-3 * 0.5 ** sum(e >= h for h in halvings) for e in range(50)]
    assert rates == pytest.approx(expected, rel=1e-12)
