"""Figures written into run folders. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
