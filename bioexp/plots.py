"""Figures written into run folders. Each is a bare `matplotlib.figure.Figure`, saved and
dropped: no pyplot, so no display is needed and the caller's backend (a notebook's inline
figures) is left as it was."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator

if TYPE_CHECKING:
    import torch


def _subplots(*grid: int, gridspec_kw: dict | None = None, squeeze: bool = True,
              **figure_kw: Any) -> tuple[Figure, Any]:
    """A new figure outside pyplot and its axes, as pyplot's `subplots(*grid, ...)` gives."""
    fig = Figure(**figure_kw)
    return fig, fig.subplots(*grid, gridspec_kw=gridspec_kw, squeeze=squeeze)


def _save(fig: Figure, path: Path, top: float = 0.0) -> None:
    """Lay out and write the figure; `top` inches are kept free above the axes (a suptitle of
    several lines, which tight_layout does not make room for)."""
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()) if top else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss and accuracy per supervised epoch (train, validation, test) in two panels."""
    rows = [r for r in rows if r.get("phase") == "supervised" and r.get("epoch", 0) > 0]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = _subplots(1, 2, figsize=(10, 4))
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


def plot_alignment(rows: list[dict], path: Path, title: str = "",
                   labels: dict[str, str] | None = None) -> Path | None:
    """Alignment angle per layer and epoch; None when the run logged no angles.

    `labels` maps a layer's module name (its metric key without "angle/") to a legend label,
    e.g. `layer_roles(model)`; its layers come first, in its order, any others by name. The y
    axis shows 0 to 100 degrees, more when a larger angle occurred (at most 180).
    """
    rows = [r for r in rows if r.get("phase") == "supervised"]
    labels = labels or {}
    rank = {name: i for i, name in enumerate(labels)}
    keys = sorted({k for r in rows for k in r if k.startswith("angle/")},
                  key=lambda k: (rank.get(k.removeprefix("angle/"), len(rank)), k))
    if not keys:
        return None
    fig, ax = _subplots(figsize=(6, 4))
    largest = 0.0
    for key in keys:
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        largest = max([largest, *(v for _, v in points if math.isfinite(v))])
        name = key.removeprefix("angle/")
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=labels.get(name, name))
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="angle to the backprop update (degrees)",
           ylim=(0, min(180, max(100, largest + 5))), title=title or "alignment with backprop")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return path


def units_to_show(units: int, usage: torch.Tensor | None, max_units: int) -> np.ndarray:
    """Indices of the units to draw: the `max_units` most-used (most first, ties in index
    order) when `usage` (units,) is given, else the first `max_units`."""
    if usage is None:
        return np.arange(min(units, max_units))
    return np.argsort(-usage.detach().double().cpu().numpy(), kind="stable")[:max_units]


def plot_receptive_fields(weights: torch.Tensor, input_shape: Sequence[int], path: Path,
                          title: str = "", max_units: int = 100,
                          usage: torch.Tensor | None = None) -> Path | None:
    """Each unit's input weights as an image, in a grid, with a diverging colour map.

    `weights` is (units, inputs) with inputs = prod(input_shape) = C x H x W; None otherwise.
    With `usage` (units,), e.g. how many samples each unit won, the most-used units are drawn,
    most-used first; without it (or when no unit was used yet), the first units. Every unit is
    scaled by its own largest |weight|, so white is zero and full red or blue is the unit's
    strongest positive or negative weight. Colour images show their C channels side by side.
    """
    channels, height, width = input_shape
    if weights.dim() != 2 or weights.shape[1] != channels * height * width:
        return None
    if usage is not None and (usage.shape != weights.shape[:1] or not usage.sum() > 0):
        usage = None
    w = weights.detach().float().cpu().numpy()[units_to_show(len(weights), usage, max_units)]
    w = w / np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12)
    n = len(w)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w = channels * width + channels - 1  # channels side by side, one-pixel gaps
    mosaic = np.full((rows * (height + 1) - 1, cols * (tile_w + 1) - 1), np.nan)
    for i, unit in enumerate(w.reshape(n, channels, height, width)):
        top, left = (i // cols) * (height + 1), (i % cols) * (tile_w + 1)
        for c in range(channels):
            x0 = left + c * (width + 1)
            mosaic[top:top + height, x0:x0 + width] = unit[c]
    fig, ax = _subplots(figsize=(min(2 + cols * 0.9 * channels, 20), 1 + rows * 0.9))
    cmap = colormaps["bwr"].with_extremes(bad="lightgrey")  # grey between tiles
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, fraction=0.03, label="weight / max |weight| of the unit")
    if usage is None:
        heading = f"receptive fields of the first {n} of {len(weights)} units"
    else:
        heading = (f"receptive fields of the {n} most-used of {len(weights)} units "
                   "(most-used first, row by row)")
    heading += " (channels side by side)" if channels > 1 else ""
    ax.set_title(f"{title}\n{heading}" if title else heading)
    _save(fig, path)
    return path


def plot_win_counts(wins: torch.Tensor, path: Path, title: str = "") -> Path:
    """Histogram of how many training samples each hidden unit won, on log scales: most units
    win a few samples, a few win thousands. Units that never won do not fit a log axis; the
    title counts them, and says what share of the samples the busiest 1% of the units won."""
    counts = wins.detach().double().cpu().numpy()
    won = counts[counts > 0]
    heading = f"{len(counts) - len(won)} of {len(counts)} units never won"
    fig, ax = _subplots(figsize=(6.5, 4))
    if len(won):
        # log-spaced bins whose edges sit between whole numbers: one bin per count at the low end
        edges = np.unique(np.round(np.geomspace(1, won.max() + 1, 41))) - 0.5
        ax.hist(won, bins=edges, color="tab:blue", log=True)
        ax.set_xscale("log")
        busiest = max(1, len(counts) // 100)
        share = np.sort(won)[::-1][:busiest].sum() / won.sum()
        heading += f"; the busiest {busiest} won {share:.0%} of the samples"
    else:
        ax.text(0.5, 0.5, "no unit won any sample", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="samples won by the unit (all phase-1 epochs)",
           ylabel="hidden units", title=(f"{title}\n" if title else "") + heading)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def draw_plots(run_dir: Path, rows: list[dict], title: str, model: torch.nn.Module | None = None,
               input_shape: tuple[int, ...] | None = None) -> None:
    """A run's figures from what it got to: curves and alignment from its metrics rows, the
    local layer's receptive fields and win counts from its model (once it was built)."""
    from bioexp.alignment import layer_roles  # here: importing plots needs no torch

    if rows:
        plot_curves(rows, run_dir / "plots" / "curves.png", title=title)
        plot_alignment(rows, run_dir / "plots" / "alignment.png", title=title,
                       labels=layer_roles(model) if model is not None else None)
    if model is not None:
        plot_local_layer(model, input_shape, run_dir / "plots", title)


