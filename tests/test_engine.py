"""The schedule engine: learning-rate schedules, local-layer hooks, both schedules, divergence."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from bioexp.checks import preflight
from bioexp.data import Dataset, Split
from bioexp.engine import (
    Diverged,
    Schedule,
    SupervisedPhase,
    UnsupervisedPhase,
    evaluate,
    fit,
    frozen_body,
    local_layers,
    local_learning,
    supervised_epoch,
)
from bioexp.errors import ConfigError
from bioexp.layers import LocalLayer
from bioexp.models import Classifier
from bioexp.records import RunRecorder

fit_module = importlib.import_module("bioexp.engine.fit")  # the module, not the function


class OjaUnits(LocalLayer):
    """Test double: Oja's subspace rule on a buffer, dW = lr * (y^T x - y^T y W), y = x W^T."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(n_out, n_in) * 0.1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        self.seen.append(x)
        x = x.flatten(1)  # y = x W^T, (B, H), as the forward pass computed it
        self.weight += lr * (y.T @ x - (y.T @ y) @ self.weight) / len(x)

    def local_stats(self) -> dict[str, float]:
        return {"weight_norm": self.weight.norm().item()}


def blob_data(n: int = 400, dim: int = 8, classes: int = 4, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3

    def split(m: int) -> Split:
        y = torch.randint(classes, (m,), generator=g)
        return Split(centres[y] + torch.randn(m, dim, generator=g), y)

    return Dataset("blobs", split(n), split(n // 2), None, classes)


def local_model(dim: int = 8, hidden: int = 6, classes: int = 4) -> Classifier:
    return Classifier(head=nn.Linear(hidden, classes), body=nn.Sequential(OjaUnits(dim, hidden)))


def schedule(name: str, unsup_epochs: int = 2, sup_epochs: int = 3, lr: float = 0.05) -> Schedule:
    return Schedule(name, UnsupervisedPhase(unsup_epochs, 50, 0.01, "linear"),
                    SupervisedPhase(sup_epochs, 50, lr))


@pytest.mark.parametrize(("kind", "expected"), [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]),
    ("exponential", [1.0, 0.5, 0.25, 0.125]),
])
def test_lr_schedules(kind: str, expected: list[float], make_cfg) -> None:
    """The local rate's named schedules, and the supervised ones the lr_schedule group builds."""
    phase = UnsupervisedPhase(4, 10, 0.2, lr_schedule=kind, lr_decay=0.5)
    assert [phase.lr_at(e) for e in range(4)] == pytest.approx([0.2 * f for f in expected])
    cfg = make_cfg(f"lr_schedule={kind}", "schedule.supervised.epochs=4",
                   "schedule.supervised.lr=0.2", "optimizer=sgd")
    if kind == "exponential":
        cfg.lr_schedule.lr_lambda.decay = 0.5
    sup = Schedule.from_cfg(cfg).supervised
    optimizer = sup.optimizer([nn.Parameter(torch.zeros(1))], lr=sup.lr)
    scheduler, rates = sup.lr_schedule(optimizer), []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [phase.lr_at(e) for e in range(4)]  # exactly: LambdaLR, closed forms


def test_local_learning_hooks_feed_each_layer_its_input_and_are_removed() -> None:
    first, second = OjaUnits(8, 6), OjaUnits(6, 3)
    body = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(5, 8)
    with local_learning(body, lambda: 0.1), torch.no_grad():
        body(x)
    assert len(first.seen) == 1 and torch.equal(first.seen[0], x)
    assert second.seen[0].shape == (5, 6) and bool((second.seen[0] >= 0).all())  # after ReLU
    body(x)
    assert len(first.seen) == 1  # hooks are gone outside the context


def test_two_phase_trains_local_layers_then_head_on_cached_features(tmp_path) -> None:
    torch.manual_seed(0)
    model, data = local_model(), blob_data()
    before = model.body[0].weight.clone()
    recorder = RunRecorder(tmp_path)
    result = fit(model, data, schedule("two_phase"), recorder, seed=0)
    assert not torch.equal(before, model.body[0].weight)
    phases = [r["phase"] for r in recorder.rows]
    assert phases == ["unsupervised"] * 2 + ["supervised"] * 3
    assert "OjaUnits0.weight_norm" in recorder.rows[0]
    assert recorder.rows[0]["lr"] == pytest.approx(0.01) and recorder.rows[1]["lr"] == 0.005
    assert frozen_body(model) is model.body
    assert result.test_acc > 0.6  # 4 well-separated blobs; chance is 0.25
    assert [p["name"] for p in result.phases] == ["unsupervised", "supervised"]


def test_two_phase_head_on_cached_features_equals_head_on_live_body(tmp_path,
                                                                    monkeypatch) -> None:
    """With a frozen body, fit computes the features once and trains the head alone on them
    (its caching path), and the test accuracy it records there is the live model's."""
    epochs: list[tuple[Split, bool]] = []

    def spy(model, optimizer, split, *args, **kwargs):
        epochs.append((split, model._on_features))
        return supervised_epoch(model, optimizer, split, *args, **kwargs)

    monkeypatch.setattr(fit_module, "supervised_epoch", spy)
    torch.manual_seed(0)
    model, data = local_model(), blob_data()
    recorder = RunRecorder(tmp_path)
    fit(model, data, schedule("two_phase"), recorder, seed=0)
    assert len(epochs) == 3 and all(on_features for _, on_features in epochs)
    with torch.no_grad():
        features = model.body(data.train.x)
    assert torch.allclose(epochs[0][0].x, features) and torch.equal(epochs[0][0].y, data.train.y)
    assert all(split is epochs[0][0] for split, _ in epochs)  # computed once
    live_loss, live_acc = evaluate(model, data.test, 100)
    assert recorder.rows[-1]["test_acc"] == live_acc
    assert recorder.rows[-1]["test_loss"] == pytest.approx(live_loss)


def test_an_unknown_schedule_kind_is_refused(make_cfg) -> None:
    """Another name would train the head on untrained local layers without a word."""
    with pytest.raises(ConfigError, match="schedule.name must be one of two_phase, one_phase, "
                                          "got 'three_phase'"):
        Schedule("three_phase", UnsupervisedPhase(1, 50, 0.01), SupervisedPhase(1, 50, 0.1))
    with pytest.raises(ConfigError, match="schedule.name must be one of"):
        preflight(make_cfg("schedule.name=two_phases", "data=synthetic", "device=cpu"))


class SummedLoss(Classifier):
    """Test double: a family whose step reports the batch's summed loss, not its mean, and says
    so through `training_loss` (the training-step protocol)."""

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self(x), y) * len(y)

    def train_step(self, x, y, optimizer):
        metrics = super().train_step(x, y, optimizer)
        return {**metrics, "loss": metrics["loss"] * len(y)}


