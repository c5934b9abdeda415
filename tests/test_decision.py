"""The decision layer: every threshold, comparison and cap, checked against values computed here
independently on known maps (not by calling the code under test twice)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protoad_edge.builder.thresholds import (
    FEW_HELD_OUT,
    expected_false_alarm_rate,
    few_held_out_warning,
    from_normal_maps,
)
from protoad_edge.decision import capped_pixel_threshold, defect_mask, defect_regions, image_scores, is_anomalous
from protoad_edge.metadata import ModelInfo
from protoad_edge.metrics import f1_optimal_threshold
from protoad_edge.runtime.loop import thresholds_in_force


def maps_with_peaks(peaks: list[float], size: int = 8, floor: float = 0.0) -> np.ndarray:
    """One map per peak: ``floor`` everywhere and the peak in one pixel, so each image score is its peak."""
    maps = np.full((len(peaks), size, size), floor, np.float64)
    for i, peak in enumerate(peaks):
        maps[i, i % size, (3 * i) % size] = peak
    return maps


def test_image_threshold_is_mean_plus_three_std_when_that_exceeds_the_max() -> None:
    peaks = [float(v) for v in range(1, 11)]  # mean 5.5, population std sqrt(8.25): mean + 3 std = 14.117 > 10
    expected = 5.5 + 3.0 * math.sqrt(8.25)
    t = from_normal_maps(maps_with_peaks(peaks))
    assert t.image == pytest.approx(expected, rel=1e-12)
    assert t.image > max(peaks) + 4  # with 0 std it would be the max, 10


def test_image_threshold_is_the_max_when_one_normal_image_stands_out() -> None:
    peaks = [1.0] * 19 + [10.0]  # max - mean = 8.55 is sqrt(19) std: more than 3 std
    mean = (19 + 10) / 20
    std = math.sqrt((19 * (1 - mean) ** 2 + (10 - mean) ** 2) / 20)
    assert mean + 3 * std < 10.0
    assert from_normal_maps(maps_with_peaks(peaks)).image == 10.0


def test_the_rules_false_alarm_rate_on_few_held_out_images() -> None:
    """Normal scores, the rule set on n of them: a good part above max(max, mean + 3 std) - worked out apart from
    the code (a fresh simulation, other seed): about 16 % at n = 2 (the demo: 7 of 40 new frames flagged),
    0.13 % (3 sigma) only as n grows."""
    rng = np.random.default_rng(7)
    for n, low, high in ((2, 0.14, 0.19), (10, 0.010, 0.014), (200, 0.0012, 0.0018)):
        sets = rng.standard_normal((20_000, n))
        limits = np.maximum(sets.max(axis=1), sets.mean(axis=1) + 3 * sets.std(axis=1))
        expected = np.mean([0.5 * math.erfc(x / math.sqrt(2)) for x in limits])
        assert low < expected_false_alarm_rate(n) < high
        assert expected_false_alarm_rate(n) == pytest.approx(expected, rel=0.08)


def test_an_export_on_few_held_out_images_is_warned_and_one_on_enough_is_not() -> None:
    assert FEW_HELD_OUT == 10  # 1.2 % expected false alarms there, 0.5 % at 20
    assert few_held_out_warning(FEW_HELD_OUT) is None and few_held_out_warning(0) is None  # 0: set on training
    line = few_held_out_warning(2)
    assert line is not None and line.startswith("thresholds set on 2 held-out images")
    assert "about 16 % of good parts (1.2 % at 10)" in line and "--set-threshold" in line
    assert few_held_out_warning(FEW_HELD_OUT - 1) is not None and "1 held-out image:" in few_held_out_warning(1)


def test_pixel_threshold_is_the_999th_permille_of_normal_pixels() -> None:
    # 2 images x 50 x 50 = 5,000 pixels 0..4999 (shuffled): the 99.9th percentile is 4994.001 (linear).
    values = np.random.default_rng(0).permutation(5000).astype(np.float64)
    maps = values.reshape(2, 50, 50)
    sorted_values = np.sort(values)
    position = 0.999 * (values.size - 1)
    expected = sorted_values[int(position)] + (position - int(position)) * (
        sorted_values[int(position) + 1] - sorted_values[int(position)]
    )
    t = from_normal_maps(maps)
    assert t.pixel == pytest.approx(expected) == pytest.approx(4994.001)
    assert t.pixel < t.image  # no cap at work here: the image threshold is above every pixel


@pytest.mark.parametrize("seed", range(5))
def test_pixel_threshold_never_exceeds_the_image_threshold(seed: int) -> None:
    """Why the build needs no cap: a quantile of the pixels is at most the highest image score."""
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 1.0, (int(rng.integers(1, 6)), 20, 20)) ** rng.uniform(1, 4)
    t = from_normal_maps(maps)
    assert t.pixel <= maps.max() <= t.image


def test_the_cap_holds_the_pixel_threshold_at_the_image_threshold() -> None:
    assert capped_pixel_threshold(5.0, 3.0) == 3.0 and capped_pixel_threshold(2.0, 3.0) == 2.0
    assert capped_pixel_threshold(float("nan"), 3.0) == 3.0


def test_verdict_is_strictly_above_the_threshold() -> None:
    assert not is_anomalous(0.5, 0.5)
    assert is_anomalous(np.nextafter(0.5, 1.0), 0.5)
    assert is_anomalous(np.array([0.4, 0.5, 0.6]), 0.5).tolist() == [False, False, True]
    mask = defect_mask(np.array([[0.4, 0.5], [0.6, 0.7]], np.float32), 0.5)
    assert mask.tolist() == [[0, 0], [255, 255]] and mask.dtype == np.uint8


def test_image_score_is_the_map_maximum() -> None:
    maps = np.random.default_rng(3).random((4, 9, 7))
    assert image_scores(maps).tolist() == [float(m.max()) for m in maps]


def test_runtime_caps_the_pixel_threshold_at_the_threshold_in_force() -> None:
    info = ModelInfo(
        category="x",
        resize=72,
        crop=64,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=4,
        image_threshold=0.5,
        pixel_threshold=0.4,
    )
    assert thresholds_in_force(info, None) == (0.5, 0.4)
    assert thresholds_in_force(info, 0.3) == (0.3, 0.3)  # --threshold below the model's pixel threshold
    assert thresholds_in_force(info, 0.9) == (0.9, 0.4)
    info.pixel_threshold = float("nan")
    assert thresholds_in_force(info, None) == (0.5, 0.5)


def all_cuts(scores: np.ndarray) -> np.ndarray:
    """Every distinct verdict ``score > t``: t below the lowest score or between two distinct scores."""
    values = np.unique(scores)
    return np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2.0]


def f1_at(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    flagged = scores > t
    return 2 * int((flagged & labels).sum()) / (int(flagged.sum()) + int(labels.sum()))


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """The best F1 over every cut, and the cuts that reach it."""
    best, best_cuts = -1.0, []
    for t in all_cuts(scores):
        f1 = f1_at(labels, scores, t)
        if f1 > best + 1e-12:
            best, best_cuts = f1, [float(t)]
        elif abs(f1 - best) <= 1e-12:
            best_cuts.append(float(t))
    return best, best_cuts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_optimal_threshold_is_the_best_cut_under_the_verdict(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.normal(labels * 0.8, 0.6), 1)  # rounded: ties, as real scores have
    threshold, f1 = f1_optimal_threshold(labels, scores)
    best, cuts = brute_force_f1(labels, scores)
    assert f1 == pytest.approx(best)
    flagged = is_anomalous(scores, threshold)
    tp = int((flagged & labels).sum())
    assert 2 * tp / (flagged.sum() + labels.sum()) == pytest.approx(best)  # the threshold reaches it under `>`
    assert threshold == pytest.approx(max(cuts))  # ties in F1 go to the higher threshold
    assert best > min(f1_at(labels, scores, t) for t in all_cuts(scores))


def test_f1_threshold_when_every_image_must_be_flagged() -> None:
    labels = np.array([True, True, True, False])
    scores = np.array([0.0, 0.2, 0.3, 0.4])  # flagging all is best (F1 6/7): the threshold lies below 0
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert threshold < 0.0 and is_anomalous(scores, threshold).all() and f1 == pytest.approx(6 / 7)


def test_defect_regions_are_the_largest_up_to_the_limit() -> None:
    """Twelve separate blobs, blob i a row of i pixels with peak 1 + i/100: the ``limit`` largest come back, largest
    first, each with its box, pixel count and peak (the runtime's records carry at most MAX_REGIONS of them)."""
    amap = np.zeros((26, 14), np.float32)
    for i in range(1, 13):
        amap[2 * i, :i] = 0.5
        amap[2 * i, 0] = 1 + i / 100
    expected = [((0, 2 * i, i, 1), i, pytest.approx(1 + i / 100)) for i in range(12, 0, -1)]
    assert defect_regions(amap, 0.1, 10) == expected[:10]
    assert defect_regions(amap, 0.1, 3) == expected[:3]
    assert defect_regions(amap, 0.1, 50) == expected
    assert defect_regions(amap, 2.0, 10) == []
