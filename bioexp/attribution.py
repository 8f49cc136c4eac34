"""`bioexp explain`: what each trained network looks at, and how faithful that picture is.

Three attribution methods from Captum (Kokhlikyan et al. 2020), each a map (N, C, H, W) of one
output per image, the output at the target class (the predicted one, or the true one):

- Integrated Gradients (Sundararajan, Taly & Yan 2017): (x - x0) times the mean gradient along
  the straight path from the baseline x0 to x; its maps sum to f(x) - f(x0) (completeness).
- Saliency as gradient x input (Simonyan et al. 2014; Shrikumar et al. 2016): grad f(x) times
  (x - x0), which for unit-scale pixels (x0 = 0) is gradient x input.
- Occlusion (Zeiler & Fergus 2014): f(x) minus f(x with a window set to x0), averaged over the
  windows that cover each pixel. It needs no gradient, only forward passes.

The baseline x0 is a black image (the lowest pixel value of the model's input scale), which is
also what the deletion curve sets removed pixels to. The gradient methods use the exact
gradient of the function the model computes: feedback-alignment layers are switched to exact
backprop (`exact_backprop`), as for the FGSM attack. The explained output is the model's
forward output at the target index: a logit for most families, the total goodness of the
target label for Forward-Forward, the class output c = tanh(beta S h) for BioCell heads.

Faithfulness, per method:

- Deletion curve (Petsiuk, Das & Saenko 2018, "RISE"): remove the most attributed pixels first
  (attributions summed over channels, ties broken at random), in equal steps, setting them to the
  baseline; record the mean softmax probability of the target and the accuracy. Its area
  (fraction removed from 0 to 1) is lower when the map finds the pixels that matter; the same
  curve for a random pixel order is the reference.
- Infidelity (Yeh et al. 2019): E[(I . A - (f(x) - f(x - I)))^2] over Gaussian perturbations I,
  with the map A rescaled to its best fit (Captum's `normalize=True`), so methods whose maps
  differ in scale can be compared.
- Max-sensitivity (same paper): the largest relative change of the map, ||A(x + d) - A(x)|| /
  ||A(x)||, over uniform perturbations d of small radius.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioexp.errors import ConfigError
from bioexp.layers.feedback import exact_backprop, exact_gradient_note

log = logging.getLogger(__name__)

METHODS = {"ig": "Integrated Gradients", "saliency": "gradient x input",
           "occlusion": "Occlusion"}
GRADIENT_METHODS = ("ig", "saliency")
ATTRIBUTION_FILE = "attribution.json"  # in a run's eval/ folder
# The headline method of `bioexp compare`'s deletion_auc column: the first of these measured.
HEADLINE = ("ig", "saliency", "occlusion")


@dataclass(frozen=True)
class Settings:
    """The knobs of `bioexp explain`, with defaults sized for 64 images on 2 CPU cores.

    Attributes:
        ig_steps: Points on the path of Integrated Gradients (Gauss-Legendre quadrature).
        window: Occlusion's square window, in pixels.
        stride: Occlusion's stride, in pixels.
        deletion_steps: Steps of the deletion curve (it has deletion_steps + 1 points).
        infidelity_samples: Gaussian perturbations per image for infidelity.
        infidelity_std: Their standard deviation, as a fraction of the pixel range.
        sensitivity_samples: Perturbations per image for max-sensitivity (each one explains
            the image again: the costliest number here).
        sensitivity_radius: Their radius (L-infinity), as a fraction of the pixel range.
        batch_size: Images per forward pass where the methods batch their work.
        seed: Seeds the image choice, the random pixel order and the perturbations.
    """

    ig_steps: int = 32
    window: int = 4
    stride: int = 2
    deletion_steps: int = 20
    infidelity_samples: int = 8
    infidelity_std: float = 0.1
    sensitivity_samples: int = 4
    sensitivity_radius: float = 0.02
    batch_size: int = 1024
    seed: int = 0


def parse_methods(text: str) -> list[str]:
    """`ig,saliency,occlusion` -> the list; ConfigError naming an unknown method."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method {unknown[0] if unknown else text!r}; methods: "
                          f"{', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def require_captum() -> None:
    """ConfigError with the install command when Captum is missing."""
    import importlib.util

    if importlib.util.find_spec("captum") is None:
        from bioexp.overrides import install_hint

        raise ConfigError(f"bioexp explain needs Captum, which is not installed: "
                          f"{install_hint('explain')}")


