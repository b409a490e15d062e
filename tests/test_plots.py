from __future__ import annotations

import math

import numpy as np

from covo.analysis.plots import distance_curve_figure, figure_to_array, save_figure

CURVES = {
    "bin_centers": [0.125, 0.375, 0.625, 0.875],
    "correct_mean": [1.2, 0.9, 0.9, 0.55],
    "correct_count": [1, 2, 1, 2],
    "correct_trajectories": 2,
    "incorrect_mean": [math.nan, 1.5, 1.1, 0.7],
    "incorrect_count": [0, 1, 1, 1],
    "incorrect_trajectories": 1,
}


def test_distance_figure_has_both_curves_and_reference_line():
    ax = distance_curve_figure(CURVES).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["correct (n=2)", "incorrect (n=1)"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [1.0, 1.0]
    assert any("below: closer to own answer" in t.get_text() for t in ax.texts)


def test_figure_to_array_shape_and_content():
    image = figure_to_array(distance_curve_figure(CURVES, figsize=(6.0, 4.0), dpi=50))
    # 6 x 4 inches at 50 dpi -> 300 x 200 pixels
    assert image.shape == (200, 300, 3)
    assert image.dtype == np.uint8
    assert image.min() < image.max()


def test_save_figure_writes_png(tmp_path):
    path = tmp_path / "plots" / "distance.png"
    save_figure(distance_curve_figure(CURVES), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
