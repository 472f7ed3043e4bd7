"""The overfitting view's measure (tlora.train.drift) and its chart (tlora.images.line_chart)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tlora.images import CHART_COLOURS, line_chart, nice_ticks
from tlora.train.drift import COMPARE_SIDE, DriftTracker, read_drift, similarity


def scene(background, sprite_at, side=32, colour=(200, 30, 30)):
    a = np.zeros((side, side, 3), np.uint8)
    a[:] = background
    x, y = sprite_at
    a[y : y + 8, x : x + 8] = colour
    return Image.fromarray(a)


def test_similarity_is_the_pearson_correlation_of_the_compared_pixels():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    pixels = [np.asarray(i.resize((COMPARE_SIDE, COMPARE_SIDE), Image.BICUBIC), np.float64).ravel() for i in (a, b)]
    assert similarity(a, b) == pytest.approx(np.corrcoef(*pixels)[0, 1], abs=1e-12)
    assert similarity(a, a) == pytest.approx(1.0)


def test_similarity_reads_layout_and_colour_not_brightness():
    train = scene((30, 160, 30), (4, 4))
    brighter = Image.fromarray(np.clip(np.asarray(train, np.int32) // 2 + 100, 0, 255).astype(np.uint8))
    moved = scene((30, 160, 30), (20, 20))
    other_background = scene((30, 30, 160), (20, 20))
    assert similarity(train, brighter) == pytest.approx(1.0, abs=1e-4)  # (up to the halving's rounding)
    assert similarity(train, moved) < similarity(train, brighter)
    assert similarity(train, other_background) < similarity(train, moved)
    assert similarity(train, Image.new("RGB", (32, 32), "grey")) == 0.0  # a flat image correlates with nothing


def test_drift_is_zero_for_the_base_samples_and_rises_toward_the_photo(tmp_path):
    train = scene((30, 160, 30), (4, 4))
    base = [scene((30, 30, 160), (20, 20)), scene((160, 30, 30), (20, 4), colour=(20, 20, 200))]
    tracker = DriftTracker([train], base, log=tmp_path / "drift.jsonl")
    assert tracker.record(0, base) == 0.0
    halfway = [scene((30, 160, 30), (20, 20)), scene((30, 160, 30), (20, 4), colour=(20, 20, 200))]
    copied = [train, train]
    middle, end = tracker.record(100, halfway), tracker.record(200, copied)
    assert 0 < middle < end
    expected = np.mean([1.0 - similarity(b, train) for b in base])
    assert end == pytest.approx(expected, abs=1e-9)
    assert [s for s, _ in read_drift(tmp_path / "drift.jsonl")] == [0, 100, 200]
    assert read_drift(tmp_path / "drift.jsonl")[2][1] == pytest.approx(end, abs=1e-6)
    with pytest.raises(ValueError, match="1 validation samples for 2 base samples"):
        tracker.record(300, [train])


@pytest.mark.parametrize("lo,hi", [(0, 800), (0.0137, 0.0842), (-0.31, 0.52), (3, 3), (-5e-4, 0)])
def test_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6


def test_line_chart_draws_each_series_where_its_points_are():
    series = {"LoRA": [(0, 0.0), (100, 0.2), (200, 0.4)], "T-LoRA": [(0, 0.0), (100, 0.05), (200, 0.1)]}
    img = line_chart(series, title="t", xlabel="step", ylabel="drift", size=(400, 300))
    assert img.size == (400, 300 + 18 * 2)
    a = np.asarray(img)
    # The axes span the ticks: x 0..200, y 0..0.4; the last points sit at the frame's top right and
    # at a quarter of its height.
    right, top, bottom = 400 - 20, 30, 300 - 45  # the frame (left edge at 70 px)

    def colour_near(px, py):
        patch = a[int(py) - 2 : int(py) + 3, int(px) - 2 : int(px) + 3].reshape(-1, 3)
        return {"#" + bytes(p.astype(np.uint8)).hex() for p in patch}

    assert CHART_COLOURS[0] in colour_near(right, top)
    assert CHART_COLOURS[1] in colour_near(right, bottom - 0.25 * (bottom - top))
    assert CHART_COLOURS[1] not in colour_near(right, top)
    with pytest.raises(ValueError, match="nothing to plot"):
        line_chart({"a": []}, title="empty", xlabel="x", ylabel="y")
