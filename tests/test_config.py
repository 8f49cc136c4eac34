"""Config composition and validation: every option of every group composes, every model x schedule
validates and builds, and `validate` names the key of every bad value."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from bioexp.config import config_dir, config_groups, group_options, validate
from bioexp.errors import ConfigError
from bioexp.registry import build_model, list_models

MODEL_META_KEYS = ("name", "input_scale")
# The keys the data layer reads from every dataset config (besides `name`).
DATA_KEYS = ("root", "download", "train_limit", "test_limit", "val_size", "seed")


def options(group: str) -> list[str]:
    return [name for name, _ in group_options(group) if not name.startswith("_")]


def hyperparameters(cfg: DictConfig) -> dict:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return {k: v for k, v in model.items() if k not in MODEL_META_KEYS}


GROUPS = config_groups()
ALL_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert {"bp_mlp", "cnn"} <= set(options("model"))
    assert {"mnist", "fashion_mnist", "cifar10", "synthetic"} <= set(options("data"))
    assert {"two_phase", "one_phase"} <= set(options("schedule"))
    assert "baselines" in options("experiment")


# Groups outside train.yaml's defaults list are added with "+", over the model they serve.
ADDED_GROUPS = {"hebbian_split": ("model=semihebb",), "hybrid": (), "bench": (), "labels": ()}


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_every_option_composes(make_cfg, group, option):
    if group in ADDED_GROUPS:
        cfg = make_cfg(*ADDED_GROUPS[group], f"+{group}={option}")
    else:
        cfg = make_cfg(f"{group}={option}")
    assert isinstance(cfg, DictConfig)
    if group in ("model", "data", "schedule"):
        assert cfg[group].name == option
    # Every key resolves (no dangling interpolations).
    container = OmegaConf.to_container(cfg, resolve=True)
    assert {"seed", "device", "model", "data", "schedule"} <= set(container)


@pytest.mark.parametrize("option", options("data"))
def test_every_dataset_config_has_the_common_keys_and_validates(make_cfg, option):
    cfg = make_cfg(f"data={option}")
    assert set(DATA_KEYS) <= set(cfg.data)
    assert cfg.data.name == option
    validate(cfg)


@pytest.mark.parametrize("schedule", options("schedule"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_and_schedule_composes_validates_and_builds(make_cfg, model, schedule):
    cfg = make_cfg(f"model={model}", f"schedule={schedule}")
    assert cfg.model.name == model and cfg.schedule.name == schedule
    validate(cfg)
    net = build_model(cfg.model.name, (1, 28, 28), 10, **hyperparameters(cfg))
    assert sum(p.numel() for p in net.parameters()) > 0


def test_every_registered_model_has_a_config_file():
    configured = set(options("model"))
    for entry in list_models():
        assert entry.name in configured, f"conf/model/{entry.name}.yaml is missing"


@pytest.mark.parametrize("model", options("model"))
def test_model_config_keys_are_factory_hyperparameters(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    entry = {e.name: e for e in list_models()}[cfg.model.name]
    assert set(hyperparameters(cfg)) <= set(entry.hyperparameters())


def test_group_options_describe_every_option():
    for group in GROUPS:
        listed = group_options(group)
        files = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        assert [name for name, _ in listed] == files
        for name, description in listed:
            assert description.strip(), f"{group}/{name} has no description"
            assert not description.startswith(("#", "@")), (group, name, description)
            assert "@package" not in description


def test_group_options_takes_the_first_comment_line(tmp_path, monkeypatch):
    import bioexp.config

    group = tmp_path / "grp"
    group.mkdir()
    (group / "a.yaml").write_text("# Option A does this\nkey: 1\n")
    (group / "b.yaml").write_text("# @package _global_\n# Option B does that\nkey: 2\n")
    (group / "c.yaml").write_text("key: 3\n")
    monkeypatch.setattr(bioexp.config, "config_dir", lambda: tmp_path)
    assert group_options("grp") == [("a", "Option A does this"), ("b", "Option B does that"),
                                    ("c", "")]


def test_experiment_baselines_composes(make_cfg):
    cfg = make_cfg("experiment=baselines")
    validate(cfg)
    assert cfg.model.name == "bp_mlp"


def test_experiment_baselines_sets_the_global_sweep():
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=baselines"],
                      return_hydra_config=True)
    assert cfg.get("experiment") is None
    params = cfg.hydra.sweeper.params
    assert params is not None
    assert set(str(params.model).split(",")) == {"bp_mlp", "cnn"}
    assert str(params.seed).split(",") == ["0", "1", "2"]


def test_default_config_validates(make_cfg):
    cfg = make_cfg()
    validate(cfg)
    assert cfg.data.train_limit is None


BAD_VALUES = [
    ("schedule.supervised.lr=0", "schedule.supervised.lr", "0"),
    ("schedule.supervised.lr=-1", "schedule.supervised.lr", "-1"),
    ("schedule.supervised.lr=abc", "schedule.supervised.lr", "'abc'"),
    ("schedule.supervised.lr=inf", "schedule.supervised.lr", "inf"),
    ("schedule.unsupervised.lr=0", "schedule.unsupervised.lr", "0"),
    ("schedule.unsupervised.lr=-0.5", "schedule.unsupervised.lr", "-0.5"),
    ("schedule.supervised.epochs=-1", "schedule.supervised.epochs", "-1"),
    ("schedule.unsupervised.epochs=-3", "schedule.unsupervised.epochs", "-3"),
    ("schedule.supervised.batch_size=0", "schedule.supervised.batch_size", "0"),
    ("schedule.unsupervised.batch_size=0", "schedule.unsupervised.batch_size", "0"),
    ("data.train_limit=0", "data.train_limit", "0"),
    ("data.test_limit=-5", "data.test_limit", "-5"),
    ("data.val_size=-1", "data.val_size", "-1"),
    ("schedule.unsupervised.lr_schedule=step", "schedule.unsupervised.lr_schedule", "'step'"),
    ("device=gpu", "device", "'gpu'"),
    ("model.input_scale=foo", "model.input_scale", "'foo'"),
    ("data.train_limit=1.5", "data.train_limit", "1.5"),
    ("schedule.supervised.epochs=true", "schedule.supervised.epochs", "True"),
]


@pytest.mark.parametrize(("override", "key", "shown"), BAD_VALUES,
                         ids=[override for override, _, _ in BAD_VALUES])
def test_validate_rejects_and_names_the_key(make_cfg, override, key, shown):
    cfg = make_cfg(override)
    with pytest.raises(ConfigError) as excinfo:
        validate(cfg)
    message = str(excinfo.value)
    assert message.startswith(f"{key} must be"), message
    assert message.endswith(f"got {shown}"), message


def test_validate_lists_the_choices(make_cfg):
    with pytest.raises(ConfigError) as excinfo:
        validate(make_cfg("schedule.unsupervised.lr_schedule=step"))
    for choice in ("constant", "cosine", "linear", "exponential"):
        assert choice in str(excinfo.value)


@pytest.mark.parametrize(("override", "new"), [
    ("schedule.supervised.optimizer=sgd", "use the config group optimizer: optimizer=adam"),
    ("schedule.supervised.momentum=0.5", "use optimizer.momentum"),
    ("schedule.supervised.weight_decay=0.1", "use optimizer.weight_decay"),
    ("schedule.supervised.lr_schedule=linear", "use the config group lr_schedule"),
    ("schedule.supervised.lr_decay=0.9", "use lr_schedule.lr_lambda.decay"),
])
def test_keys_of_earlier_versions_name_their_replacement(override, new):
    from bioexp.config import retired_key

    key = override.split("=")[0]
    assert retired_key(override).startswith(f"{key} is gone: {new}")
    assert retired_key("schedule.supervised.lr=0.1") is None


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_and_schedule_option_builds_a_torch_object(make_cfg, name):
    from bioexp.engine import Schedule

    for lr_schedule in options("lr_schedule"):
        sup = Schedule.from_cfg(make_cfg(f"optimizer={name}", f"lr_schedule={lr_schedule}")
                                ).supervised
        optimizer = sup.optimizer([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
        assert type(optimizer).__module__.startswith("torch.optim")
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
        scheduler = sup.lr_schedule(optimizer)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


def test_any_torch_optimizer_from_the_command_line(make_cfg):
    from bioexp.engine import Schedule

    cfg = make_cfg("optimizer._target_=torch.optim.Adagrad", "~optimizer.weight_decay",
                   "+optimizer.lr_decay=0.01")
    optimizer = Schedule.from_cfg(cfg).supervised.optimizer([torch.nn.Parameter(torch.zeros(2))],
                                                            lr=0.1)
    assert isinstance(optimizer, torch.optim.Adagrad)
    assert optimizer.defaults["lr_decay"] == 0.01


@pytest.mark.parametrize("overrides", [
    ("data.train_limit=null",),
    ("data.train_limit=null", "data.test_limit=null"),
    ("data.train_limit=1", "data.test_limit=1", "data.val_size=0"),
    ("schedule.supervised.epochs=0", "schedule.unsupervised.epochs=0"),
    ("schedule.supervised.lr=1",),
    ("device=cpu",), ("device=cuda",), ("device=cuda:1",), ("device=auto",),
    ("model.input_scale=symmetric",),
    ("optimizer=sgd", "lr_schedule=constant"),
])
def test_validate_accepts(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    validate(cfg)
    if "data.train_limit=null" in overrides:
        assert cfg.data.train_limit is None


@pytest.mark.parametrize("model", options("model"))
def test_model_config_values_equal_the_factory_defaults(make_cfg, model):
    """conf/model/<name>.yaml and the factory's defaults tell one story (no silent drift)."""
    cfg = make_cfg(f"model={model}")
    defaults = {e.name: e for e in list_models()}[cfg.model.name].hyperparameters()
    for key, value in hyperparameters(cfg).items():
        default = defaults[key]
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected, f"{model}.yaml sets {key}={value!r}, the factory {default!r}"


