"""Forward-Forward (`ff_mlp`): one update worked out by hand, local losses that stay local, the
label written into the image, prediction by goodness, training through `bioexp train`, exact
resumption, and one-line errors for bad settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, check_bad_setting, check_exact_resume
from conftest import train_here as train

from bioexp.data import Split
from bioexp.errors import ConfigError
from bioexp.models.forward_forward import ForwardForward, embed_labels
from bioexp.records import read_json, read_metrics
from bioexp.registry import build_model
from bioexp.robustness import fgsm_accuracy

FF_TINY = (*TINY, "model=ff_mlp", "model.hidden=[32,32]", "cache=false", "threads=1")


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def test_one_sgd_step_worked_out_by_hand() -> None:
    """One layer of 2 units on 3 inputs, 2 classes, threshold 1, SGD at lr 0.5.

    The image [9, 9, s] (s = sqrt 2) becomes v+ = [1, 0, s] with its label 0 and v- = [0, 1, s]
    with the only wrong label, 1; both have root mean square 1, so normalising changes nothing.
    With W = [[1, -1, .5], [0, .5, .5]], b = [0, .1]:
      a+ = relu(W v+ + b) = [1 + s/2, s/2 + .1],   a- = [relu(-1 + s/2), .5 + s/2 + .1] = [0, ..]
      g = (a_1^2 + a_2^2) / 2,   L = (softplus(1 - g+) + softplus(g- - 1)) / 2
      dL/dW_j = -sigmoid(1 - g+) a+_j v+ / 2 + sigmoid(g- - 1) a-_j v- / 2   (dg/da_j = a_j)
      dL/db_j = the same with v = 1.
    """
    s = math.sqrt(2)
    model = build_model("ff_mlp", (3,), 2, hidden=[2], threshold=1.0, skip_first=False,
                        negatives="random", label_value=1.0)
    layer = model.body.layers[0]
    w0 = [[1.0, -1.0, 0.5], [0.0, 0.5, 0.5]]
    b0 = [0.0, 0.1]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w0))
        layer.bias.copy_(torch.tensor(b0))
    v_pos, v_neg = [1.0, 0.0, s], [0.0, 1.0, s]
    a_pos = [1 + s / 2, s / 2 + 0.1]
    a_neg = [0.0, 0.5 + s / 2 + 0.1]  # the first unit is silent: -1 + s/2 < 0
    g_pos = (a_pos[0] ** 2 + a_pos[1] ** 2) / 2
    g_neg = (a_neg[0] ** 2 + a_neg[1] ** 2) / 2
    loss = (softplus(1 - g_pos) + softplus(g_neg - 1)) / 2
    up, down = -sigmoid(1 - g_pos) / 2, sigmoid(g_neg - 1) / 2
    grad_w = [[up * a_pos[j] * v_pos[k] + down * a_neg[j] * v_neg[k] for k in range(3)]
              for j in range(2)]
    grad_b = [up * a_pos[j] + down * a_neg[j] for j in range(2)]
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    metrics = model.train_step(torch.tensor([[9.0, 9.0, s]]), torch.tensor([0]), optimizer)
    assert metrics["loss"].item() == pytest.approx(loss, abs=1e-6)
    assert metrics["pos_goodness"].item() == pytest.approx(g_pos, abs=1e-6)
    assert metrics["neg_goodness"].item() == pytest.approx(g_neg, abs=1e-6)
    expected_w = [[w0[j][k] - lr * grad_w[j][k] for k in range(3)] for j in range(2)]
    expected_b = [b0[j] - lr * grad_b[j] for j in range(2)]
    assert torch.allclose(layer.weight, torch.tensor(expected_w), atol=1e-6)
    assert torch.allclose(layer.bias, torch.tensor(expected_b), atol=1e-6)
    assert layer.weight[0, 0] > w0[0][0] and layer.weight[1, 1] < w0[1][1]  # label 0 up, 1 down


def small_model(**options) -> ForwardForward:
    torch.manual_seed(0)
    return build_model("ff_mlp", (1, 6, 6), 4, hidden=[8, 7, 5], **options)


def test_no_gradient_reaches_a_layer_from_a_later_layers_loss() -> None:
    model = small_model()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(4, (16,))
    losses, _, _ = model.layer_losses(x, y, (y + 1) % 4)
    layers = model.body.layers
    losses[2].backward()
    assert layers[0].weight.grad is None and layers[1].weight.grad is None
    assert layers[2].weight.grad.abs().sum() > 0
    losses[1].backward()
    assert layers[0].weight.grad is None and layers[1].weight.grad.abs().sum() > 0


def test_one_optimiser_step_is_one_step_per_layer_on_its_own_loss() -> None:
    """Adam over all layers on sum_l L_l == one Adam per layer on L_l (same negatives)."""
    together, apart = small_model(), small_model()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(4, (16,))
    torch.manual_seed(1)
    together.train_step(x, y, torch.optim.Adam(together.parameters(), lr=0.01))
    torch.manual_seed(1)
    y_neg, _ = apart.negative_labels(x, y)
    losses, _, _ = apart.layer_losses(x, y, y_neg)
    for layer, loss in zip(apart.body.layers, losses, strict=True):
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
        loss.backward()
        optimizer.step()
    for p, q in zip(together.parameters(), apart.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)


def test_the_label_overwrites_the_first_pixels() -> None:
    x = torch.rand(3, 1, 4, 4)
    labelled = embed_labels(x, torch.tensor([2, 0, 1]), 3, value=5.0)
    assert labelled.shape == (3, 16)
    assert torch.equal(labelled[:, :3], 5.0 * torch.eye(3)[[2, 0, 1]])
    assert torch.equal(labelled[:, 3:], x.flatten(1)[:, 3:])


@pytest.mark.parametrize("skip_first", [True, False])
def test_scores_are_the_total_goodness_per_label(skip_first: bool) -> None:
    model = small_model(skip_first=skip_first, negatives="hard").eval()
    x = torch.rand(5, 1, 6, 6)
    scores = model(x)
    assert scores.shape == (5, 4)
    for label in range(4):
        per_layer = [g[0] for g in model.body.goodnesses(x, torch.full((1, 5), label))]
        expected = sum(per_layer[1:] if skip_first else per_layer)
        assert torch.allclose(scores[:, label], expected, atol=1e-6)
    assert torch.equal(model.predict(scores), scores.argmax(dim=1))
    lone = build_model("ff_mlp", (1, 6, 6), 4, hidden=[8], skip_first=True)
    assert torch.allclose(lone(x)[:, 1], lone.body.goodnesses(x, torch.full((1, 5), 1))[0][0])


def test_the_first_layer_shortcut_is_the_labelled_image_through_the_layer() -> None:
    """first_layer computes W x once per image; it equals the layer on each labelled copy."""
    model = small_model(label_value=3.0)
    x, labels = torch.rand(5, 1, 6, 6), torch.randint(4, (2, 5))
    fast = model.body.first_layer(x, labels)
    for k in range(2):
        slow = model.body.layers[0](embed_labels(x, labels[k], 4, value=3.0))
        assert torch.allclose(fast[k], slow, atol=1e-5)


def test_scores_are_differentiable_in_the_image_except_the_label_pixels() -> None:
    model = small_model()
    x = torch.rand(5, 1, 6, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(model.loss(model(x), torch.arange(5) % 4), x)
    grad = grad.flatten(1)
    assert torch.all(grad[:, :4] == 0) and grad[:, 4:].abs().sum() > 0


def test_fgsm_attacks_forward_forward_through_its_goodness() -> None:
    """Images labelled with the model's own predictions (clean accuracy 1): FGSM at eps 0.1
    changes many predictions, exactly as the attack written out by hand does."""
    model = small_model().eval()
    x = torch.rand(200, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.predict(model(x))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.loss(model(xg), y), xg)
    with torch.no_grad():
        by_hand = (model.predict(model((x + 0.1 * grad.sign()).clamp(0, 1))) == y).float().mean()
    accuracy = fgsm_accuracy(model, Split(x, y), [0.0, 0.1], (0.0, 1.0))
    assert accuracy[0] == 1.0
    assert accuracy[1] == pytest.approx(by_hand.item())
    assert accuracy[1] < 0.9, accuracy  # the attack did something


def test_hard_negatives_are_wrong_labels() -> None:
    model = small_model(negatives="hard")
    x, y = torch.rand(200, 1, 6, 6), torch.randint(4, (200,))
    y_neg, scores = model.negative_labels(x, y)
    assert scores.shape == (200, 4) and not torch.any(y_neg == y)
    assert len(set(y_neg.tolist())) == 4




def test_the_loss_falls_on_generated_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(*FF_TINY, "data.n_train=1000", "data.n_test=200", "model.hidden=[64,64]",
                 "schedule.supervised.epochs=5", "schedule.supervised.batch_size=50",
                 f"hydra.run.dir={run}") == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "supervised"]
    losses = [r["train_loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert rows[-1]["train_pos_goodness"] > rows[-1]["train_neg_goodness"]
    assert read_json(run / "summary.json")["test_acc"] > 0.3  # chance: 0.1


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_an_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            negatives: str) -> None:
    check_exact_resume(ForwardForward, [*FF_TINY, f"model.negatives={negatives}"], tmp_path,
                       monkeypatch)


@pytest.mark.parametrize(("override", "key"), [
    ("model.threshold=-0.5", "model.threshold"),
    ("model.hidden=[0]", "model.hidden"),
    ("model.hidden=[]", "model.hidden"),
    ("model.label_value=0", "model.label_value"),
    ("model.negatives=mined", "model.negatives"),
    ("schedule.supervised.lr=-0.01", "schedule.supervised.lr"),
])
def test_a_bad_setting_is_one_line(make_cfg, override: str, key: str) -> None:
    check_bad_setting(make_cfg, "ff_mlp", override, key)


def test_an_image_too_small_for_the_label_is_refused() -> None:
    with pytest.raises(ConfigError, match="no pixel left"):
        build_model("ff_mlp", (1, 3, 3), 10)
