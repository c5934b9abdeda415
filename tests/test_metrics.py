"""Metrics against independent computations: scikit-learn for ROC/AUROC, scipy for ranks, and a slow,
obviously correct PRO (scipy labelling, one full pass per threshold, explicit integration)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from protoad_edge.metrics import (
    PRO_FPR_LIMIT,
    auroc,
    curve_area,
    pro_area,
    pro_curve,
    ranks,
    regions,
    roc_curve,
    spearman,
)


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """The PRO figure as protoad-eval computes it: the curve, then its normalised area up to the limit."""
    fpr, pro, _ = pro_curve(masks, maps)
    return pro_area(fpr, pro, fpr_limit)


def slow_pro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's PRO, spelled out: every distinct score is a threshold; regions are 8-connected."""
    found = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        found += [(i, labels == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        overlaps = [(predicted[i] & region).sum() / region.sum() for i, region in found]
        points.append(((predicted & normal).sum() / normal.sum(), float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed: int, n: int = 5, size: int = 14, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A few images with 0-3 blob regions each (some touching only at a corner), and noisy maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[i, y : y + h, x : x + w] = True
        if rng.random() < 0.5:  # two pixels joined only diagonally
            y, x = rng.integers(0, size - 2, size=2)
            masks[i, y, x] = masks[i, y + 1, x + 1] = True
    maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size))
    if levels is not None:
        maps = np.round(maps * levels) / levels  # heavy ties
    if not masks.any():
        masks[1, 0, 0] = True
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7, 40])
def test_roc_and_auroc_match_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = rng.random(200) + 0.4 * labels
    if levels is not None:
        scores = np.round(scores * levels) / levels
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_allclose(thresholds[1:], sk_thr[1:])
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_curve_area_cuts_at_x_max_by_interpolation() -> None:
    x, y = np.array([0.0, 0.2, 0.4, 1.0]), np.array([0.0, 0.5, 1.0, 1.0])
    # up to 0.3: triangle to (0.2, 0.5), then a trapezoid to (0.3, 0.75)
    assert curve_area(x, y, 0.3) == pytest.approx(0.2 * 0.5 / 2 + 0.1 * (0.5 + 0.75) / 2)
    assert curve_area(x, y, 0.2) == pytest.approx(0.05)  # x_max on a point: nothing interpolated
    assert curve_area(x, y) == pytest.approx(0.05 + 0.2 * 0.75 + 0.6)
    # a vertical step exactly at x_max adds no area
    assert curve_area(np.array([0.0, 0.3, 0.3, 1.0]), np.array([0.0, 0.2, 0.9, 1.0]), 0.3) == pytest.approx(0.03)


def test_regions_are_eight_connected() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region, as in the MVTec AD evaluation
    mask[3:5, 3:5] = True
    labels, sizes = regions(mask)
    assert len(sizes) - 1 == 2
    assert labels[0, 0] == labels[1, 1] != labels[4, 4]
    assert sorted(sizes[1:].tolist()) == [2.0, 4.0]
    assert ndimage.label(mask)[1] == 3  # scipy's default (4-connected) would split the diagonal pair


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [None, 5, 25])
def test_fast_pro_matches_slow_pro(seed: int, levels: int | None) -> None:
    masks, maps = random_case(seed, levels=levels)
    assert au_pro(masks, maps) == pytest.approx(slow_pro(masks, maps), abs=1e-9)
    assert au_pro(masks, maps, fpr_limit=0.05) == pytest.approx(slow_pro(masks, maps, limit=0.05), abs=1e-9)


def test_pro_weights_regions_equally() -> None:
    # One large region found entirely, one small region missed: PRO is 1/2 whatever their sizes.
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, :6, :6] = True  # 36 pixels
    masks[1, 8, 8] = True  # 1 pixel
    maps = np.zeros((2, 10, 10), dtype=np.float32)
    maps[0, :6, :6] = 1.0
    fpr, pro, thresholds = pro_curve(masks, maps)
    assert thresholds[1] == 1.0 and fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    # Then every pixel at once: the curve runs straight from (0, 0.5) to (1, 1); at FPR 0.3 it is 0.65.
    assert au_pro(masks, maps) == pytest.approx((0.5 + 0.65) / 2)
    perfect = masks.astype(np.float32)
    assert au_pro(masks, perfect) == pytest.approx(1.0)
    assert au_pro(masks, 1.0 - perfect) == pytest.approx(0.0)


def test_pro_needs_regions_and_normal_pixels() -> None:
    with pytest.raises(ValueError):
        au_pro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError):
        au_pro(np.ones((2, 4, 4), bool), np.zeros((2, 4, 4)))


@pytest.mark.parametrize("seed", range(4))
def test_ranks_and_spearman_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.round(rng.random(50) * 8)  # ties
    b = a + rng.normal(0, 2, 50)
    np.testing.assert_allclose(ranks(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.ones_like(a)))
