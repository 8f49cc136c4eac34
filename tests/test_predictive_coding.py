"""Predictive coding (`pc_mlp`): one step of each variant worked out by hand, the update against
backprop's gradient at equilibrium, training through `bioexp train` with the alignment angle
logged, exact resumption, and one-line errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, check_bad_setting, check_exact_resume
from conftest import train_here as train

from bioexp.models.predictive_coding import PredictiveCoding
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model

PC_TINY = (*TINY, "model=pc_mlp", "model.hidden=[32,32]", "cache=false", "threads=1")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def tiny(variant: str) -> PredictiveCoding:
    """2 -> 2 (relu) -> 2, squared-error output, one inference step at rate 0.5, with the
    weights of the docstrings."""
    model = build_model("pc_mlp", (2,), 2, hidden=[2], activation="relu", inference_steps=1,
                        inference_lr=0.5, variant=variant, output_energy="squared_error")
    first, second = model.head.layers
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.5, 0.25], [0.1, 0.2]]))
        first.bias.copy_(torch.tensor([0.0, 0.1]))
        second.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.5]]))
        second.bias.zero_()
    return model


X, Y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])


def test_one_standard_step_worked_out_by_hand() -> None:
    """x = [1, 2], target [1, 0]; SGD at lr 0.1.

    Feed-forward: a_1 = [1, .6], x_1 = relu(a_1) = [1, .6], mu_2 = W_2 x_1 = [.4, .8];
    loss = (.6^2 + .8^2) / 2 = .5; errors e_1 = 0, e_2 = [1, 0] - mu_2 = [.6, -.8].
    Inference: dF/dx_1 = e_1 - W_2^T e_2 = [-.2, 1]; x_1 = [1, .6] - .5 [-.2, 1] = [1.1, .1].
    Then e_1 = x_1 - relu(a_1) = [.1, -.5]; mu_2 = W_2 x_1 = [1, .6], e_2 = [0, -.6].
    Update: dF/dW_1 = -(relu'(a_1) e_1) x^T, dF/db_1 = -e_1; dF/dW_2 = -e_2 x_1^T, dF/db_2 = -e_2.
    """
    model = tiny("standard")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = model.train_step(X, Y, optimizer)
    assert metrics["loss"].item() == pytest.approx(0.5)
    assert metrics["correct"].item() == 0  # mu_2 = [.4, .8] says class 1
    e1, x1, e2 = torch.tensor([0.1, -0.5]), torch.tensor([1.1, 0.1]), torch.tensor([0.0, -0.6])
    grads = [-torch.outer(e1, X[0]), -e1, -torch.outer(e2, x1), -e2]
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


def test_one_incremental_step_worked_out_by_hand() -> None:
    """The same batch, incremental: the weights step from the feed-forward state, before the
    values move, where only the output errs: dF/dW_2 = -e_2 x_1^T with e_2 = [.6, -.8] and
    x_1 = [1, .6], dF/db_2 = -e_2, and no gradient below (e_1 = 0)."""
    model = tiny("incremental")
    before = [p.detach().clone() for p in model.parameters()]
    model.train_step(X, Y, torch.optim.SGD(model.parameters(), lr=0.1))
    e2, x1 = torch.tensor([0.6, -0.8]), torch.tensor([1.0, 0.6])
    grads = [torch.zeros(2, 2), torch.zeros(2), -torch.outer(e2, x1), -e2]
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)


def reference_step(model: PredictiveCoding, x: torch.Tensor, target: torch.Tensor, lr: float
                   ) -> list[torch.Tensor]:
    """The parameters after one batch by plain SGD at `lr`, written from the definition: F is
    written out and differentiated by autograd; inference descends it in the hidden values,
    and the weights descend its batch mean (at every inference step, from the same state, for
    the incremental variant; once after inference otherwise)."""
    net = model.head
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    pairs = list(zip(params[::2], params[1::2], strict=True))
    top = len(pairs) - 1

    def predict(i: int, below: torch.Tensor) -> torch.Tensor:
        a = below @ pairs[i][0].T + pairs[i][1]
        return net.f(a) if i < top else a

    with torch.no_grad():
        h, hidden = x, []
        for i in range(top):
            h = predict(i, h)
            hidden.append(h.clone())

    def energy() -> torch.Tensor:  # summed over the batch
        values = [x, *hidden, target]
        hidden_terms = sum(0.5 * (values[i + 1] - predict(i, values[i])).square().sum()
                           for i in range(top))
        logits = predict(top, values[top])
        if model.output_energy == "cross_entropy":
            return hidden_terms - (target * torch.log_softmax(logits, dim=1)).sum()
        return hidden_terms + 0.5 * (target - logits).square().sum()

    def weight_step() -> None:
        grads = torch.autograd.grad(energy() / len(x), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g

    for _ in range(model.inference_steps):
        hidden = [v.detach().requires_grad_() for v in hidden]
        value_grads = torch.autograd.grad(energy(), hidden)
        if model.variant == "incremental":
            weight_step()
        hidden = [v - model.inference_lr * g for v, g in zip(hidden, value_grads, strict=True)]
        hidden = [v.detach() for v in hidden]
    if model.variant == "standard":
        weight_step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("energy", ["squared_error", "cross_entropy"])
@pytest.mark.parametrize("variant", ["standard", "incremental"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu"])
def test_five_steps_equal_the_energy_differentiated_by_autograd(variant: str, activation: str,
                                                                energy: str) -> None:
    """Five inference steps on 6-5-4-3 with the closed-form errors and slopes equal autograd on
    F written out (ReLU with some units silent, so f' matters), for both output energies."""
    torch.manual_seed(0)
    model = build_model("pc_mlp", (6,), 3, hidden=[5, 4], activation=activation,
                        inference_steps=5, inference_lr=0.3, variant=variant,
                        output_energy=energy)
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    expected = reference_step(model, x, torch.nn.functional.one_hot(y, 3).float(), lr=0.5)
    model.train_step(x, y, torch.optim.SGD(model.parameters(), lr=0.5))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    first = model.head.layers[0]
    if activation == "relu":  # some first-layer units are silent for some images
        assert (first(x) <= 0).any()


def update_and_backprop(error: float, seed: int) -> list[tuple[float, float]]:
    """On a 20-32-32-4 tanh network with weights at half nn.Linear's scale, the target is the
    output moved by `error` (a random direction per image): (cosine of the PC update with
    backprop's gradient of 1/2 |mu_L - target|^2) per weight."""
    torch.manual_seed(seed)
    model = build_model("pc_mlp", (20,), 4, hidden=[32, 32], activation="tanh",
                        inference_steps=400, inference_lr=0.2, output_energy="squared_error")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    x = torch.randn(32, 20)
    with torch.no_grad():
        output = model(x)
    direction = torch.randn_like(output)
    target = output + error * direction / direction.norm(dim=1, keepdim=True)
    _, grads = model.relax(x, target)
    loss = 0.5 * (model(x) - target).square().sum(dim=1).mean()
    exact = torch.autograd.grad(loss, list(model.parameters()))
    return [cosine(g, e) for g, e in zip(grads[::2], exact[::2], strict=True)]


@pytest.mark.parametrize("seed", [0, 1])
def test_at_equilibrium_a_small_error_gives_backprops_gradient(seed: int) -> None:
    """Whittington & Bogacz 2017: with inference at equilibrium and a small output error, the
    PC update is backprop's gradient of the same feed-forward network; it departs as the
    error grows (the hidden layers absorb part of a large error). The equality is first-order
    in the layers' gains too: at full nn.Linear scale the cosines here are 0.98 to 0.996."""
    small = update_and_backprop(0.01, seed)
    large = update_and_backprop(3.0, seed)
    assert min(small) > 0.99, small
    assert min(large) < 0.9, large
    assert all(s > big for s, big in zip(small, large, strict=True)), (small, large)


def test_the_loss_falls_and_the_alignment_angle_is_logged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # 20 steps at 0.1: inference that moves the values enough for the update to leave
    # backprop's direction by a few degrees (the default's 5 steps at 0.025 stay within 1)
    assert train(*PC_TINY, "data.n_train=1000", "data.n_test=200",
                 "schedule.supervised.epochs=4", "schedule.supervised.batch_size=50",
                 "model.inference_steps=20", "model.inference_lr=0.1",
                 f"hydra.run.dir={run}") == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "supervised"]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert read_json(run / "summary.json")["test_acc"] > 0.3  # chance: 0.1
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]  # epoch 0: the untrained angles
    for row in rows:  # the rule's own update, not its backward pass (which would give 0)
        angles = [v for k, v in row.items() if k.startswith("angle/")]
        assert len(angles) == 3 and all(1 < a < 90 for a in angles), row


