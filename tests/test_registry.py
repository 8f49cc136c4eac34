"""The model registry: listing, hyperparameter checks, and every registered model's forward and
backward pass on small random batches."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from bioexp import registry
from bioexp.errors import ConfigError
from bioexp.models import Classifier
from bioexp.registry import (
    build_model,
    check_hyperparameters,
    list_models,
    parameter_counts,
    register_model,
)

MODEL_NAMES = [entry.name for entry in list_models()]
SHAPES = [((1, 28, 28), 10), ((3, 32, 32), 7)]


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the registry that a test may register into without touching the real one."""
    list_models()  # make sure the built-in models are registered first
    models = dict(registry._MODELS)
    monkeypatch.setattr(registry, "_MODELS", models)
    return models


def test_list_models_has_the_baselines_with_descriptions():
    entries = {entry.name: entry for entry in list_models()}
    assert {"bp_mlp", "cnn"} <= set(entries)
    assert sorted(MODEL_NAMES) == MODEL_NAMES
    for entry in entries.values():
        assert entry.description.strip(), entry.name
        assert "\n" not in entry.description
    assert "perceptron" in entries["bp_mlp"].description.lower()
    assert "convolution" in entries["cnn"].description.lower()


def test_hyperparameters_are_the_factory_keywords():
    entries = {entry.name: entry for entry in list_models()}
    assert entries["bp_mlp"].hyperparameters() == {
        "hidden": (512, 256), "activation": "relu", "dropout": 0.0}
    for entry in entries.values():
        assert "input_shape" not in entry.hyperparameters()
        assert "num_classes" not in entry.hyperparameters()


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ConfigError) as excinfo:
        build_model("no_such_model", (1, 28, 28), 10)
    message = str(excinfo.value)
    assert "no_such_model" in message
    for name in MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize(("name", "key", "value"), [
    ("bp_mlp", "hiddden", [32]),
    ("bp_mlp", "input_shape", (1, 2, 2)),
    ("cnn", "kernel_size", 3),
])
def test_unknown_hyperparameter_is_named(name, key, value):
    # check_hyperparameters is what the train task calls on cfg.model; a config key named
    # like a dataset argument (input_shape) is as unknown as a typo.
    with pytest.raises(ConfigError) as excinfo:
        check_hyperparameters(name, {key: value})
    message = str(excinfo.value)
    assert f"model.{key}" in message
    assert name in message


def test_unknown_hyperparameter_lists_the_options():
    with pytest.raises(ConfigError) as excinfo:
        check_hyperparameters("bp_mlp", {"width": 3})
    for option in ("hidden", "activation", "dropout"):
        assert option in str(excinfo.value)


@pytest.mark.parametrize(("name", "key", "value"), [
    ("bp_mlp", "dropout", "0.2"),           # string for a float
    ("cnn", "dropout", True),               # bool for a float
    ("bp_mlp", "hidden", ["64", "32"]),     # list of str for a list of int
    ("bp_mlp", "hidden", 64),               # scalar for a list of int
    ("bp_mlp", "hidden", "64"),             # string for a list of int
    ("cnn", "channels", [8, True]),         # bool for an int inside a list
    ("cnn", "hidden", [1.5]),               # float for an int inside a list
    ("bp_mlp", "activation", 1),            # int for a string
])
def test_wrong_type_is_named(name, key, value):
    with pytest.raises(ConfigError) as excinfo:
        build_model(name, (1, 28, 28), 10, **{key: value})
    message = str(excinfo.value)
    assert message.startswith(f"model.{key} must be")
    assert repr(value) in message


def test_wrong_type_message_describes_the_expected_type():
    with pytest.raises(ConfigError, match=r"model\.hidden must be a list of int"):
        check_hyperparameters("bp_mlp", {"hidden": ["a"]})
    with pytest.raises(ConfigError, match=r"model\.dropout must be a float"):
        check_hyperparameters("bp_mlp", {"dropout": "high"})


def test_bool_is_not_an_int(isolated_registry):
    @register_model
    def toy_int_model(input_shape: tuple[int, ...], num_classes: int, width: int = 4,
                      scale: float = 1.0, bias: bool = True,
                      sizes: Sequence[int] = (2,)) -> nn.Module:
        """A toy model with an int, a float, a bool and a list hyperparameter."""
        return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes)))

    for key, value in (("width", True), ("width", 2.0), ("width", "4"), ("bias", 1),
                       ("sizes", [False])):
        with pytest.raises(ConfigError, match=rf"^model\.{key} must be"):
            check_hyperparameters("toy_int_model", {key: value})
    # Values of the right type pass, an int passes for a float.
    check_hyperparameters("toy_int_model", {"width": 3, "scale": 2, "bias": False,
                                            "sizes": [1, 2]})
    model = build_model("toy_int_model", (1, 2, 2), 3, width=3)
    assert model(torch.zeros(2, 1, 2, 2)).shape == (2, 3)