def plot_local_layer(model: torch.nn.Module, input_shape: tuple[int, ...], folder: Path,
                     title: str) -> None:
    """plots/receptive_fields.png (when the first local-rule layer sees the image itself; its
    most-used units when it counts wins) and plots/win_counts.png (when it has competing units),
    unless its weights are not finite."""
    from bioexp.engine import local_layers  # here: importing plots needs no torch

    layers = local_layers(model)
    if not layers:
        return
    weights, wins = layers[0].receptive_fields(), layers[0].unit_usage()
    if hasattr(layers[0], "field_shape"):  # a convolution: one unit sees a patch
        input_shape = layers[0].field_shape()
    if weights is not None and weights.isfinite().all():
        plot_receptive_fields(weights, input_shape, folder / "receptive_fields.png", title,
                              usage=wins)
    if wins is not None and wins.sum() > 0:
        plot_win_counts(wins, folder / "win_counts.png", title)


def group_colors(n: int) -> list[tuple[float, float, float, float]]:
    """`n` distinct colours: tab10 up to 10; tab20 up to 20 (its ten strong colours first,
    then their light partners); beyond, evenly spaced along the continuous turbo map."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
    return [tuple(c) for c in colormaps["turbo"](np.linspace(0.03, 0.97, n))]


MARKERS = ("o", "s", "^", "D", "v")  # with more than 10 groups, neighbours differ in marker too


def plot_comparison(curves: dict[str, list[list[tuple[int, float]]]],
                    finals: dict[str, list[float]], path: Path, metric: str = "test_acc",
                    title: str = "") -> Path:
    """Two panels: each group's learning curve (mean over its runs, shaded +- one standard
    deviation where it has several), and a bar per group of its final `metric` (mean, with the
    standard deviation as an error bar; the number of completed runs is in the bar's label).
    Each group has its own colour; with many groups the figure widens and the values stand
    vertically above the bars."""
    labels = list(finals)
    groups = [*labels, *(k for k in curves if k not in finals)]
    colors = dict(zip(groups, group_colors(len(groups)), strict=True))
    many = len(groups) > 10
    bar_width = max(5.2, 1.5 + 0.4 * len(labels))
    legend_rows = math.ceil(len(groups) / 3) if many else 0  # a long legend goes below the curves
    fig, (ax_curve, ax_bar) = _subplots(1, 2, figsize=(min(7.8 + bar_width, 30),
                                                          4.8 + 0.16 * legend_rows),
                                           gridspec_kw={"width_ratios": [7.8, bar_width]})
    _curve_panel(ax_curve, curves, colors, metric, many)
    _bar_panel(ax_bar, finals, colors, metric, many)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return path


def _curve_panel(ax: Axes, curves: dict[str, list[list[tuple[int, float]]]],
                 colors: dict[str, tuple], metric: str, many: bool) -> None:
    """Each group's mean curve over its runs, shaded one standard deviation either side."""
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
        ax.plot(epochs, mean, marker=MARKERS[i % len(MARKERS)] if many else "o",
                markersize=3, color=colors[label], label=f"{label} (n={len(runs)})")
        ax.fill_between(epochs, mean - std, mean + std, color=colors[label], alpha=0.2)
    ax.set(xlabel="supervised epoch", ylabel=metric,
           title=f"{metric} per epoch (mean; shaded: one standard deviation)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines and many:
        ax.legend(fontsize="x-small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    elif ax.lines:
        ax.legend(fontsize="small")


def _bar_panel(ax: Axes, finals: dict[str, list[float]], colors: dict[str, tuple],
               metric: str, many: bool) -> None:
    """A bar per group: the mean final metric, its standard deviation, its run count."""
    labels = list(finals)
    means = [float(np.mean(v)) if v else 0.0 for v in finals.values()]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in finals.values()]
    bars = ax.bar(range(len(labels)), means, yerr=stds, capsize=4 if len(labels) < 20 else 2,
                  color=[colors[label] for label in labels])
    vertical = len(labels) > 6
    for bar, values, std in zip(bars, finals.values(), stds, strict=True):
        text = f"{np.mean(values):.3f}" if values else "no completed run"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + std),
                    ha="center", va="bottom", fontsize="x-small" if vertical else "small",
                    rotation=90 if vertical else 0, xytext=(0, 2), textcoords="offset points")
    ticks = [f"{label} (n={len(v)})" for label, v in finals.items()]
    slanted = len(labels) * max(map(len, ticks), default=0) > 60  # would not fit side by side
    ax.set_xticks(range(len(labels)), ticks, rotation=30 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor",
                  fontsize="x-small" if many else "small")
    measured = [(m - s, m + s) for m, s, v in zip(means, stds, finals.values(), strict=True) if v]
    if metric.endswith("acc") and measured:
        bottom, top = zoomed_range([lo for lo, _ in measured], [hi for _, hi in measured])
        top += 0.15 * (top - bottom)  # room for the values above the bars
        label = f"final {metric} (axis from {bottom:g})" if bottom > 0 else f"final {metric}"
    else:
        bottom, top, label = 0.0, max((hi for _, hi in measured), default=0.0) * 1.2 or 1.0, \
            f"final {metric}"
    ax.set(ylabel=label, title=f"final {metric} per group", ylim=(bottom, top))
    ax.grid(alpha=0.3, axis="y")