@pytest.mark.parametrize("variant", ["standard", "incremental"])
def test_an_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            variant: str) -> None:
    args = [*PC_TINY, f"model.variant={variant}", "model.inference_steps=5"]
    check_exact_resume(PredictiveCoding, args, tmp_path, monkeypatch)


@pytest.mark.parametrize(("override", "key"), [
    ("model.inference_steps=0", "model.inference_steps"),
    ("model.inference_lr=0", "model.inference_lr"),
    ("model.inference_lr=-0.1", "model.inference_lr"),
    ("model.hidden=[0]", "model.hidden"),
    ("model.activation=gelu", "model.activation"),
    ("model.variant=lazy", "model.variant"),
    ("model.output_energy=hinge", "model.output_energy"),
    ("schedule.supervised.lr=-0.01", "schedule.supervised.lr"),
])
def test_a_bad_setting_is_one_line(make_cfg, override: str, key: str) -> None:
    check_bad_setting(make_cfg, "pc_mlp", override, key)


@pytest.mark.parametrize("variant", ["standard", "incremental"])
def test_a_bf16_step_keeps_the_value_nodes_in_float32(variant: str) -> None:
    """Under bf16 autocast (`precision=bf16`) the products run in bf16 but the value nodes,
    which add up many small steps, stay float32: the update is close to the float32 one."""
    torch.manual_seed(0)
    model = build_model("pc_mlp", (1, 8, 8), 10, variant=variant)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(10, (32,))
    target = torch.nn.functional.one_hot(y, 10).float()
    still = torch.optim.SGD(model.parameters(), lr=0.0)  # runs the incremental branch
    _, exact = model.relax(x, target, still)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = model.relax(x, target, still)
    assert all(cosine(a, b) > 0.99 for a, b in zip(low, exact, strict=True))