def test_accepted_values_build_the_configured_shape():
    model = build_model("bp_mlp", (1, 4, 4), 3, hidden=[8, 5], activation="tanh", dropout=0.0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 5), (5, 3)]
    assert any(isinstance(m, nn.Tanh) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_registering_the_same_name_twice_raises(isolated_registry):
    def toy_twice(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """Toy."""
        return Classifier(nn.Flatten())

    register_model(toy_twice)
    assert "toy_twice" in isolated_registry
    with pytest.raises(ValueError, match="toy_twice"):
        register_model(toy_twice)
    assert isolated_registry["toy_twice"].factory is toy_twice


def test_registering_a_builtin_name_again_raises(isolated_registry):
    def bp_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """An impostor."""
        return Classifier(nn.Flatten())

    original = isolated_registry["bp_mlp"].factory
    with pytest.raises(ValueError, match="bp_mlp"):
        register_model(bp_mlp)
    assert isolated_registry["bp_mlp"].factory is original


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("input_shape", "num_classes"), SHAPES)
def test_every_model_forward_and_backward(name, input_shape, num_classes):
    torch.manual_seed(0)
    model = build_model(name, input_shape, num_classes)
    assert isinstance(model, nn.Module)
    model.train()
    batch = 5
    x = torch.randn(batch, *input_shape)
    y = torch.randint(num_classes, (batch,))
    out = model(x)
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    loss = model.loss(out, y) if hasattr(model, "loss") else nn.functional.cross_entropy(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameters"
    for param_name, param in trainable:
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name} has a non-finite gradient"
    assert any(param.grad.abs().sum() > 0 for _, param in trainable)
    if hasattr(model, "predict"):
        model.eval()
        with torch.no_grad():
            pred = model.predict(model(x))
        assert pred.shape == (batch,)
        assert pred.min() >= 0 and pred.max() < num_classes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_reports_its_step_loss_as_training_loss(name):
    """The training-step protocol: the `loss` a step reports is `training_loss` of its batch
    before the update (same random draws), the scale the divergence limit is set on."""
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10)
    twin = copy.deepcopy(model).train()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(10, (16,))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = model.train().training_loss(x, y)
    optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.01)
    torch.manual_seed(1)
    reported = twin.train_step(x, y, optimizer)["loss"]
    assert reported.shape == () and torch.isfinite(reported)
    assert torch.allclose(reported, expected, rtol=1e-5), (reported, expected)


def test_build_model_rejects_an_unknown_keyword():
    with pytest.raises(ConfigError, match=r"model\.hiddden"):
        build_model("bp_mlp", (1, 28, 28), 10, hiddden=[32])


def test_literal_hyperparameter_lists_its_choices():
    with pytest.raises(ConfigError) as excinfo:
        build_model("fa_mlp", (1, 28, 28), 10, feedback_init="gaussian")
    assert str(excinfo.value) == ("model.feedback_init must be one of kaiming, xavier, "
                                  "got 'gaussian'")
    build_model("fa_mlp", (1, 28, 28), 10, feedback_init="xavier")  # a listed choice builds


def test_parameter_counts_say_what_changes_each_number():
    """The optimiser's parameters, the local rules' weights, and the rest (fixed feedback
    matrices, win counters, batch-norm statistics) are counted apart."""
    fa = build_model("fa_mlp", (1, 4, 4), 3, hidden=[5])
    # W and b of 16 -> 5 -> 3 train; each fixed B has its W's shape
    assert parameter_counts(fa) == {"trainable": 16 * 5 + 5 + 5 * 3 + 3, "local": 0,
                                    "other": 16 * 5 + 5 * 3}
    krotov = build_model("krotov_fc", (1, 4, 4), 3, hidden=8, k=2, head=[])
    # the rule's W (8 x 16), a linear read-out 8 -> 3, and one win counter per unit
    assert parameter_counts(krotov) == {"trainable": 8 * 3 + 3, "local": 8 * 16, "other": 8}
    softhebb = build_model("softhebb_cnn", (1, 28, 28), 3)
    batch_norm = sum(b.numel() for n, b in softhebb.named_buffers() if ".running_" in n)
    assert batch_norm > 0 and parameter_counts(softhebb)["other"] >= batch_norm


def test_a_bound_set_by_another_hyperparameter_is_named():
    """Krotov's k must lie in [2, model.hidden]: `bioexp list` says so, not just "int"."""
    kinds = {e.name: e for e in list_models()}["krotov_fc"].kinds()
    assert kinds["k"] == "int in [2, model.hidden]"
    with pytest.raises(ConfigError, match=r"model\.k must be an int in \[2, model\.hidden\]"):
        check_hyperparameters("krotov_fc", {"k": 1})