def pick_images(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of `n` test images, a few per class: a seeded random order within each class,
    then the classes taken in turn (class 0, 1, ..., 0, 1, ...). The same labels give the same
    images, so runs on the same test set are explained on the same images."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    pools = [idx[torch.randperm(len(idx), generator=g)].tolist()
             for idx in (torch.nonzero(labels == c).flatten() for c in labels.unique().tolist())]
    picked: list[int] = []
    for rank in range(max(map(len, pools), default=0)):
        picked += [pool[rank] for pool in pools if rank < len(pool)]
    return torch.tensor(picked[:n], dtype=torch.long)


def explained_output(model: nn.Module) -> str:
    """What the maps explain, in words, for the output."""
    from bioexp.models.forward_forward import ForwardForward
    from bioexp.models.krotov import BioCell

    if isinstance(model, ForwardForward):
        return "the total goodness of the target label (Forward-Forward)"
    if any(isinstance(m, BioCell) for m in model.modules()):
        return "the BioCell head's class output c = tanh(beta S h) of the target class"
    return "the logit of the target class"


# ----------------------------------------------------------------------------------------------
# The methods


def explainer(method: str, model: nn.Module, baseline: float, settings: Settings
              ) -> Callable[..., torch.Tensor]:
    """`explain(inputs, target=...) -> attributions` of one method, of the inputs' shape."""
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    n_per_batch = settings.batch_size
    if method == "ig":
        ig = IntegratedGradients(model)

        def explain(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return ig.attribute(inputs, baselines=baseline, target=target,
                                n_steps=settings.ig_steps, internal_batch_size=n_per_batch)
    elif method == "saliency":
        saliency = Saliency(model)

        def explain(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            grad = saliency.attribute(inputs.requires_grad_(), target=target, abs=False)
            return grad * (inputs - baseline)
    elif method == "occlusion":
        occlusion = Occlusion(model)

        def explain(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            c, h, w = inputs.shape[1:]
            win, stride = min(settings.window, h, w), settings.stride
            return occlusion.attribute(inputs, sliding_window_shapes=(c, win, win),
                                       strides=(c, stride, stride), baselines=baseline,
                                       target=target,
                                       perturbations_per_eval=max(1, n_per_batch // len(inputs)))
    else:
        raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")

    def run(inputs: torch.Tensor | tuple[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, tuple):  # Captum's metrics pass the inputs as a 1-tuple
            inputs = inputs[0]
        with torch.enable_grad(), exact_backprop(model):
            return explain(inputs.detach(), target).detach()

    return run


# ----------------------------------------------------------------------------------------------
# Faithfulness


@torch.no_grad()
def deletion_curve(model: nn.Module, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
                   order: torch.Tensor, baseline: float, steps: int,
                   batch_size: int = 1024) -> dict[str, Any]:
    """Set the pixels of each image to the baseline in `order` (N, H*W; first removed first),
    `steps` equal steps; the mean softmax probability of `target` and the accuracy against
    `y` after each step, and the areas under both curves (fraction removed 0 to 1)."""
    n, c, h, w = x.shape
    fractions = [i / steps for i in range(steps + 1)]
    probability, accuracy = [], []
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=x.device)
                                            .expand(n, -1))  # rank[i, pixel]
    for fraction in fractions:
        removed = (rank < round(fraction * h * w)).view(n, 1, h, w)
        inputs = torch.where(removed, torch.full_like(x, baseline), x)
        p, correct = [], []
        for start in range(0, n, batch_size):
            out = model(inputs[start:start + batch_size]).float()
            t = target[start:start + batch_size]
            p.append(out.softmax(dim=1).gather(1, t[:, None]).squeeze(1))
            correct.append(model.predict(out) == y[start:start + batch_size])
        probability.append(torch.cat(p).mean().item())
        accuracy.append(torch.cat(correct).float().mean().item())
    area = torch.trapezoid(torch.tensor(probability), torch.tensor(fractions)).item()
    area_acc = torch.trapezoid(torch.tensor(accuracy), torch.tensor(fractions)).item()
    return {"fractions": fractions, "probability": probability, "accuracy": accuracy,
            "auc": area, "auc_accuracy": area_acc}


def pixel_scores(attributions: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): a pixel's attribution, summed over its channels."""
    return attributions.sum(dim=1).flatten(1)


def deletion_order(scores: torch.Tensor, shuffle: torch.Tensor) -> torch.Tensor:
    """Pixels by decreasing score, ties (such as occlusion's flat windows or pixels a model
    never reads) in the random order `shuffle` (N, H*W)."""
    ranked = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    return shuffle.gather(1, ranked)


def random_orders(n: int, pixels: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(pixels, generator=g) for _ in range(n)]).to(device)


def infidelity_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  attributions: torch.Tensor, std: float, samples: int, seed: int,
                  batch_size: int) -> float:
    """Captum's infidelity (normalised), mean over the images."""
    from captum.metrics import infidelity

    g = torch.Generator(device=x.device).manual_seed(seed)

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(inputs.shape, generator=g, device=inputs.device) * std
        return noise, inputs - noise

    with torch.no_grad():
        values = infidelity(model, perturb, x, attributions, target=target,
                            n_perturb_samples=samples, normalize=True,
                            max_examples_per_batch=len(x) * min(samples,
                                                                max(1, batch_size // len(x))))
    return values.mean().item()


def sensitivity_of(explain: Callable[..., torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                   radius: float, samples: int, seed: int) -> float:
    """Captum's max-sensitivity, mean over the images; the perturbations seeded."""
    from captum.metrics import sensitivity_max

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = sensitivity_max(explain, x, perturb_radius=radius, n_perturb_samples=samples,
                                 max_examples_per_batch=len(x), target=target)
    return values.mean().item()


# ----------------------------------------------------------------------------------------------
# One run


@dataclass
class Explanation:
    """One run's attributions and faithfulness numbers over the chosen images.

    Attributes:
        images: The images (N, C, H, W), on the CPU.
        labels: Their true classes (N,).
        predicted: The classes the model predicts (N,).
        target: The class each map explains (N,).
        maps: Method -> attributions (N, H, W), summed over channels, on the CPU.
        record: What eval/attribution.json holds.
    """

    images: torch.Tensor
    labels: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@contextmanager
def timing(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time in seconds (to the millisecond) as `seconds[key]`."""
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 3)


def explain_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: list[str],
                  baseline: float, pixel_range: float, target_kind: str = "predicted",
                  settings: Settings = Settings()) -> Explanation:
    """Explain `model` on the images `x` (N, C, H, W) with labels `y`, by each method, and
    measure each map's faithfulness (see the module's docstring).

    Args:
        model: A model in eval mode; `model(x)` gives (N, classes), `model.predict` classes.
        x: The images, on the model's device.
        y: Their labels (N,).
        methods: Keys of METHODS.
        baseline: The pixel value of removed or occluded pixels, and IG's baseline.
        pixel_range: The width of the pixel scale (1 for unit, 2 for symmetric), which
            the perturbations' sizes are fractions of.
        target_kind: `predicted` or `true`: which class each map explains.
        settings: The methods' and the measures' settings.

    Returns:
        The maps and the record.
    """
    with torch.no_grad():
        predicted = model.predict(model(x))
    target = predicted if target_kind == "predicted" else y
    n, _, h, w = x.shape
    shuffle = random_orders(n, h * w, settings.seed, x.device)
    random = deletion_curve(model, x, target, y, shuffle, baseline, settings.deletion_steps,
                            settings.batch_size)
    result = Explanation(x.cpu(), y.cpu(), predicted.cpu(), target.cpu())
    measured: dict[str, Any] = {}
    for method in methods:
        explain = explainer(method, model, baseline, settings)
        seconds: dict[str, float] = {}
        with timing(seconds, "attribution"):
            attributions = explain(x, target)
        scores = pixel_scores(attributions)
        with timing(seconds, "deletion"):
            curve = deletion_curve(model, x, target, y, deletion_order(scores, shuffle),
                                   baseline, settings.deletion_steps, settings.batch_size)
        with timing(seconds, "infidelity"):
            infid = infidelity_of(model, x, target, attributions, settings.infidelity_std
                                  * pixel_range, settings.infidelity_samples, settings.seed,
                                  settings.batch_size)
        with timing(seconds, "sensitivity"):
            sens = (sensitivity_of(explain, x, target, settings.sensitivity_radius * pixel_range,
                                   settings.sensitivity_samples, settings.seed)
                    if settings.sensitivity_samples > 0 else None)
        log.info("%s: deletion area %.4f (random %.4f), infidelity %.3g, max-sensitivity %s; "
                 "%.1f s", method, curve["auc"], random["auc"], infid,
                 "-" if sens is None else f"{sens:.3g}", sum(seconds.values()))
        result.maps[method] = scores.view(n, h, w).cpu()
        measured[method] = {"name": METHODS[method], "deletion": curve,
                            "deletion_auc": curve["auc"], "infidelity": infid,
                            "sensitivity_max": sens, "seconds": seconds}
    headline = next(m for m in (*HEADLINE, *methods) if m in measured)
    result.record = {
        "n_images": n, "target": target_kind, "baseline": baseline,
        "explains": explained_output(model),
        "gradient": exact_gradient_note(model, "the gradient methods"),
        "accuracy": (predicted == y).float().mean().item(),
        "headline": headline, "deletion_auc": measured[headline]["deletion_auc"],
        "random_auc": random["auc"],
        "methods": measured, "random": random,
        "settings": {**vars(settings), "window": min(settings.window, h, w)},
    }
    return result


# ----------------------------------------------------------------------------------------------
# Runs (`bioexp explain`)


@dataclass
class Subject:
    """A run to explain: its model and the chosen test images, the rest of its data dropped."""

    path: Path
    name: str
    model: nn.Module
    images: torch.Tensor  # (N, C, H, W) on the model's device
    labels: torch.Tensor  # (N,)
    input_scale: str
    class_names: tuple[str, ...]
    index: list[int]  # the images' places in the run's test split


def load_subjects(folders: list[Path], device: torch.device, n_images: int,
                  seed: int = 0) -> list[Subject]:
    """Every run read back and checked before anything is computed or written: ConfigError for
    a folder without a checkpoint, or with fewer test images than `n_images`."""
    from bioexp.runs import load_run

    subjects = []
    data_log = logging.getLogger("bioexp.data")
    level = data_log.level
    for folder in folders:
        data_log.setLevel(logging.WARNING)  # where the data came from: `bioexp eval` says it
        try:
            run = load_run(folder, device)
        finally:
            data_log.setLevel(level)
        test = run.data.test
        if n_images > len(test):
            raise ConfigError(f"--images {n_images} is more than the {len(test)} test images "
                              f"of {folder}")
        index = pick_images(test.y, n_images, seed).to(test.x.device)
        subjects.append(Subject(run.path, run.name, run.model, test.x[index], test.y[index],
                                run.cfg.model.input_scale, tuple(run.data.class_names),
                                index.tolist()))
    return subjects


def explain_subject(subject: Subject, methods: list[str], target_kind: str,
                    settings: Settings = Settings()) -> Explanation:
    """`explain_model` on a run's chosen images, with its input scale's black as baseline."""
    from bioexp.robustness import PIXEL_RANGE

    low, high = PIXEL_RANGE[subject.input_scale]
    log.info("%s: explaining %d images", subject.name, len(subject.images))
    return explain_model(subject.model, subject.images, subject.labels, methods, low,
                         high - low, target_kind, settings)


def write_explanation(subject: Subject, explanation: Explanation) -> Path:
    """`<run>/eval/attribution.json`, `plots/attributions.png` and
    `plots/attribution_classes.png`; returns the run folder."""
    from bioexp.plots import plot_attribution_classes, plot_attributions
    from bioexp.records import write_json
    from bioexp.robustness import EVAL_DIR

    plots = subject.path / "plots"
    e = explanation
    plot_attributions(e.images, e.maps, e.predicted, e.labels, plots / "attributions.png",
                      title=subject.name, class_names=subject.class_names)
    plot_attribution_classes(e.maps, e.labels, plots / "attribution_classes.png",
                             title=subject.name, class_names=subject.class_names)
    write_json(subject.path / EVAL_DIR / ATTRIBUTION_FILE,
               {**e.record, "test_index": subject.index, "labels": e.labels.tolist(),
                "predicted": e.predicted.tolist()})
    return subject.path


def plot_runs(explained: list[tuple[Subject, Explanation]], path: Path) -> Path:
    """The runs' maps over the same images, a row per run and method (`--plot`)."""
    from bioexp.plots import plot_attribution_runs

    first_subject, first = explained[0]
    runs = {s.name: (e.images, e.maps, e.predicted) for s, e in explained}
    return plot_attribution_runs(runs, first.images, first.labels, path,
                                 class_names=first_subject.class_names)
