"""The report's pictures: beta curves stay inside the metric's range, strip labels stay readable."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipa_lib.analysis.plots import clip_ylim, plot_beta_curves
from ipa_lib.analysis.stats import Row, Stat
from ipa_lib.data.visualize import LABEL_MIN_PX, side_by_side


def test_clip_ylim_keeps_the_axis_inside_the_metric_range():
    assert clip_ylim((-0.3, 1.5), 0.0, 1.0) == pytest.approx((-0.03, 1.03))
    assert clip_ylim((0.2, 0.6), 0.0, 1.0) == (0.2, 0.6)  # inside: untouched
    assert clip_ylim((-5.0, 30.0), 0.0, math.inf) == pytest.approx((-1.05, 30.0))  # open above: pad of the axis


def _row(method, beta, mean, lo, hi):
    return Row(1, method, beta, None, [0, 1], {"hand_pass_rate": Stat(mean, lo, hi, 2, "t over 2 seeds")}, {})


def test_beta_plot_clips_intervals_to_the_metric_range(tmp_path, monkeypatch):
    """Wide t intervals of a rate near 0 and 1 (what made the README plot run from -0.3 to 1.5)."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    rows = [_row("ipa-hand", 200.0, 0.95, 0.4, 1.5), _row("ipa-hand", 600.0, 0.05, -0.3, 0.6),
            _row("dpo", 600.0, 0.5, math.nan, math.nan), _row("base", None, 0.9, 0.2, 1.6)]
    (path,) = plot_beta_curves(rows, tmp_path, metrics=["hand_pass_rate"])
    assert path.stat().st_size > 0
    ax = figures[0].axes[0]
    lo, hi = ax.get_ylim()
    assert -0.031 <= lo <= 0.0 and 1.0 <= hi <= 1.031
    bars = [np.asarray(seg)[:, 1] for coll in ax.collections if hasattr(coll, "get_segments") for seg in coll.get_segments()]
    bars = [ys for ys in bars if np.ptp(ys) > 0]  # the NaN interval draws a zero-length bar
    assert sorted(tuple(ys) for ys in bars) == [(0.0, 0.6), (0.4, 1.0)]
    spans = [(p.get_y(), p.get_y() + p.get_height()) for p in ax.patches]  # axhspan: the base's interval
    assert spans == [pytest.approx((0.2, 1.0))]


def _columns(names, h=32, w=32, f=5, n=2):
    rng = np.random.default_rng(0)
    return {name: rng.integers(0, 255, (n, f, h, w, 3), dtype=np.uint8) for name in names}


def _label_rows(png, strips_h):
    """Rows of the label band (above the strips) that hold dark pixels: the text's height."""
    from PIL import Image

    a = np.asarray(Image.open(png).convert("L"))
    band = a[: a.shape[0] - strips_h]
    return np.flatnonzero((band < 128).any(axis=1))


def test_side_by_side_labels_scale_with_the_sheet(tmp_path):
    names = ["driving pose", "base", "IPA", "ground truth"]
    png, gif = side_by_side(tmp_path / "big", _columns(names, n=6), scale=4)  # the README's sheet: 2592 px wide
    assert gif.stat().st_size > 0
    rows = _label_rows(png, 6 * (32 + 2) * 4)
    text_h = rows.max() - rows.min() + 1
    assert text_h >= 2592 / 60 * 0.6  # readable at ~880 px page width: >= ~9 px there
    # the report's clip grid (seven columns, scale 2): smaller labels, each inside its column
    names7 = ["driving pose", "start (ipa-hand r1)", "sft", "ipa-global b600", "ipa-hand b600", "dpo b600", "ground truth"]
    png7, _ = side_by_side(tmp_path / "grid", _columns(names7), scale=2)
    strips_h = 2 * (32 + 2) * 2
    rows7 = _label_rows(png7, strips_h)
    assert LABEL_MIN_PX * 0.6 <= rows7.max() - rows7.min() + 1 < text_h
    from PIL import Image

    band = np.asarray(Image.open(png7).convert("L"))[:-strips_h]
    block = (5 * 32 + 2) * 2
    assert all((band[:, c * block - 3 : c * block] >= 128).all() for c in range(1, 7))  # no label runs into the next
