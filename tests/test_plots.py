"""Figures: what they show, checked on the matplotlib objects before they are saved."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from bioexp import plots
from bioexp.alignment import layer_roles, measured_layers
from bioexp.registry import build_model


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, plt.Figure]:
    """{file name: figure} of every figure the plot functions save during the test."""
    saved: dict[str, plt.Figure] = {}
    save = plots._save

    def keep(fig: plt.Figure, path: Path) -> None:
        saved[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_layer_roles_name_layers_in_forward_order() -> None:
    mlp = build_model("fa_mlp", (1, 28, 28), 10, hidden=[64, 32])
    roles = layer_roles(mlp)
    assert list(roles) == [name for name, _ in measured_layers(mlp)]
    assert list(roles.values()) == ["hidden 1 (784→64)", "hidden 2 (64→32)", "output (32→10)"]
    cnn = build_model("fa_cnn", (1, 28, 28), 10)
    values = list(layer_roles(cnn).values())
    assert values[:2] == ["conv 1 (1→16)", "conv 2 (16→32)"]  # conv counted apart from hidden
    assert values[2].startswith("hidden 1 (") and values[-1].startswith("output (")
    assert len(values) == 4
    assert layer_roles(build_model("bp_mlp", (1, 28, 28), 10)) == {}  # no feedback layers


def test_alignment_plot_shows_large_angles_and_role_labels(figures, tmp_path: Path) -> None:
    model = build_model("fa_mlp", (1, 28, 28), 10, hidden=[64, 32])
    roles = layer_roles(model)
    rows = [{"phase": "supervised", "epoch": e, **{f"angle/{name}": 30.0 + 60 * i + e
                                                   for i, name in enumerate(roles)}}
            for e in (1, 2, 3)]  # the output layer reaches 153 degrees
    plots.plot_alignment(rows, tmp_path / "alignment.png", labels=roles)
    ax = figures["alignment.png"].axes[0]
    assert 153 < ax.get_ylim()[1] <= 180
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(roles.values())
    assert 90 in [line.get_ydata()[0] for line in ax.lines]  # the reference line is still there
    rows[0][f"angle/{next(iter(roles))}"] = 179.5
    rows[1][f"angle/{next(iter(roles))}"] = float("nan")  # a zero gradient
    plots.plot_alignment(rows, tmp_path / "alignment.png")
    ax = figures["alignment.png"].axes[0]
    assert ax.get_ylim()[1] == 180
    assert [t.get_text() for t in ax.get_legend().get_texts()] == sorted(roles)  # module paths
    small = [{"phase": "supervised", "epoch": 1, "angle/x": 40.0}]
    plots.plot_alignment(small, tmp_path / "alignment.png")
    assert figures["alignment.png"].axes[0].get_ylim()[1] == 100


def test_receptive_fields_show_the_most_used_units_first(figures, tmp_path: Path) -> None:
    usage = torch.tensor([3.0, 9.0, 0.0, 9.0, 5.0])
    assert plots.units_to_show(5, usage, 3).tolist() == [1, 3, 4]  # ties keep index order
    assert plots.units_to_show(5, None, 3).tolist() == [0, 1, 2]
    assert plots.units_to_show(2, None, 3).tolist() == [0, 1]
    weights = torch.zeros(5, 4)
    weights[torch.arange(5), torch.arange(5) % 4] = torch.arange(1.0, 6.0)
    plots.plot_receptive_fields(weights, (1, 2, 2), tmp_path / "rf.png", max_units=2, usage=usage)
    ax = figures["rf.png"].axes[0]
    assert "the 2 most-used of 5 units" in ax.get_title()
    mosaic = ax.images[0].get_array()
    # two 2x2 tiles side by side, a grey column between: unit 1's weight at pixel (0, 1) of
    # the first tile, unit 3's at pixel (1, 1) of the second
    assert mosaic[0, 1] == 1 and mosaic[1, 4] == 1
    plots.plot_receptive_fields(weights, (1, 2, 2), tmp_path / "rf.png", usage=torch.zeros(5))
    assert "the first 5 of 5 units" in figures["rf.png"].axes[0].get_title()  # nobody won yet


def test_colour_receptive_fields_show_every_channel(figures, tmp_path: Path) -> None:
    """(units, 3*H*W) weights of a (3, H, W) input: each tile holds the three channels side by
    side, each channel's own weights (scaled by the unit's largest |weight|)."""
    channels, height, width = 3, 2, 3
    weights = torch.zeros(2, channels, height, width)
    for c in range(channels):
        weights[:, c] = (c + 1) * torch.arange(1.0, 7.0).view(height, width) * (-1) ** c
    weights[1] *= 2.0  # the second unit: the same picture, twice as strong
    plots.plot_receptive_fields(weights.flatten(1), (channels, height, width),
                                tmp_path / "rf.png")
    ax = figures["rf.png"].axes[0]
    assert "(channels side by side)" in ax.get_title()
    mosaic = np.ma.filled(ax.images[0].get_array(), np.nan)
    tile_w = channels * width + channels - 1  # channels side by side, one-pixel gaps
    assert mosaic.shape == (height, 2 * tile_w + 1)  # two units, 2 x 1 grid
    expected = (weights[0] / weights[0].abs().max()).numpy()  # both units scale alike
    for unit in range(2):
        for c in range(channels):
            left = unit * (tile_w + 1) + c * (width + 1)
            np.testing.assert_allclose(mosaic[:, left:left + width], expected[c],
                                       err_msg=f"unit {unit}, channel {c}")
            if c < channels - 1:
                assert np.isnan(mosaic[:, left + width]).all()  # the grey gap


@pytest.mark.parametrize("wins", [[0.0] * 20, [7.0], [0.0, 1.0], [1.0] * 10])
def test_win_counts_copes_with_degenerate_data(figures, tmp_path: Path, wins: list) -> None:
    path = plots.plot_win_counts(torch.tensor(wins), tmp_path / "wins.png")
    assert path.stat().st_size > 0
    dead = sum(w == 0 for w in wins)
    assert f"{dead} of {len(wins)} units never won" in figures["wins.png"].axes[0].get_title()


def test_win_counts_histogram_is_logarithmic(figures, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wins = np.concatenate([rng.integers(0, 50, 1900), rng.integers(1000, 8000, 100)])
    plots.plot_win_counts(torch.tensor(wins), tmp_path / "wins.png")
    ax = figures["wins.png"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == (wins > 0).sum()  # every unit that won is in some bin
    assert len(heights) > 20  # log-spaced bins: the crowd at 1-50 is not one bar


@pytest.mark.parametrize("groups", [3, 12, 25])
def test_comparison_gives_every_group_its_own_colour(figures, tmp_path: Path, groups) -> None:
    assert len(set(plots.group_colors(groups))) == groups
    curves = {f"g{i}": [[(1, 0.5), (2, 0.6 + i / 100)]] * 2 for i in range(groups)}
    finals = {f"g{i}": [0.6 + i / 100] * 2 for i in range(groups)}
    plots.plot_comparison(curves, finals, tmp_path / "compare.png")
    ax_curve, ax_bar = figures["compare.png"].axes
    bar_colors = {p.get_facecolor() for p in ax_bar.patches}
    assert len(bar_colors) == groups
    assert {tuple(line.get_color()) for line in ax_curve.get_lines()} == bar_colors
    ticks = [t.get_text() for t in ax_bar.get_xticklabels()]
    assert ticks[0] == "g0 (n=2)"


def test_accuracy_bars_start_their_axis_near_the_lowest_value(figures, tmp_path: Path) -> None:
    """0.763, 0.794 and 0.810 on an axis from 0 look the same height; the axis starts near the
    lowest (and says so), the error bars kept."""
    finals = {"fa": [0.763, 0.765], "bp": [0.794, 0.790], "krotov": [0.810, 0.812]}
    curves = {name: [[(1, v[0])]] for name, v in finals.items()}
    plots.plot_comparison(curves, finals, tmp_path / "compare.png")
    ax_bar = figures["compare.png"].axes[1]
    bottom, top = ax_bar.get_ylim()
    assert 0.65 <= bottom <= 0.76 and 0.81 < top < 0.9
    assert "axis from 0.7" in ax_bar.get_ylabel()
    assert len(ax_bar.lines) + len(ax_bar.collections) > 0  # the error bars
    plots.plot_comparison(curves, {"t": [120.0], "u": [80.0]}, tmp_path / "time.png",
                          metric="wall_time_s")
    assert figures["time.png"].axes[1].get_ylim()[0] == 0  # not an accuracy: from 0
    rows = [("fa", 0.763, 0.002, False), ("bp", 0.794, 0.003, False), ("bp r", 0.77, None, True)]
    plots.plot_leaderboard(rows, tmp_path / "board.png")
    ax = figures["board.png"].axes[0]
    assert 0.65 <= ax.get_xlim()[0] <= 0.75 and "axis from 0.7" in ax.get_xlabel()
    assert plots.zoomed_range([0.01], [0.05]) == (0.0, 0.1)  # never below 0


def test_confusion_and_embedding_name_the_classes(figures, tmp_path: Path) -> None:
    names = ("T-shirt/top", "Trouser", "Pullover")
    counts = torch.tensor([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    plots.plot_confusion(counts, tmp_path / "confusion.png", class_names=names)
    ax = figures["confusion.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(names)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(names)
    assert ax.get_xticklabels()[0].get_rotation() == 45
    plots.plot_confusion(counts, tmp_path / "confusion.png")  # synthetic data: no names
    assert [t.get_text() for t in figures["confusion.png"].axes[0].get_xticklabels()] == \
        ["0", "1", "2"]
    labels = torch.tensor([2, 0, 2, 1])
    plots.plot_embedding(torch.randn(4, 2), labels, tmp_path / "embedding.png", class_names=names)
    legend = figures["embedding.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(names)