def test_the_divergence_limit_is_on_the_scale_of_the_reported_loss(tmp_path) -> None:
    """A loss summed over 200 samples is 200 times the mean: a limit set from the mean loss
    (100 times it) would call the first step divergence."""

    def big_batches(lr: float) -> Schedule:
        return Schedule("two_phase", UnsupervisedPhase(0, 50, 0.01), SupervisedPhase(5, 200, lr))

    torch.manual_seed(0)
    model = SummedLoss(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    result = fit(model, blob_data(), big_batches(0.05), RunRecorder(tmp_path), seed=0)
    assert result.test_acc > 0.6
    torch.manual_seed(0)
    exploding = SummedLoss(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    with pytest.raises(Diverged, match="100 times the untrained model's"):
        fit(exploding, blob_data(), big_batches(1e6), RunRecorder(tmp_path / "x"), seed=0)


def test_one_phase_updates_local_layers_during_supervised_epochs(tmp_path) -> None:
    torch.manual_seed(0)
    model, data = local_model(), blob_data()
    before = model.body[0].weight.clone()
    recorder = RunRecorder(tmp_path)
    fit(model, data, schedule("one_phase"), recorder, seed=0)
    assert [r["phase"] for r in recorder.rows] == ["supervised"] * 3
    steps_per_epoch = math.ceil(len(data.train) / 50)
    assert len(model.body[0].seen) == 3 * steps_per_epoch
    assert not torch.equal(before, model.body[0].weight)


def test_model_without_local_layers_skips_phase_one(tmp_path, caplog) -> None:
    model = Classifier(nn.Linear(8, 4))
    assert local_layers(model) == [] and frozen_body(model) is None
    recorder = RunRecorder(tmp_path)
    with caplog.at_level("INFO"):
        fit(model, blob_data(), schedule("two_phase"), recorder, seed=0)
    assert "phase 1 (unsupervised) skipped" in caplog.text
    assert [r["phase"] for r in recorder.rows] == ["supervised"] * 3
    assert [r["step"] for r in recorder.rows] == [8, 16, 24]


class NanAfter(nn.Module):
    """Test double: a linear layer whose output turns NaN from its n-th training call on."""

    def __init__(self, n: int):
        super().__init__()
        self.linear, self.n, self.calls = nn.Linear(8, 4), n, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if self.calls > self.n:
                out = out * float("nan")
        return out


def test_divergence_reports_epoch_and_first_bad_step(tmp_path) -> None:
    steps_per_epoch = 8  # 400 samples, batch 50
    model = Classifier(NanAfter(steps_per_epoch + 3))
    recorder = RunRecorder(tmp_path)
    with pytest.raises(Diverged) as info:
        fit(model, blob_data(), schedule("two_phase"), recorder, seed=0)
    # Epochs count from 1 and steps globally: the 4th step of the 2nd epoch is step 8 + 4.
    assert (info.value.phase, info.value.epoch, info.value.step) == ("supervised", 2, 12)
    assert len(recorder.rows) == 1  # the finite first epoch was recorded


def test_an_exploding_loss_is_divergence_not_completion(tmp_path) -> None:
    """lr 1e6 keeps the loss finite (about 1e21) yet has learnt nothing: that is divergence."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    with pytest.raises(Diverged) as info:
        fit(model, blob_data(), Schedule("two_phase", UnsupervisedPhase(0, 50, 0.1),
                                         SupervisedPhase(2, 50, 1e6)),
            RunRecorder(tmp_path), seed=0)
    assert (info.value.epoch, info.value.phase) == (1, "supervised")
    assert 1 <= info.value.step <= 8
    assert "100 times the untrained model's" in str(info.value)


def test_local_layer_divergence_is_caught(tmp_path) -> None:
    model = local_model()
    with pytest.raises(Diverged) as info:
        fit(model, blob_data(), Schedule("two_phase", UnsupervisedPhase(2, 50, 1e6),
                                         SupervisedPhase(1, 50, 0.01)),
            RunRecorder(tmp_path), seed=0)
    assert info.value.phase == "unsupervised" and info.value.step is None


def test_evaluate_matches_a_hand_count() -> None:
    model = Classifier(nn.Linear(8, 4))
    data = blob_data()
    loss, acc = evaluate(model, data.test, batch_size=33)
    with torch.no_grad():
        out = model(data.test.x)
    assert acc == pytest.approx((out.argmax(1) == data.test.y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(out, data.test.y).item(), rel=1e-5)


def test_same_seed_same_metrics(tmp_path) -> None:
    rows = []
    for i in range(2):
        torch.manual_seed(1)
        recorder = RunRecorder(tmp_path / str(i))
        fit(Classifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))),
            blob_data(), schedule("two_phase"), recorder, seed=1)
        rows.append([{k: v for k, v in r.items() if "time" not in k and not k.endswith("_s")}
                     for r in recorder.rows])
    assert rows[0] == rows[1]


def test_grad_clip_bounds_every_step_of_the_optimiser(tmp_path) -> None:
    """schedule.supervised.grad_clip: the gradient's norm is cut to the limit before each step,
    so a plain SGD step moves the weights by at most lr x the limit."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    sched = Schedule("two_phase", UnsupervisedPhase(0, 50, 0.1),
                     SupervisedPhase(1, 400, 1.0, optimizer=torch.optim.SGD, grad_clip=1e-3))
    fit(model, blob_data(), sched, RunRecorder(tmp_path), seed=0)  # one step of batch 400
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-4)  # lr 1 x the clipped norm
