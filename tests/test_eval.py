"""`bioexp eval`: FGSM, representations and costs of trained runs."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, bioexp_command, output_of, train_here
from omegaconf import OmegaConf

from bioexp import plots
from bioexp.data import Dataset, Split
from bioexp.engine import local_layers
from bioexp.evaluate import evaluate_run, forward_flops, hidden_features, last_hidden_layer, pca_2d
from bioexp.layers.feedback import exact_backprop
from bioexp.records import read_json
from bioexp.registry import build_model
from bioexp.robustness import PIXEL_RANGE, fgsm_accuracy, fgsm_inputs, input_gradient_sign
from bioexp.runs import TrainedRun, load_run

# Enough synthetic data and epochs for a model that is really trained (test accuracy near 1).
TRAINED = ("data=synthetic", "data.n_train=2000", "data.n_test=500", "schedule.supervised.epochs=4",
           "schedule.supervised.batch_size=32",
           "progress=false", "device=cpu")


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bp_mlp run (trained to test accuracy 1) and a small krotov_fc run (barely trained:
    it is here for the local-rule layer), by the real command."""
    root = tmp_path_factory.mktemp("eval")
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
    for folder, extra in (("0_bp_mlp", ["model=bp_mlp"]),
                          ("1_krotov_fc", ["model=krotov_fc", "model.hidden=64",
                                           "model.head=[32]", "schedule.unsupervised.epochs=2"])):
        result = subprocess.run([*bioexp_command(), "train", *extra, *TRAINED,
                                 f"hydra.run.dir={root / 'runs' / folder}"],
                                capture_output=True, text=True, cwd=root, env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    return root / "runs"


def test_fgsm_keeps_pixels_in_range() -> None:
    x = torch.rand(64, 1, 4, 4)
    sign = torch.randn_like(x).sign()
    for scale, (low, high) in PIXEL_RANGE.items():
        xs = x * (high - low) + low
        adv = fgsm_inputs(xs, sign, 0.3, (low, high))
        assert adv.min() >= low and adv.max() <= high, scale
        inside = (xs + 0.3 * (high - low) * sign - adv).abs() < 1e-6
        assert inside.any()  # where no clamping was needed, the step is eps times the range
        assert torch.equal(fgsm_inputs(xs, sign, 0.0, (low, high)), xs)


def test_feedback_layers_are_attacked_through_their_true_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("fa_mlp", (1, 8, 8), 10, hidden=[32])
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    sign = input_gradient_sign(model, x, y)
    xg = x.clone().requires_grad_(True)
    with exact_backprop(model):
        (exact,) = torch.autograd.grad(model.loss(model(xg), y), xg)
    xf = x.clone().requires_grad_(True)
    (through_b,) = torch.autograd.grad(model.loss(model(xf), y), xf)
    assert torch.equal(sign, exact.sign())
    assert not torch.equal(sign, through_b.sign())  # B is not W: the training signal differs


def test_pca_and_flops_on_known_inputs() -> None:
    line = torch.arange(100.0)[:, None] * torch.tensor([[3.0, 4.0, 0.0]])  # all on one line
    coords, ratios = pca_2d(line)
    assert ratios[0] == pytest.approx(1.0) and coords.shape == (100, 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert forward_flops(model, torch.rand(8, 1, 28, 28)) == 2 * 784 * 10


def test_eval_of_trained_runs_writes_files_that_compare_reads(bioexp, trained_runs, tmp_path):
    runs = sorted(p for p in trained_runs.iterdir() if (p / "summary.json").is_file())
    assert len(runs) == 2
    result = bioexp("eval", *map(str, runs), "--plot", str(tmp_path / "fgsm.png"))
    assert result.returncode == 0, output_of(result)
    assert (tmp_path / "fgsm.png").stat().st_size > 5000
    for run in runs:
        summary = read_json(run / "summary.json")
        fgsm = read_json(run / "eval" / "fgsm.json")
        assert fgsm["eps"][0] == 0.0
        assert fgsm["accuracy"][0] == summary["test_acc"]  # eps 0 is the clean accuracy
        if summary["model"] == "bp_mlp":  # trained to test accuracy 1: the attack has work
            assert summary["test_acc"] > 0.9
            accuracy = fgsm["accuracy"]
            assert all(b <= a for a, b in zip(accuracy, accuracy[1:], strict=False)), accuracy
            assert accuracy[-1] < accuracy[0]
        representation = read_json(run / "eval" / "representation.json")
        confusion = torch.tensor(representation["confusion"])
        assert confusion.sum() == fgsm["n_test"]
        assert confusion.trace() / confusion.sum() == pytest.approx(summary["test_acc"])
        efficiency = read_json(run / "eval" / "efficiency.json")
        assert efficiency["flops_per_sample"] > 0 and efficiency["parameters"]["trainable"] > 0
        for plot in ("fgsm", "embedding", "confusion"):
            assert (run / "plots" / f"{plot}.png").is_file(), plot
    assert (runs[1] / "plots" / "receptive_fields.png").is_file()  # the Krotov layer's weights
    krotov = read_json(runs[1] / "eval" / "efficiency.json")
    assert krotov["parameters"]["local"] >= 64 * 784  # the Krotov layer's weights
    compared = bioexp("compare", str(trained_runs), "--csv", str(tmp_path / "t.csv"))
    assert compared.returncode == 0 and "fgsm@0.1" in compared.stdout
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    for row, run in zip(rows, runs, strict=True):
        at = dict(zip(*(read_json(run / "eval" / "fgsm.json")[k] for k in ("eps", "accuracy")),
                      strict=True))
        assert float(row["fgsm@0.1"]) == pytest.approx(at[0.1])
        assert float(row["MFLOP"]) > 0


def hand_fgsm_accuracy(model: torch.nn.Module, split: Split, eps: float) -> float:
    """FGSM written out for a model without feedback layers, one gradient for the whole split:
    x' = clamp(x + eps sign(d loss / d x), 0, 1) on [0, 1] pixels."""
    x = split.x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.loss(model(x), split.y), x)
    with torch.no_grad():
        adversarial = (x + eps * grad.sign()).clamp(0.0, 1.0)
        return (model.predict(model(adversarial)) == split.y).sum().item() / len(split)


def test_the_fgsm_file_holds_the_attack_at_each_strength(trained_runs, tmp_path) -> None:
    """`bioexp eval --eps 0,0.1` on a copy of the bp_mlp run: eval/fgsm.json at eps 0.1 is the
    attack's accuracy (computed again here, in the library and by hand), well below the clean
    accuracy of a model trained to accuracy 1."""
    from bioexp.cli import eval_command  # without main's logging set-up: in-process

    source = sorted(p for p in trained_runs.iterdir() if (p / "summary.json").is_file())[0]
    run_dir = tmp_path / source.name  # a copy: the other tests' eval files stay theirs
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("eval", "plots"))
    eval_command([str(run_dir), "--eps", "0,0.1", "--embed-samples", "50"])
    fgsm = read_json(run_dir / "eval" / "fgsm.json")
    assert fgsm["eps"] == [0.0, 0.1]
    run = load_run(run_dir, torch.device("cpu"))
    assert last_hidden_layer(run.model) is not None
    clean, attacked = fgsm_accuracy(run.model, run.data.test, [0.0, 0.1], PIXEL_RANGE["unit"])
    assert clean == read_json(run_dir / "summary.json")["test_acc"] > 0.9
    assert attacked == pytest.approx(hand_fgsm_accuracy(run.model, run.data.test, 0.1))
    assert fgsm["accuracy"] == pytest.approx([clean, attacked])
    assert attacked < clean - 0.1, (clean, attacked)  # the attack did something


