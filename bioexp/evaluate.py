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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bioexp.models  # noqa: F401  (registers the built-in models)
from bioexp.data import Dataset, Split, load_dataset
from bioexp.errors import ConfigError
from bioexp.records import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    load_checkpoint,
    read_json,
    read_metrics,
    write_json,
)
from bioexp.registry import build_model, parameter_counts
from bioexp.robustness import EVAL_DIR, write_fgsm

DEFAULT_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


@dataclass
class TrainedRun:
    path: Path
    cfg: DictConfig
    model: nn.Module
    data: Dataset
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.cfg.model.name} ({self.path.name})"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of the run's metrics.jsonl, one per evaluation, as the folder holds them."""
        return read_metrics(self.path / METRICS)


def read_weights(path: Path) -> dict[str, Any]:
    """A checkpoint's weights and config. Any bioexp checkpoint has them, including those
    written before the resumable format, so older runs can be evaluated too."""
    checkpoint = load_checkpoint(path, "evaluate")
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise ConfigError(f"{path} is not a bioexp checkpoint (it has no model and config)")
    return checkpoint


def load_run(folder: Path, device: torch.device, test_limit: int | None = None) -> TrainedRun:
    """The trained model of a run folder (its last checkpoint), with the run's test data."""
    from bioexp.config import model_hyperparameters
    from bioexp.train import load_model_state

    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    checkpoint = read_weights(folder / CHECKPOINT)
    cfg = OmegaConf.create(checkpoint["config"])
    if test_limit is not None:
        cfg.data.test_limit = test_limit
    data = load_dataset(cfg.data, cfg.model.input_scale, device)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes,
                        **model_hyperparameters(cfg))
    load_model_state(model, checkpoint["model"], folder, cfg.model.name)
    summary = read_json(folder / SUMMARY) if (folder / SUMMARY).is_file() else {}
    return TrainedRun(folder, cfg, model.to(device).eval(), data, summary)


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
    """The input that `layer` receives for each image of `x`, flattened."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].flatten(1)))
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
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
    from bioexp.plots import plot_confusion, plot_embedding, plot_fgsm
    from bioexp.train import plot_local_layer

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