def test_ignored_settings_are_named_only_when_given(make_cfg):
    from bioexp.config import ignored_settings

    cfg = make_cfg("model=semihebb", "model.rule=oja")
    notes = ignored_settings(cfg, ["model.rule", "model.sparsity",
                                   "schedule.unsupervised.lr_decay"])
    assert notes == [
        "schedule.unsupervised.lr_decay is ignored: only lr_schedule exponential uses it, and "
        "this run's is linear",
        "model.sparsity is ignored: only the gupta rules use it, and this run's model.rule is oja",
    ]
    assert ignored_settings(cfg, []) == []  # defaults the user never touched say nothing
    exponential = make_cfg("schedule.unsupervised.lr_schedule=exponential")
    assert ignored_settings(exponential, ["schedule.unsupervised.lr_decay"]) == []


def test_descriptions_are_whole_paragraphs():
    from bioexp.config import description

    text = ("# @package _global_\n# Learning rates 1e-4 to 3e-3, picked on a\n"
            "# held-out split.\n#\n# More detail.\nkey: 1\n")
    assert description(text) == "Learning rates 1e-4 to 3e-3, picked on a held-out split."
    assert description("# Parallel jobs here\n#   bioexp train -m ...\nn: 2\n") == (
        "Parallel jobs here")


