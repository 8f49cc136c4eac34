"""`bioexp eval`: robustness, representations and costs of trained runs, written into their folders.

- FGSM (Goodfellow, Shlens & Szegedy 2015) at each strength, by `bioexp.robustness`. Every
  model here is differentiable with respect to its input (Krotov and Hebbian layers compute
  x W; their learning rules, not their forward passes, hold the winner-take-all), so the attack
  uses the exact input gradient.
- The last hidden layer (the input of the last linear layer) of a sample of test images,
  projected on its first two principal components. PCA rather than t-SNE: it is deterministic,
  takes a second, needs no extra dependency, and its axes and explained variance mean the same
  for every run, so two runs' pictures can be compared.
- The confusion matrix of the clean test set.
- Costs: parameters, forward FLOPs per sample (matrix products and convolutions, counted by
  torch.utils.flop_counter), and the per-phase time, throughput and memory of the run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bioexp.data import Split
from bioexp.records import write_json
from bioexp.registry import parameter_counts
from bioexp.robustness import EVAL_DIR, write_fgsm
from bioexp.runs import TrainedRun

DEFAULT_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


# ----------------------------------------------------------------------------------------------
# Representations


def last_hidden_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last linear layer (its input is the last hidden representation), else the head."""
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    head = getattr(model, "head", None)
    return ("head", head) if head is not None else None


@torch.no_grad()
def hidden_features(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                    batch_size: int = 1000) -> torch.Tensor:
    """The input that `layer` receives for each image of `x`, flattened: in a model that calls
    the layer many times a prediction (a settling loop), its input at the last call."""
    captured: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        last[:] = [args[0]]

    handle = layer.register_forward_pre_hook(keep)
    try:
        for start in range(0, len(x), batch_size):
            last.clear()
            model(x[start:start + batch_size])
            captured.append(last[0].flatten(1))
    finally:
        handle.remove()
    return torch.cat(captured).float().cpu()


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(n, 2) coordinates on the first two principal components, and their explained variance
    ratios."""
    centred = features - features.mean(dim=0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    variance = s.square()
    ratios = (variance[:2] / variance.sum().clamp_min(1e-12)).tolist()
    return centred @ v[:2].T, ratios


@torch.no_grad()
def confusion_matrix(model: nn.Module, split: Split, num_classes: int,
                     batch_size: int = 1000) -> torch.Tensor:
    """counts[true class, predicted class] over the split."""
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=split.x.device)
    for x, y in split.batches(batch_size):
        counts += torch.bincount(y * num_classes + model.predict(model(x)),
                                 minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


# ----------------------------------------------------------------------------------------------
# Costs


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass per sample of `x` (matrix products and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / len(x)


# ----------------------------------------------------------------------------------------------
# One run


def evaluate_run(run: TrainedRun, eps_list: list[float], embed_samples: int = 2000,
                 batch_size: int = 1000) -> dict[str, Any]:
    """Measure one run and write eval/*.json and plots/{fgsm,embedding,confusion}.png, and,
    for models with local-rule layers, plots/receptive_fields.png (and win_counts.png)."""
    from bioexp.plots import plot_confusion, plot_embedding, plot_fgsm, plot_local_layer

    model, test = run.model, run.data.test
    fgsm = write_fgsm(model, test, eps_list, run.cfg.model.input_scale, run.path, batch_size)
    accuracy = fgsm["accuracy"]

    counts = confusion_matrix(model, test, run.data.num_classes, batch_size)
    representation: dict[str, Any] = {"confusion": counts.tolist()}
    layer = last_hidden_layer(model)
    sample = test.x[:embed_samples]
    if layer is not None:
        coords, ratios = pca_2d(hidden_features(model, layer[1], sample, batch_size))
        representation.update(layer=layer[0], n=len(sample), explained_variance=ratios)
        plot_embedding(coords, test.y[:embed_samples].cpu(), run.path / "plots" / "embedding.png",
                       title=f"{run.name}: input of {layer[0]}", explained=ratios,
                       class_names=run.data.class_names)
    write_json(run.path / EVAL_DIR / "representation.json", representation)
    plot_confusion(counts, run.path / "plots" / "confusion.png", title=run.name,
                   class_names=run.data.class_names)
    plot_local_layer(model, run.data.input_shape, run.path / "plots", run.name)

    efficiency = {"parameters": parameter_counts(model),
                  "flops_per_sample": forward_flops(model, test.x[:64]),
                  "wall_time_s": run.summary.get("wall_time_s"),
                  "phases": run.summary.get("phases", [])}
    write_json(run.path / EVAL_DIR / "efficiency.json", efficiency)
    plot_fgsm({run.name: (eps_list, accuracy)}, run.path / "plots" / "fgsm.png")
    return {"fgsm": fgsm, "representation": representation, "efficiency": efficiency}
