"""`bioexp explain` (bioexp.attribution): the methods against hand-computed maps, the deletion
curve against a random order on a trained network, exact gradients through feedback-alignment
layers, Forward-Forward and BioCell runs end to end, and its mistakes in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, output_of
from torch import nn

import bioexp
from bioexp import attribution
from bioexp.attribution import Settings, deletion_curve, deletion_order, explainer
from bioexp.cli import main
from bioexp.compare import read_run, run_table
from bioexp.errors import BioexpError
from bioexp.layers.feedback import exact_gradient_note
from bioexp.registry import build_model

pytest.importorskip("captum")


class Linear(nn.Module):
    """f(x) = W x + b on flattened images, with a Classifier's `predict`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)


def test_integrated_gradients_of_a_linear_model_is_w_times_x() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    model = Linear(weight, bias)
    x, target = torch.rand(5, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 1, 0])
    maps = explainer("ig", model, 0.0, Settings(ig_steps=8))(x, target)
    expected = (weight[target] * x.flatten(1)).view_as(x)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    gain = model(x).gather(1, target[:, None]) - model(torch.zeros_like(x)).gather(
        1, target[:, None])
    sums = maps.flatten(1).sum(dim=1)
    assert torch.allclose(sums, gain.squeeze(1), rtol=0.01)
    # gradient x input is the same for a linear model and a zero baseline
    saliency = explainer("saliency", model, 0.0, Settings())(x, target)
    torch.testing.assert_close(saliency, expected, rtol=1e-4, atol=1e-5)


def test_occlusion_puts_all_its_mass_where_the_model_reads() -> None:
    weight = torch.zeros(2, 1, 12, 12)
    weight[:, :, 4:8, 8:12] = torch.rand(2, 1, 4, 4) + 0.5  # the model reads this region only
    model = Linear(weight.flatten(1), torch.zeros(2))
    x = torch.rand(3, 1, 12, 12) + 0.1
    maps = explainer("occlusion", model, 0.0, Settings(window=4, stride=4))(
        x, torch.tensor([0, 1, 0]))
    mass = maps.abs()
    assert mass[:, :, 4:8, 8:12].sum() > 0
    assert mass.sum() == pytest.approx(mass[:, :, 4:8, 8:12].sum().item(), rel=1e-6)


def test_the_deletion_order_removes_the_largest_first_and_breaks_ties_at_random() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])
    shuffle = torch.tensor([[5, 4, 3, 2, 1, 0]])
    assert deletion_order(scores, shuffle).tolist() == [[1, 4, 2, 5, 3, 0]]


def test_the_deletion_curve_of_a_model_reading_one_pixel() -> None:
    """The target's probability falls once its one pixel is removed, not before."""
    weight = torch.zeros(2, 4)
    weight[0, 2] = 10.0
    model = Linear(weight, torch.tensor([0.0, 1.0]))
    x = torch.ones(1, 1, 2, 2)
    curve = deletion_curve(model, x, torch.tensor([0]), torch.tensor([0]),
                           torch.tensor([[2, 0, 1, 3]]), 0.0, steps=4)
    assert curve["accuracy"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert curve["probability"][0] == pytest.approx(torch.sigmoid(torch.tensor(9.0)).item())
    assert curve["probability"][1] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())
    late = deletion_curve(model, x, torch.tensor([0]), torch.tensor([0]),
                          torch.tensor([[0, 1, 3, 2]]), 0.0, steps=4)
    assert late["accuracy"] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert late["auc"] > curve["auc"]


def test_feedback_alignment_models_are_explained_by_the_exact_gradient() -> None:
    torch.manual_seed(0)
    fa = build_model("fa_mlp", (1, 6, 6), 4, hidden=[8]).eval()
    layers = [m for m in fa.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 2 and all(hasattr(m, "feedback_weight") for m in layers)
    copy = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 4))
    copy.load_state_dict({k.removeprefix("head."): v for k, v in fa.state_dict().items()
                          if "feedback" not in k})
    copy.predict = lambda output: output.argmax(dim=1)
    x, target = torch.rand(6, 1, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(fa(x), copy(x))
    for method in attribution.GRADIENT_METHODS:
        ours = explainer(method, fa, 0.0, Settings(ig_steps=8))(x, target)
        exact = explainer(method, copy, 0.0, Settings(ig_steps=8))(x, target)
        torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-6)
    assert "exact backprop" in exact_gradient_note(fa, "the gradient methods")