def zoomed_range(lows: Sequence[float], highs: Sequence[float],
                 limit: float = 1.0) -> tuple[float, float]:
    """An axis from a little below the lowest value to a little above the highest, on a 0.05
    grid within [0, limit], so that bars of 0.763 and 0.810 differ visibly (from 0 they look
    alike); the axis's label must then say where it starts."""
    if not lows:
        return 0.0, limit
    low, high = min(lows), max(highs)
    margin = max(0.1 * (high - low), 0.02)
    return (max(0.0, math.floor((low - margin) * 20) / 20),
            min(limit, math.ceil((high + margin) * 20) / 20))


def plot_fgsm(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path,
              title: str = "") -> Path:
    """Test accuracy against the FGSM strength, one line per run."""
    fig, ax = _subplots(figsize=(6.5, 4.5))
    for label, (eps, accuracy) in curves.items():
        ax.plot(eps, accuracy, marker="o", markersize=4, label=label)
    ax.set(xlabel="FGSM epsilon (fraction of the pixel range)", ylabel="test accuracy",
           ylim=(0, 1), title=title or "accuracy under FGSM attack")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return path


def _class_name(c: int, class_names: Sequence[str]) -> str:
    """Class `c` by its name in `class_names`, else by its index."""
    return class_names[c] if 0 <= c < len(class_names) else str(c)