def printed_columns(text: str) -> dict[str, list[str]]:
    """A printed table's cells by header, read at the positions of its line of dashes."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[at])]
    return {lines[at - 1][a:b].strip(): [row[a:b].strip() for row in lines[at + 1:]]
            for a, b in spans}


def test_train_with_fgsm_attacks_the_final_model_for_compare(tmp_path, capsys) -> None:
    """README: `bioexp train ... fgsm=[0,0.1]` attacks the trained model at the end of the run
    (eval/fgsm.json) and fills the `fgsm@0.1` column of `bioexp compare`."""
    from bioexp.cli import compare_command  # without main's logging set-up: in-process

    run_dir = tmp_path / "run"
    assert train_here(*TINY, "model=bp_mlp", "fgsm=[0,0.1]", f"hydra.run.dir={run_dir}") == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed", summary
    fgsm = read_json(run_dir / "eval" / "fgsm.json")
    assert fgsm["eps"] == [0.0, 0.1] and fgsm["n_test"] == 128, fgsm
    run = load_run(run_dir, torch.device("cpu"))
    clean, attacked = fgsm_accuracy(run.model, run.data.test, [0.0, 0.1], PIXEL_RANGE["unit"])
    assert clean == summary["test_acc"]
    assert attacked < clean - 0.05, (clean, attacked)  # so the file tells the two apart
    assert fgsm["accuracy"] == pytest.approx([clean, attacked])
    capsys.readouterr()
    compare_command([str(run_dir), "--csv", str(tmp_path / "t.csv")])
    cells = printed_columns(capsys.readouterr().out)
    assert cells["fgsm@0.1"] == [f"{attacked:.4f}"], cells
    with open(tmp_path / "t.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["fgsm@0.1"]) == pytest.approx(attacked)


def test_eval_errors_are_one_line(bioexp, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    missing = bioexp("eval", str(tmp_path / "empty"))
    assert missing.returncode != 0 and "has no checkpoint" in missing.stderr
    bad_eps = bioexp("eval", str(tmp_path / "empty"), "--eps", "0,2")
    assert bad_eps.returncode == 2 and "--eps" in bad_eps.stderr
    nowhere = bioexp("eval", str(tmp_path / "nope"))
    assert nowhere.returncode != 0 and "is not a folder" in nowhere.stderr
    assert "Traceback" not in missing.stderr + bad_eps.stderr + nowhere.stderr


def test_eval_figures_name_classes_and_show_the_most_used_units(tmp_path, monkeypatch) -> None:
    """A hand-made run (no training): the dataset's class names reach the confusion matrix and
    the embedding, and the receptive fields start with the unit that won most."""
    saved: dict[str, plots.Figure] = {}  # file name -> figure, kept as it is saved
    save = plots._save

    def keep(fig: plots.Figure, path: Path) -> None:
        saved[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    torch.manual_seed(0)
    names = ("T-shirt/top", "Trouser", "Pullover")
    split = Split(torch.rand(30, 1, 4, 4), torch.arange(30) % 3)
    data = Dataset("toy", split, split, None, 3, class_names=names)
    model = build_model("krotov_fc", (1, 4, 4), 3, hidden=6, k=2, head=[8])
    layer = local_layers(model)[0]
    layer.wins.copy_(torch.tensor([0.0, 2.0, 0.0, 40.0, 1.0, 0.0]))
    layer.weight[3] = torch.arange(16.0) - 20  # the busiest unit: all weights negative
    cfg = OmegaConf.create({"model": {"name": "krotov_fc", "input_scale": "unit"}})
    evaluate_run(TrainedRun(tmp_path, cfg, model.eval(), data, {}), [0.0], embed_samples=30)
    confusion = saved["confusion.png"].axes[0]
    assert [t.get_text() for t in confusion.get_xticklabels()] == list(names)
    legend = saved["embedding.png"].axes[0].get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(names)
    fields = saved["receptive_fields.png"].axes[0]
    assert "the 6 most-used of 6 units" in fields.get_title()
    assert (fields.images[0].get_array()[:4, :4] < 0).all()  # the first tile is unit 3's


def test_the_representation_of_a_settling_model_is_its_last_state() -> None:
    """eqprop_mlp calls its output layer at every step of its free phase: the pictured
    representation is that layer's input at the last step (the settled hidden state), batch
    by batch."""
    torch.manual_seed(0)
    model = build_model("eqprop_mlp", (8,), 4, hidden=[6], free_steps=3)
    x = torch.rand(5, 8)
    name, layer = last_hidden_layer(model)
    assert layer is model.head.layers[-1], name
    net = model.head
    with torch.no_grad():
        settled = net.settle(net.input_drive(x), net.zero_states(x), 2)[0]  # its last input
    torch.testing.assert_close(hidden_features(model, layer, x, batch_size=2), settled)