@pytest.fixture(scope="module")
def bp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bp_mlp trained for a few epochs on synthetic data (a few seconds)."""
    folder = tmp_path_factory.mktemp("explain") / "bp"
    bioexp.run([*TINY, "model=bp_mlp", "schedule.supervised.epochs=4"], run_dir=folder)
    return folder


@pytest.mark.slow
def test_on_a_trained_network_the_deletion_area_is_far_below_a_random_orders(
        bp_run: Path) -> None:
    subject, = attribution.load_subjects([bp_run], torch.device("cpu"), 40)
    assert sorted(subject.labels.tolist()[:10]) == list(range(10))  # a few per class
    explanation = attribution.explain_subject(subject, ["ig"], "predicted",
                                              Settings(sensitivity_samples=1))
    record = explanation.record
    assert record["accuracy"] > 0.5, record["accuracy"]
    ig = record["methods"]["ig"]
    assert ig["deletion_auc"] < 0.6 * record["random_auc"], (ig["deletion_auc"],
                                                             record["random_auc"])
    assert ig["deletion"]["auc_accuracy"] < record["random"]["auc_accuracy"]
    assert ig["infidelity"] >= 0 and ig["sensitivity_max"] >= 0
    assert record["explains"] == "the logit of the target class"


def _explain_here(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    try:
        main(["explain", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _written(folder: Path) -> list[Path]:
    return [p for p in (folder / "eval" / "attribution.json", folder / "plots" / "attributions.png",
                        folder / "plots" / "attribution_classes.png") if p.exists()]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["method", "checkpoint", "images", "plot", "plot_folder"])
def test_mistakes_are_one_line_and_leave_no_files(case: str, bp_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    args = {"method": [str(bp_run), "--method", "ig,gradcam"],
            "checkpoint": [str(bp_run), str(empty)],  # the good run first: checked, not written
            "images": [str(bp_run), "--images", "129"],
            "plot": [str(bp_run), "--plot", str(tmp_path / "maps.txt")],
            "plot_folder": [str(bp_run), "--plot", "/proc/bioexp/maps.png"]}[case]
    needle = {"method": "unknown method 'gradcam'", "checkpoint": "has no checkpoint",
              "images": "more than the 128 test images", "plot": "must end in one of",
              "plot_folder": "cannot write /proc/bioexp/maps.png"}[case]
    code, err = _explain_here(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("bioexp: error:") and needle in lines[0], err
    assert _written(bp_run) == [] and _written(empty) == []


def test_a_missing_captum_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "captum" else real(name, *a))
    with pytest.raises(BioexpError, match=r"needs Captum.*\[explain\]"):
        attribution.require_captum()


@pytest.mark.slow
def test_forward_forward_and_biocell_runs_are_explained_end_to_end(bioexp, tmp_path: Path,
                                                                   bp_run: Path) -> None:
    from conftest import train_here

    runs = {name: tmp_path / name for name in ("ff_mlp", "krotov_biocell_fc")}
    for name, folder in runs.items():
        assert train_here(*TINY, f"model={name}", "model.hidden=[64]" if name == "ff_mlp"
                          else "model.hidden=100", f"hydra.run.dir={folder}") == 0
    result = bioexp("explain", *map(str, runs.values()), "--images", "12", "--plot", "rows.png",
                    "--sensitivity-samples", "1")
    output = output_of(result)
    assert result.returncode == 0, output
    assert "Traceback" not in output
    explains = {"ff_mlp": "total goodness of the target label",
                "krotov_biocell_fc": "class output c"}
    for name, folder in runs.items():
        record = json.loads((folder / "eval" / "attribution.json").read_text())
        assert explains[name] in record["explains"], record["explains"]
        assert set(record["methods"]) == {"ig", "saliency", "occlusion"}
        assert record["n_images"] == 12 and len(record["test_index"]) == 12
        assert len(_written(folder)) == 3
        assert f"{folder}: the maps explain" in output
    assert (tmp_path / "rows.png").is_file()
    first, second = (json.loads((f / "eval" / "attribution.json").read_text())
                     for f in runs.values())
    assert first["test_index"] == second["test_index"]  # the same images for every run
    table = run_table([read_run(f) for f in runs.values()])
    column = table.column("deletion_auc")
    assert column == [first["deletion_auc"], second["deletion_auc"]]


def test_the_explained_output_is_the_models_output_at_the_target() -> None:
    """FF: the summed goodness of the image under the target label; BioCell: c."""
    torch.manual_seed(0)
    ff = build_model("ff_mlp", (1, 6, 6), 4, hidden=[8, 8]).eval()
    x = torch.rand(3, 1, 6, 6)
    labels = torch.arange(4)[:, None].expand(-1, 3)
    goodness = torch.stack(ff.body.goodnesses(x, labels), dim=-1).sum(dim=-1).T  # (B, classes)
    torch.testing.assert_close(ff(x), goodness)
    assert "goodness" in attribution.explained_output(ff)
    cell = build_model("krotov_biocell_fc", (1, 6, 6), 4, hidden=10).eval()
    from bioexp.models.krotov import BioCell

    assert isinstance(cell.head[-1], BioCell)
    c = cell.head[-1](cell.head[:-1](cell.body(x)))  # tanh(beta S relu(h)^n)
    torch.testing.assert_close(cell(x), c)
    assert c.abs().max() < 1
    assert "c = tanh" in attribution.explained_output(cell)
