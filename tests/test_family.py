"""A model family defined entirely in this file, trained through `bioexp train`.

It is what the README's "Adding a model family" describes: a local-rule layer of its own, a
classifier with its own training step (sign descent whose step size shrinks with a counter it
keeps between steps), a factory registered in the registry, and a config registered with
Hydra. It runs under both schedules, and a run stopped mid-epoch and resumed ends exactly
where an uninterrupted run ends: the family's extra state travels in its checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY, rows_without_time
from conftest import train_here as train
from hydra.core.config_store import ConfigStore
from torch import nn

from bioexp import registry
from bioexp.layers import LocalLayer
from bioexp.models import Classifier
from bioexp.records import read_json, read_metrics

STOP_AT_STEP: list[int] = []  # the step at which the family asks for a stop (SIGINT), once


class Centring(LocalLayer):
    """y = x - m, where the rule moves m towards the batch mean: dm = mean(x) - m."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) - self.weight

    def local_update(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        self.weight += lr * (x.flatten(1).mean(dim=0) - self.weight)


class SignDescent(Classifier):
    """Trains by sign descent, lr / sqrt(1 + steps) per step, with a counter of its own."""

    def __init__(self, head: nn.Module, body: nn.Module):
        super().__init__(head, body)
        self.steps = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        output = self(x)
        loss = self.loss(output, y)
        params = [p for p in self.parameters() if p.requires_grad]
        scale = optimizer.param_groups[0]["lr"] / (1 + self.steps) ** 0.5
        with torch.no_grad():
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.sub_(scale * g.sign())
        self.steps += 1
        if STOP_AT_STEP and self.steps == STOP_AT_STEP[0]:
            STOP_AT_STEP.clear()
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: stop at the next boundary
        return {"loss": loss.detach(), "correct": (self.predict(output) == y).sum(),
                "step_size": torch.tensor(scale)}

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = state["steps"]


def toy_family(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> Classifier:
    """Centred inputs under an MLP trained by sign descent (a test's own family)."""
    features = int(torch.tensor(input_shape).prod())
    head = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))
    return SignDescent(head, body=Centring(features))


@pytest.fixture
def family(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The family registered as a model, and its config as `model=toy_family`, for one test."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    registry.register_model(toy_family)
    store = ConfigStore.instance()
    store.store(group="model", name="toy_family",
                node={"name": "toy_family", "input_scale": "unit", "width": 16})
    yield
    del store.repo["model"]["toy_family.yaml"]




def steps_in_checkpoint(run: Path) -> int:
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    return state["_extra_state"]["steps"]


@pytest.mark.parametrize("schedule", ["two_phase", "one_phase"])
def test_a_family_of_its_own_trains_checkpoints_and_resumes(family, tmp_path: Path,
                                                            schedule: str) -> None:
    args = [*TINY, "model=toy_family", f"schedule={schedule}", "schedule.supervised.lr=0.02",
            "cache=false"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(*args, f"hydra.run.dir={whole}") == 0
    summary = read_json(whole / "summary.json")
    assert summary["status"] == "completed" and summary["test_acc"] > 0.2, summary  # chance: 0.1
    rows = [r for r in read_metrics(whole / "metrics.jsonl") if r["phase"] == "supervised"]
    assert all(0 < r["train_step_size"] <= 0.02 for r in rows), rows  # the family's own metric
    assert steps_in_checkpoint(whole) == 2 * 4  # 2 epochs of 256 images at batch 64
    if schedule == "two_phase":
        assert [p["name"] for p in summary["phases"]] == ["unsupervised", "supervised"]

    STOP_AT_STEP[:] = [6]  # in the middle of the second epoch
    assert train(*args, f"hydra.run.dir={parts}") == 130
    assert read_json(parts / "summary.json")["status"] == "interrupted"
    assert steps_in_checkpoint(parts) == 6
    assert train(f"resume={parts}") == 0
    assert read_json(parts / "summary.json")["status"] == "completed"
    assert rows_without_time(parts) == rows_without_time(whole)
    assert steps_in_checkpoint(parts) == steps_in_checkpoint(whole)
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
               for run in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
               if isinstance(weights[0][k], torch.Tensor))
    assert json.loads((parts / "summary.json").read_text())["resumed"][0]["epoch"] == 2
