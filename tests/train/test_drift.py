"""The overfitting view's measure (tlora.train.drift) and its chart (tlora.images.line_chart)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tlora.images import CHART_COLOURS, line_chart, nice_ticks
from tlora.train.drift import COMPARE_SIDE, DriftTracker, read_drift, toward


def scene(background, sprite_at, side=32, colour=(200, 30, 30)):
    a = np.zeros((side, side, 3), np.uint8)
    a[:] = background
    x, y = sprite_at
    a[y : y + 8, x : x + 8] = colour
    return Image.fromarray(a)


def px(img):
    """The compared pixels, computed here: RGB at 64 px (bicubic), in 0..1."""
    return np.asarray(img.convert("RGB").resize((COMPARE_SIDE, COMPARE_SIDE), Image.BICUBIC), np.float64) / 255


def test_drift_is_the_rms_move_along_the_way_from_the_base_sample_to_the_photo():
    rng = np.random.default_rng(0)
    base, photo, sample = (rng.random(COMPARE_SIDE * COMPARE_SIDE * 3) for _ in range(3))
    way = photo - base
    # the projection written out: mean over pixels of (sample - base) * way / |way|, times sqrt(N) / N
    expected = ((sample - base) * way).sum() / np.sqrt((way**2).sum()) / np.sqrt(way.size)
    assert toward(sample, base, photo) == pytest.approx(expected, rel=1e-12)
    assert toward(base, base, photo) == 0.0
    assert toward(photo, base, photo) == pytest.approx(np.sqrt(np.mean(way**2)), rel=1e-12)
    assert toward(base + 0.5 * way, base, photo) == pytest.approx(0.5 * np.sqrt(np.mean(way**2)), rel=1e-12)
    orthogonal = rng.standard_normal(way.size)
    orthogonal -= orthogonal @ way / (way @ way) * way
    assert abs(toward(base + 0.1 * orthogonal, base, photo)) < 1e-12  # a change off the way counts nothing
    assert toward(sample, base, base) == 0.0  # the base sample is the photo: nothing to move toward


def test_drift_is_zero_for_the_base_samples_and_rises_toward_the_photo(tmp_path):
    train = scene((30, 160, 30), (4, 4))
    base = [scene((30, 30, 160), (20, 20)), scene((160, 30, 30), (20, 4), colour=(20, 20, 200))]
    tracker = DriftTracker([train], base, log=tmp_path / "drift.jsonl")
    assert tracker.record(0, base) == 0.0
    halfway = [scene((30, 160, 30), (20, 20)), scene((30, 160, 30), (20, 4), colour=(20, 20, 200))]
    copied = [train, train]
    middle, end = tracker.record(100, halfway), tracker.record(200, copied)
    assert 0 < middle < end
    expected = np.mean([np.sqrt(np.mean((px(train) - px(b)) ** 2)) for b in base])
    assert end == pytest.approx(expected, abs=1e-9)
    assert [s for s, _ in read_drift(tmp_path / "drift.jsonl")] == [0, 100, 200]
    assert read_drift(tmp_path / "drift.jsonl")[2][1] == pytest.approx(end, abs=1e-6)
    # a background the photo does not have moves away from it
    away = [scene((30, 0, 255), (20, 20)), scene((160, 30, 30), (20, 4), colour=(20, 20, 200))]
    assert tracker.drifts(away)[0] < 0 and tracker.drifts(away)[1] == 0.0
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