def plot_embedding(coords: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "",
                   explained: Sequence[float] = (), class_names: Sequence[str] = ()) -> Path:
    """Points on two principal components, coloured by class; the legend names each class by
    `class_names` (indexed by class) when given, else by its index."""
    fig, ax = _subplots(figsize=(6.5, 5.5))
    points, classes = coords.numpy(), labels.numpy()
    colors = group_colors(max(int(classes.max(initial=0)) + 1, len(class_names)))
    for c in np.unique(classes):
        mine = classes == c
        ax.scatter(points[mine, 0], points[mine, 1], s=4, alpha=0.6, color=colors[c],
                   label=_class_name(int(c), class_names))
    axes = [f"PC{i + 1}" + (f" ({explained[i]:.0%} of variance)" if i < len(explained) else "")
            for i in range(2)]
    ax.set(xlabel=axes[0], ylabel=axes[1], title=title or "last hidden layer (PCA)")
    ax.legend(title="class", fontsize="small", markerscale=3, loc="best")
    _save(fig, path)
    return path


def plot_confusion(counts: torch.Tensor, path: Path, title: str = "",
                   class_names: Sequence[str] = ()) -> Path:
    """Rows: true class; columns: predicted class; colour: fraction of the row. Classes are
    named by `class_names` when it has one name per class, else by their index."""
    counts = counts.numpy()
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(counts)
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    long = max(map(len, names), default=0) > 2
    fig, ax = _subplots(figsize=(1.2 + 0.55 * n + (1.0 if long else 0),
                                    0.8 + 0.5 * n + (0.8 if long else 0)))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="x-small",
                    color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class",
           title=(f"{title}\n" if title else "") + "confusion matrix (test set)")
    ax.set_xticks(range(n), names, rotation=45 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    _save(fig, path)
    return path


def plot_leaderboard(rows: Sequence[tuple[str, float, float | None, bool]], path: Path,
                     title: str = "") -> Path:
    """One horizontal bar per (label, mean, std, is_control), best at the top: mean test
    accuracy with its standard deviation as an error bar and the value beside it; random-feature
    controls hatched in grey, so that each family can be read against its own."""
    rows = sorted(rows, key=lambda row: row[1])
    fig, ax = _subplots(figsize=(7.5, 0.9 + 0.32 * len(rows)))
    y = np.arange(len(rows))
    colors = ["0.75" if control else "tab:blue" for *_, control in rows]
    ax.barh(y, [row[1] for row in rows], xerr=[row[2] or 0.0 for row in rows], color=colors,
            hatch=None, capsize=2, edgecolor="0.3", linewidth=0.5)
    for bar, (*_, control) in zip(ax.patches, rows, strict=True):
        if control:
            bar.set_hatch("///")
    left, right = zoomed_range([row[1] - (row[2] or 0.0) for row in rows],
                               [row[1] + (row[2] or 0.0) for row in rows])
    room = 0.12 * (right - left)  # for the values beside the bars
    for i, (_, mean, std, _) in enumerate(rows):
        ax.text(mean + (std or 0.0) + 0.15 * room, i, f"{mean:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, [row[0] for row in rows], fontsize=8)
    ax.set_xlim(left, right + room)
    start = f" (axis from {left:g})" if left > 0 else ""
    ax.set_xlabel(f"test accuracy, mean over seeds{start}\n"
                  "grey, hatched: random-feature controls")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return path


CONTROL_STYLES = {"random_features": "--", "gaussian_features": ":"}  # others: dash-dot
Curves = dict[tuple[str, str | None], Sequence[tuple[int | None, float, float | None]]]


def _families_best_first(curves: Curves, where: Callable[[int | None], float]) -> list[str]:
    """The models of `curves`, best first by the trained model's mean at the largest budget (a
    model without a trained curve: by its best control's)."""

    def last(points) -> float:
        return max(points, key=lambda p: where(p[0]))[1] if points else 0.0

    def score(model: str) -> float:
        if (model, None) in curves:
            return last(curves[model, None])
        return max(last(points) for (m, _), points in curves.items() if m == model)

    return sorted(dict.fromkeys(model for model, _ in curves), key=lambda m: -score(m))


def _accuracy_range(ax, lows: list[float], highs: list[float], chance: float | None) -> float:
    """Set the y range: zoomed to the values, or from 0 with a line at chance when an error bar
    reaches below 1.5 times it; returns the bottom."""
    if chance is not None and any(m < 1.5 * chance for m in lows):
        bottom, top = 0.0, zoomed_range(lows, highs)[1]
        ax.axhline(chance, color="0.5", linewidth=1, linestyle=(0, (1, 3)))
        ax.annotate("chance", (0.01, chance), xycoords=("axes fraction", "data"),
                    xytext=(0, 2), textcoords="offset points", fontsize=8, color="0.4")
    else:
        bottom, top = zoomed_range(lows, highs)
    ax.set_ylim(bottom, top)
    return bottom


def _curve_legends(ax, colors: dict[str, Any], controls: Sequence[str]) -> None:
    """Two legends right of the axes: the families' colours, and the line styles."""
    families = [Line2D([], [], color=color, linewidth=2.5, label=m) for m, color in colors.items()]
    kinds = [Line2D([], [], color="0.2", marker="o", label="trained model"),
             *(Line2D([], [], color="0.2", marker="s", markersize=3.5, markerfacecolor="white",
                      linestyle=CONTROL_STYLES.get(c, "-."), label=f"control: {c}")
               for c in controls)]
    first = ax.legend(handles=families, title="family (best first)", fontsize=8,
                      loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.add_artist(first)
    ax.legend(handles=kinds, title="line", fontsize=8, loc="lower left",
              bbox_to_anchor=(1.02, 0.0), borderaxespad=0)


def plot_label_curves(curves: Curves, path: Path, title: str = "",
                      chance: float | None = None, all_at: float | None = None) -> Path:
    """Mean test accuracy against labelled training images per class, on a log axis.

    `curves` maps (model, control or None) to its points (labels per class, None for every
    label; mean; standard deviation over the seeds, drawn as an error bar). One colour per
    model; the trained model solid with markers, its controls in the same colour, dashed
    (`random_features`) or dotted (`gaussian_features`). "Every label" sits at `all_at` (6 times
    the largest budget unless given), its tick labelled "all". Points of different lines are
    nudged sideways a little so their error bars do not hide each other. The y axis is zoomed to
    the values (`zoomed_range`), unless a point's error bar reaches below 1.5 times `chance`:
    then it starts at 0 and a grey line marks chance. Families are listed (and coloured) best
    first, by the trained model's mean at the largest budget."""
    budgets = sorted({b for points in curves.values() for b, *_ in points if b is not None})
    all_at = all_at or 6.0 * (budgets[-1] if budgets else 1.0)

    def where(budget: int | None) -> float:
        return float(budget) if budget is not None else all_at

    models = _families_best_first(curves, where)
    colors = dict(zip(models, group_colors(len(models)), strict=True))
    keys = sorted(curves, key=lambda k: (models.index(k[0]), k[1] is not None, str(k[1])))
    step = min(0.012, 0.12 / max(len(keys), 1))  # decades between neighbouring lines
    fig, ax = _subplots(figsize=(9.5, 5.2))
    lows, highs = [], []
    for i, (model, control) in enumerate(keys):
        points = sorted(curves[model, control], key=lambda p: where(p[0]))
        nudge = 10 ** ((i - (len(keys) - 1) / 2) * step)
        mean, std = [m for _, m, _ in points], [s or 0.0 for *_, s in points]
        lows += [m - s for m, s in zip(mean, std, strict=True)]
        highs += [m + s for m, s in zip(mean, std, strict=True)]
        if control is None:
            style = dict(linestyle="-", marker="o", markersize=5, linewidth=1.8, zorder=3)
        else:
            style = dict(linestyle=CONTROL_STYLES.get(control, "-."), marker="s", markersize=3.5,
                         markerfacecolor="white", linewidth=1.5, alpha=0.9)
        ax.errorbar([where(b) * nudge for b, *_ in points], mean, yerr=std, color=colors[model],
                    capsize=3, elinewidth=1, **style)
    bottom = _accuracy_range(ax, lows, highs, chance)
    every = any(b is None for points in curves.values() for b, *_ in points)
    ticks = [*budgets, *([all_at] if every else [])]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [*(f"{b:,}" for b in budgets), *(["all"] if every else [])])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
    start = f" (axis from {bottom:g})" if bottom > 0 else ""
    ax.set(xlabel="labelled training images per class (log scale; all: every label)",
           ylabel=f"test accuracy, mean over seeds{start}",
           title=title or "test accuracy against labels per class")
    ax.grid(alpha=0.3)
    known = list(CONTROL_STYLES)
    _curve_legends(ax, colors, sorted({c for _, c in keys if c is not None},
                                      key=lambda c: (known.index(c) if c in known
                                                     else len(known), c)))
    ax.annotate("error bars: standard deviation over the seeds", (0, 0),
                xycoords="axes fraction", xytext=(0, -38), textcoords="offset points",
                fontsize=7, color="0.4", va="top")
    _save(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# Attribution maps (`bioexp explain`)

ATTRIBUTION_CMAP = "RdBu_r"  # diverging: red for evidence for the target, blue against, white 0


def _show_image(ax: Axes, image: torch.Tensor) -> None:
    """One image (C, H, W): grey for one channel, colour for three, stretched to its range."""
    pixels = image.float().numpy()
    pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-12)
    ax.imshow(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0), cmap="gray",
              vmin=0, vmax=1)
    ax.set_axis_off()


def _show_map(ax: Axes, heat: torch.Tensor) -> Any:
    """One map (H, W) on the diverging colour map, centred at 0, scaled to its own largest
    magnitude (maps of different methods and models differ in scale)."""
    values = heat.float().numpy()
    limit = max(float(np.abs(values).max()), 1e-12)
    ax.set_axis_off()
    return ax.imshow(values, cmap=ATTRIBUTION_CMAP, vmin=-limit, vmax=limit)


def plot_attributions(images: torch.Tensor, maps: dict[str, torch.Tensor],
                      predicted: torch.Tensor, labels: torch.Tensor, path: Path,
                      title: str = "", class_names: Sequence[str] = (),
                      per_row: int = 4) -> Path:
    """Each image (N, C, H, W) with each method's map (N, H, W) beside it, `per_row` images
    to a row of the figure; each image is titled with its predicted and true class."""
    n, cols = len(images), 1 + len(maps)
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    fig, axes = _subplots(rows, per_row * cols, squeeze=False,
                          figsize=(per_row * cols * 1.05, 0.6 + rows * 1.25))
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        row, first = divmod(i, per_row)
        block = axes[row, first * cols:(first + 1) * cols]
        _show_image(block[0], images[i])
        p, t = int(predicted[i]), int(labels[i])
        block[0].set_title(f"{_class_name(p, class_names)}\n(true {_class_name(t, class_names)})",
                           fontsize=6, color="black" if p == t else "red")
        for ax, (method, heat) in zip(block[1:], maps.items(), strict=True):
            _show_map(ax, heat[i])
            if row == 0:
                ax.set_title(method, fontsize=7)
    fig.suptitle((f"{title}\n" if title else "") + "attribution: red for the target class, "
                 "blue against (each map on its own scale); red titles: misclassified",
                 fontsize=8)
    _save(fig, path, top=0.45)
    return path


def plot_attribution_classes(maps: dict[str, torch.Tensor], labels: torch.Tensor, path: Path,
                             title: str = "", class_names: Sequence[str] = ()) -> Path:
    """The mean map of each true class, a row per method, each row on one colour scale."""
    classes = sorted(set(labels.tolist()))
    fig, axes = _subplots(len(maps), len(classes), squeeze=False,
                          figsize=(0.6 + 1.1 * len(classes), 0.6 + 1.25 * len(maps)))
    for r, (method, heat) in enumerate(maps.items()):
        means = [heat[labels == c].float().mean(dim=0) for c in classes]
        limit = max(max(float(m.abs().max()) for m in means), 1e-12)
        for ax, c, mean in zip(axes[r], classes, means, strict=True):
            ax.imshow(mean.numpy(), cmap=ATTRIBUTION_CMAP, vmin=-limit, vmax=limit)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_class_name(c, class_names), fontsize=7)
        axes[r, 0].set_ylabel(method, fontsize=8)
    fig.suptitle((f"{title}\n" if title else "") + "mean attribution per true class",
                 fontsize=8)
    _save(fig, path, top=0.35)
    return path


