"""Figures written into run folders. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

if TYPE_CHECKING:
    import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss and accuracy per supervised epoch (train, validation, test) in two panels."""
    rows = [r for r in rows if r.get("phase") == "supervised" and r.get("epoch", 0) > 0]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            values = [r.get(f"{split}_{metric}") for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", markersize=3, label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return path


def plot_alignment(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Alignment angle per layer and epoch; None when the run logged no angles."""
    rows = [r for r in rows if r.get("phase") == "supervised"]
    keys = sorted({k for r in rows for k in r if k.startswith("angle/")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3,
                label=key.removeprefix("angle/"))
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="angle to the backprop update (degrees)", ylim=(0, 100),
           title=title or "alignment with backprop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return path


def plot_receptive_fields(weights: torch.Tensor, input_shape: Sequence[int], path: Path,
                          title: str = "", max_units: int = 100) -> Path | None:
    """Each unit's input weights as an image, in a grid, with a diverging colour map.

    `weights` is (units, inputs) with inputs = prod(input_shape) = C x H x W; None otherwise.
    Every unit is scaled by its own largest |weight|, so white is zero and full red or blue is
    the unit's strongest positive or negative weight. Colour images show their C channels side
    by side.
    """
    channels, height, width = input_shape
    if weights.dim() != 2 or weights.shape[1] != channels * height * width:
        return None
    w = weights[:max_units].detach().float().cpu()
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    n = len(w)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w = channels * width + channels - 1  # channels side by side, one-pixel gaps
    mosaic = np.full((rows * (height + 1) - 1, cols * (tile_w + 1) - 1), np.nan)
    for i, unit in enumerate(w.reshape(n, channels, height, width).numpy()):
        top, left = (i // cols) * (height + 1), (i % cols) * (tile_w + 1)
        for c in range(channels):
            x0 = left + c * (width + 1)
            mosaic[top:top + height, x0:x0 + width] = unit[c]
    fig, ax = plt.subplots(figsize=(min(2 + cols * 0.9 * channels, 20), 1 + rows * 0.9))
    cmap = plt.get_cmap("bwr").with_extremes(bad="lightgrey")  # grey between tiles
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, fraction=0.03, label="weight / max |weight| of the unit")
    heading = f"receptive fields of {n} of {len(weights)} units"
    heading += " (channels side by side)" if channels > 1 else ""
    ax.set_title(f"{title}\n{heading}" if title else heading)
    _save(fig, path)
    return path


def plot_win_counts(wins: torch.Tensor, path: Path, title: str = "") -> Path:
    """Histogram of how many training samples each hidden unit won; dead units sit at zero."""
    counts = wins.detach().float().cpu().numpy()
    dead = int((counts == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(counts, bins=50, color="tab:blue")
    ax.set(xlabel="samples won by the unit (all phase-1 epochs)", ylabel="hidden units",
           title=(f"{title}\n" if title else "") + f"{dead} of {len(counts)} units never won")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def plot_comparison(curves: dict[str, list[list[tuple[int, float]]]],
                    finals: dict[str, list[float]], path: Path, metric: str = "test_acc",
                    title: str = "") -> Path:
    """Two panels: each group's learning curve (mean over its runs, shaded +- one standard
    deviation where it has several), and a bar per group of its final `metric` (mean, with the
    standard deviation as an error bar and the number of completed runs under the bar)."""
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(13, 4.8),
                                           gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10")
    for i, (label, runs) in enumerate(curves.items()):
        by_epoch: dict[int, list[float]] = {}
        for curve in runs:
            for epoch, value in curve:
                by_epoch.setdefault(epoch, []).append(value)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = np.array([np.mean(by_epoch[e]) for e in epochs])
        std = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0
                        for e in epochs])
        ax_curve.plot(epochs, mean, marker="o", markersize=3, color=colors(i % 10),
                      label=f"{label} (n={len(runs)})")
        ax_curve.fill_between(epochs, mean - std, mean + std, color=colors(i % 10), alpha=0.2)
    ax_curve.set(xlabel="supervised epoch", ylabel=metric,
                 title=f"{metric} per epoch (mean; shaded: one standard deviation)")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.grid(alpha=0.3)
    if ax_curve.lines:
        ax_curve.legend(fontsize="small")

    labels = list(finals)
    means = [float(np.mean(v)) if v else 0.0 for v in finals.values()]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in finals.values()]
    bars = ax_bar.bar(range(len(labels)), means, yerr=stds, capsize=4,
                      color=[colors(i % 10) for i in range(len(labels))])
    for bar, values, std in zip(bars, finals.values(), stds, strict=True):
        text = f"{np.mean(values):.3f}\nn={len(values)}" if values else "no completed run"
        ax_bar.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + std),
                        ha="center", va="bottom", fontsize="small", xytext=(0, 2),
                        textcoords="offset points")
    ax_bar.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0,
                      ha="right" if len(labels) > 3 else "center", fontsize="small")
    top = max((m + s for m, s in zip(means, stds, strict=True)), default=0.0) * 1.2 or 1.0
    ax_bar.set(ylabel=f"final {metric}", title=f"final {metric} per group",
               ylim=(0, min(top, 1.1) if metric.endswith("acc") else top))
    ax_bar.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return path


def plot_fgsm(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path,
              title: str = "") -> Path:
    """Test accuracy against the FGSM strength, one line per run."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (eps, accuracy) in curves.items():
        ax.plot(eps, accuracy, marker="o", markersize=4, label=label)
    ax.set(xlabel="FGSM epsilon (fraction of the pixel range)", ylabel="test accuracy",
           ylim=(0, 1), title=title or "accuracy under FGSM attack")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return path


def plot_embedding(coords: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "",
                   explained: Sequence[float] = ()) -> Path:
    """Points on two principal components, coloured by class."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    points, classes = coords.numpy(), labels.numpy()
    cmap = plt.get_cmap("tab10")
    for c in np.unique(classes):
        mine = classes == c
        ax.scatter(points[mine, 0], points[mine, 1], s=4, alpha=0.6, color=cmap(int(c) % 10),
                   label=str(c))
    axes = [f"PC{i + 1}" + (f" ({explained[i]:.0%} of variance)" if i < len(explained) else "")
            for i in range(2)]
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title or "last hidden layer (PCA)")
    ax.legend(title="class", fontsize="small", markerscale=3, loc="best")
    _save(fig, path)
    return path


def plot_confusion(counts: torch.Tensor, path: Path, title: str = "") -> Path:
    """Rows: true class; columns: predicted class; colour: fraction of the row."""
    counts = counts.numpy()
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(counts)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 0.8 + 0.5 * n))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="x-small",
                    color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", xticks=range(n), yticks=range(n),
           title=(f"{title}\n" if title else "") + "confusion matrix (test set)")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    _save(fig, path)
    return path