def test_every_model_hyperparameter_has_a_meaning():
    from bioexp.config import model_options

    for entry in list_models():
        rows, _ = model_options(entry.name)
        assert {key for key, _, _ in rows} == set(entry.hyperparameters()) | {"input_scale"}
        assert all(meaning for _, _, meaning in rows), (entry.name, rows)


@pytest.mark.parametrize(("overrides", "message"), [
    (("optimizer._target_=torch.optim.Nope",),
     "optimizer (torch.optim.Nope) cannot be built: Error locating target 'torch.optim.Nope'"),
    (("+optimizer.betaz=3",), "optimizer (torch.optim.Adam) cannot be built: Adam.__init__() "
                              "got an unexpected keyword argument 'betaz'"),
    (("lr_schedule=step", "+lr_schedule.foo=1"), "lr_schedule (torch.optim.lr_scheduler.StepLR) "
                                                 "cannot be built: StepLR.__init__() got an "
                                                 "unexpected keyword argument 'foo'"),
])
def test_an_optimizer_or_schedule_that_cannot_be_built_is_one_sentence(make_cfg, overrides,
                                                                       message):
    from bioexp.checks import preflight

    with pytest.raises(ConfigError) as excinfo:
        preflight(make_cfg("data=synthetic", *overrides))
    assert str(excinfo.value) == message
