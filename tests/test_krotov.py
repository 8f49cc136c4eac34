"""The Krotov family: the fast rule against the formula, the layer, BioLoss, the phase-1 cache,
and a short end-to-end run of each model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from bioexp.cache import phase1_cache
from bioexp.config import MODEL_META_KEYS
from bioexp.engine import Schedule, UnsupervisedPhase
from bioexp.errors import ConfigError
from bioexp.layers import KrotovLayer
from bioexp.layers.feedback import FALinear
from bioexp.models.krotov import bio_loss
from bioexp.records import read_metrics
from bioexp.registry import build_model
from bioexp.rules.krotov import krotov_update, krotov_update_dense, normalized_step
from bioexp.train import run, seed_everything

KROTOV_MODELS = ["krotov_fc", "krotov_fa", "krotov_biocell_fc", "krotov_biocell_fa"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("k", [2, 7])
@pytest.mark.parametrize(("batch", "hidden"), [(100, 300), (400, 8)])  # some units; all units
def test_fast_rule_equals_the_formula(p: float, k: int, batch: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(int(p * 10 + k))
    v, w = torch.rand(batch, 784, generator=g), torch.randn(hidden, 784, generator=g) * 0.1
    fast, winners = krotov_update(v, w, p, k, 0.4)
    assert relative_error(fast, krotov_update_dense(v, w, p, k, 0.4)) < 1e-5
    currents = v @ (torch.sign(w) * w.abs() ** (p - 1)).T
    assert torch.equal(winners, currents.argmax(dim=1))


def test_the_rule_by_hand() -> None:
    # two inputs, three units, k = 2, delta = 0.5, p = 2: currents I = W v^T
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    v = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # sample 0: currents (2, 0, 1): unit 0 wins (g = 1), unit 2 is second (g = -0.5)
    # sample 1: currents (0, 1, 0.5): unit 1 wins, unit 2 is second
    ds, winners = krotov_update(v, w, 2.0, 2, 0.5)
    # dS_mu = sum_b g_mu,b v_b - (sum_b g_mu,b I_mu,b) W_mu
    expected = torch.tensor([
        [2.0 - 2.0 * 1.0, 0.0],                     # g = (1, 0): v0 - I(0,0) W_0
        [0.0, 1.0 - 1.0 * 1.0],                     # g = (0, 1): v1 - I(1,1) W_1
        [-1.0 + 0.75 * 0.5, -0.5 + 0.75 * 0.5],     # g = (-.5, -.5): -(v0+v1)/2 + .75 W_2
    ])
    assert torch.allclose(ds, expected) and winners.tolist() == [0, 1]


def test_normalized_step_has_the_learning_rate_as_largest_entry() -> None:
    ds = torch.tensor([[0.5, -2.0], [1.0, 0.0]])
    assert torch.allclose(normalized_step(ds, 0.04), ds * 0.02)
    assert torch.equal(normalized_step(torch.zeros(2, 2), 0.04), torch.zeros(2, 2))


def test_layer_update_reuses_its_output_as_the_current_exactly() -> None:
    torch.manual_seed(0)
    layer = KrotovLayer(20, 30)
    v = torch.rand(16, 20)
    expected = layer.weight + normalized_step(krotov_update_dense(v, layer.weight, 2, 2, 0.4),
                                              0.03)
    layer.local_update(v, layer(v), 0.03)
    assert relative_error(layer.weight, expected) < 1e-5
    assert layer.wins.sum().item() == 16  # one winner per sample


@pytest.mark.parametrize(("p", "k", "batch", "hidden"), [
    (2.0, 2, 256, 300), (3.0, 7, 100, 300), (2.0, 2, 400, 8)])  # some units; all units
def test_host_sync_free_step_equals_todays_step_over_20_steps(p: float, k: int, batch: int,
                                                              hidden: int) -> None:
    # krotov_full (fixed shapes, CUDA's step) against krotov_rows (the row gather): the same
    # weights and win counts, on the CPU bit for bit.
    data = torch.rand(20 * batch, 784, generator=torch.Generator().manual_seed(3))
    layers = []
    for fixed in (False, True):
        torch.manual_seed(0)
        layer = KrotovLayer(784, hidden, p, k)
        layer._fixed_shapes, layer._two_max = fixed, False
        with torch.no_grad():
            for v in data.split(batch):
                layer.local_update(v, layer(v), 0.02)
        layers.append(layer)
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert torch.equal(layers[0].wins, layers[1].wins)


def test_phase1_learning_rate_is_annealed_linearly() -> None:
    phase = UnsupervisedPhase(4, 100, 0.04, "linear")
    assert [phase.lr_at(e) for e in range(4)] == pytest.approx([0.04, 0.03, 0.02, 0.01])


def test_bio_loss_by_hand() -> None:
    c = torch.tensor([[0.5, -0.5, 0.0], [0.9, 0.1, -0.2]])
    target = torch.tensor([0, 2])  # t = (1, -1, -1) and (-1, -1, 1)
    # |c - t| = (0.5, 0.5, 1.0) and (1.9, 1.1, 1.2)
    assert bio_loss(c, target, 2).item() == pytest.approx((1.5 + 6.26) / 2)
    assert bio_loss(c, target, 3).item() == pytest.approx((1.25 + 9.918) / 2)


def test_models_build_with_their_heads() -> None:
    fa = build_model("krotov_fa", (1, 6, 6), 3, hidden=20, head=[8])
    assert sum(isinstance(m, FALinear) for m in fa.head.modules()) == 2
    bio = build_model("krotov_biocell_fa", (1, 6, 6), 3, hidden=20)
    cell = bio.head[-1]
    assert isinstance(cell.readout, FALinear) and cell.readout.bias is None
    out = bio(torch.rand(5, 1, 6, 6))
    assert out.shape == (5, 3) and bool((out.abs() < 1).all())  # tanh outputs
    assert torch.equal(bio.predict(out), out.argmax(dim=1))


def test_unit_rows_divides_currents_by_row_lengths_in_the_head() -> None:
    model = build_model("krotov_fc", (1, 6, 6), 3, hidden=20, unit_rows=True, normalize_input=False,
                        activation="none")
    layer = model.body[-1]
    x = torch.rand(4, 1, 6, 6)
    currents = model.body(x)
    assert torch.allclose(currents, x.flatten(1) @ layer.weight.T)  # the body stays raw
    assert torch.allclose(model.head[0](currents), currents / layer.weight.norm(dim=1))
    assert "unit_rows" not in repr(model.body)  # so it does not split the phase-1 cache


@pytest.mark.parametrize(("hparams", "key"), [
    ({"k": 1}, "model.k"), ({"k": 21}, "model.k"), ({"hidden": 1}, "model.hidden"),
    ({"delta": 1.5}, "model.delta"), ({"p": 1.5}, "model.p"), ({"head": [0]}, "model.head"),
])
def test_krotov_rejects_bad_values(hparams: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_model("krotov_fc", (1, 6, 6), 3, **{"hidden": 20, **hparams})


# ---------------------------------------------------------------------------------------------
# the phase-1 cache

BASE = ("model=krotov_fc", "model.hidden=40", "data=synthetic")


def cache_key(make_cfg, *overrides: str, device: str = "cpu") -> str:
    cfg = make_cfg(*BASE, *overrides)
    seed_everything(cfg.seed)
    hparams = {k: v for k, v in OmegaConf.to_container(cfg.model).items()
               if k not in MODEL_META_KEYS}
    model = build_model(cfg.model.name, (1, 28, 28), 10, **hparams)
    cache = phase1_cache(cfg, model, Schedule.from_cfg(cfg), torch.device(device))
    return cache.key


DETERMINING = [
    "data=fashion_mnist", "data.train_limit=100", "data.val_size=10", "data.seed=1",
    "data.n_train=300", "model.input_scale=symmetric", "model.hidden=41", "model.p=2",
    "model.k=3", "model.delta=0.3", "model.init=normal", "model.normalize_input=false",
    "schedule.unsupervised.lr=0.03", "schedule.unsupervised.epochs=2",
    "schedule.unsupervised.batch_size=50", "schedule.unsupervised.lr_schedule=constant",
    "seed=1",
]
NOT_DETERMINING = [
    "model=krotov_fa", "model.head=[16]", "model.dropout=0.5", "model.activation=relu_power",
    "model.unit_rows=false",
    "schedule.supervised.lr=0.1", "schedule.supervised.epochs=3", "data.test_limit=50",
    "data.root=/elsewhere", "data.download=false", "data.n_test=7", "progress=false",
]


def test_cache_key_changes_with_every_determining_setting(make_cfg) -> None:
    base = cache_key(make_cfg)
    assert cache_key(make_cfg) == base
    keys = {override: cache_key(make_cfg, override) for override in DETERMINING}
    unchanged = [o for o, k in keys.items() if k == base]
    assert not unchanged, unchanged
    assert cache_key(make_cfg, device="cuda") != base


def test_cache_key_ignores_the_head_and_phase_2(make_cfg) -> None:
    base = cache_key(make_cfg)
    changed = [o for o in NOT_DETERMINING if cache_key(make_cfg, o) != base]
    assert not changed, changed


def test_cache_key_changes_with_the_rule_version(make_cfg, monkeypatch) -> None:
    base = cache_key(make_cfg)
    monkeypatch.setattr(KrotovLayer, "version", KrotovLayer.version + 1)
    assert cache_key(make_cfg) != base


TINY_KROTOV = (*TINY, "model.hidden=32", "schedule.unsupervised.batch_size=64")


def test_second_run_hits_the_cache_and_trains_the_same_head(tmp_path: Path, make_cfg,
                                                            private_cache: Path) -> None:
    first = run(make_cfg(*TINY_KROTOV, "model=krotov_fc"), tmp_path / "first")
    second = run(make_cfg(*TINY_KROTOV, "model=krotov_fc"), tmp_path / "second")
    assert first["phase1_cache"]["status"] == "miss"
    assert second["phase1_cache"]["status"] == "hit"
    assert first["phase1_cache"]["key"] == second["phase1_cache"]["key"]
    assert Path(second["phase1_cache"]["file"]).is_relative_to(private_cache)
    assert second["test_acc"] == first["test_acc"]
    strip = ("epoch_time_s", "samples_per_s", "elapsed_s")
    rows = [[{k: v for k, v in r.items() if k not in strip and r["phase"] == "supervised"}
             for r in read_metrics(tmp_path / name / "metrics.jsonl")
             if r["phase"] == "supervised"] for name in ("first", "second")]
    assert rows[0] == rows[1]
    assert second["phases"][0] == {"name": "unsupervised", "epochs": 1, "cached": True}
    # a different head reuses the same phase 1
    fa = run(make_cfg(*TINY_KROTOV, "model=krotov_fa"), tmp_path / "fa")
    assert fa["phase1_cache"]["status"] == "hit"


def test_cache_false_turns_it_off(tmp_path: Path, make_cfg, private_cache: Path) -> None:
    summary = run(make_cfg(*TINY_KROTOV, "model=krotov_fc", "cache=false"), tmp_path)
    assert summary["phase1_cache"] == {"status": "off"}
    assert not (private_cache / "bioexp" / "phase1").exists()


@pytest.mark.parametrize("model", KROTOV_MODELS)
def test_each_krotov_model_end_to_end(tmp_path: Path, make_cfg, model: str) -> None:
    summary = run(make_cfg(*TINY_KROTOV, f"model={model}"), tmp_path)
    assert summary["status"] == "completed", summary
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["phase"] == "unsupervised" and "KrotovLayer0.units_never_won" in rows[0]
    for name in ("receptive_fields.png", "win_counts.png", "curves.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0, name


def test_a_layer_far_from_its_sphere_says_phase_1_was_too_short() -> None:
    torch.manual_seed(0)
    layer = KrotovLayer(784, 50, p=3.0, k=2)  # uniform [0, 1) rows: p-norm about 5.8
    warning = layer.unconverged()
    assert warning is not None and "only 0% of the Krotov layer's 50 units" in warning
    assert layer.local_stats()["units_converged"] == 0.0
    with torch.no_grad():  # rows of unit p-norm: where the rule converges
        layer.weight /= layer.p_norms()[:, None]
    assert layer.unconverged() is None and layer.local_stats()["units_converged"] == 1.0