def plot_attribution_runs(runs: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor],
                                                torch.Tensor]],
                          images: torch.Tensor, labels: torch.Tensor, path: Path,
                          class_names: Sequence[str] = (), shown: int = 10) -> Path:
    """Several runs over the same images: the first `shown` images on top, then a row per run
    and method (`runs` maps a run's name to its (images, maps, predicted); the images are the
    runs' own, the same ones where the runs share a test set)."""
    n = min(shown, len(images))
    rows = [(name, method, heat, predicted) for name, (_, maps, predicted) in runs.items()
            for method, heat in maps.items()]
    fig, axes = _subplots(1 + len(rows), n, squeeze=False,
                          figsize=(2.6 + 1.05 * n, 0.5 + 1.15 * (1 + len(rows))))
    for j in range(n):
        _show_image(axes[0, j], images[j])
        axes[0, j].set_title(_class_name(int(labels[j]), class_names), fontsize=7)
    axes[0, 0].text(-0.15, 0.5, "image (true class)", transform=axes[0, 0].transAxes,
                    ha="right", va="center", fontsize=7)
    for r, (name, method, heat, predicted) in enumerate(rows, start=1):
        for j in range(n):
            _show_map(axes[r, j], heat[j])
            if int(predicted[j]) != int(labels[j]):
                axes[r, j].set_title(f"says {_class_name(int(predicted[j]), class_names)}",
                                     fontsize=6, color="red")
        axes[r, 0].text(-0.15, 0.5, f"{name}\n{method}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    fig.suptitle("attribution maps, a row per run and method (red: for the target class, "
                 "blue: against; red titles: misclassified)", fontsize=8)
    _save(fig, path, top=0.25)
    return path
