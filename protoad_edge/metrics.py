"""Detection metrics on numpy arrays (torch-free): AUROC, PRO, the F1-optimal threshold, rank agreement."""

from __future__ import annotations

import cv2
import numpy as np

# The MVTec AD evaluation integrates the PRO curve up to this false positive rate.
PRO_FPR_LIMIT = 0.3


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first; ties handled as one step."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel().astype(np.float64)
    order = np.argsort(-scores)  # tie order is irrelevant: each tie becomes one step
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    pos, neg = labels.sum(), labels.size - labels.sum()
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both normal and anomalous samples")
    fpr = np.r_[0.0, fps / neg]
    tpr = np.r_[0.0, tps / pos]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def curve_area(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoidal area under a curve whose ``x`` never decreases, optionally only up to ``x_max``.

    The curve is cut at exactly ``x_max``, its height there interpolated linearly between the
    neighbouring points (as the MVTec AD evaluation script does), so the area does not depend on
    where the thresholds happen to fall.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is not None:
        keep = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
        if keep == 0:
            raise ValueError(f"the curve starts after x_max={x_max}")
        if keep < x.size and x[keep - 1] < x_max:
            x0, x1, y0, y1 = x[keep - 1], x[keep], y[keep - 1], y[keep]
            y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            x, y = np.r_[x[:keep], x_max], np.r_[y[:keep], y_cut]
        else:
            x, y = x[:keep], y[:keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal over the tie-aware curve, as scikit-learn)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return curve_area(fpr, tpr)


def regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected defect regions of one ground-truth mask: (labels HxW int32, 0 = normal; sizes[label]).

    8-connectivity, as the MVTec AD evaluation script (``scipy.ndimage.label`` with a 3x3
    structuring element of ones, not scipy's 4-connected default): pixels touching only at a
    corner belong to one region.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, dtype=np.uint8), connectivity=8)
    sizes = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    sizes[0] = 0.0  # label 0 is the background, not a region
    return labels, sizes


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-region-overlap curve of a test set: (fpr, pro, thresholds), highest threshold first.

    ``masks`` bool [N,H,W] and ``maps`` [N,H,W]. At threshold t (predict a defect where map >= t):
    PRO = mean over every ground-truth region of every image of |region & prediction| / |region|,
    FPR = predicted pixels among all defect-free pixels of the whole test set. One sort of all
    pixels gives every distinct threshold at once: a region pixel adds 1/|region| to its region's
    overlap, a normal pixel adds one false positive, and equal scores form one step.
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be [N,H,W]")
    overlap = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labels, sizes = regions(mask)
        n_regions += len(sizes) - 1
        share = np.zeros_like(sizes)
        share[1:] = 1.0 / sizes[1:]
        overlap[i] = share[labels]
    normal = ~masks.ravel()
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs ground-truth regions and defect-free pixels")
    scores = maps.ravel().astype(np.float64)
    order = np.argsort(-scores)  # tie order is irrelevant: each tie becomes one step
    scores = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    fpr = np.cumsum(normal[order])[last_of_tie] / n_normal
    pro = np.minimum(np.cumsum(overlap.ravel()[order])[last_of_tie] / n_regions, 1.0)
    return np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, scores[last_of_tie]]


def pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under a PRO curve (``pro_curve``) for FPR in [0, fpr_limit], divided by fpr_limit (1.0 = perfect)."""
    return curve_area(fpr, pro, fpr_limit) / fpr_limit


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 under the verdict ``score > threshold`` (``protoad_edge.decision``).

    The best cut flags every score from some value s up; the threshold returned lies halfway between
    s and the next lower score (just below s when s is the lowest), so the cut holds for ``>`` and
    survives the rounding differences between backends. Ties in F1 go to the higher threshold.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel().astype(np.float64)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    pos, neg = labels.sum(), labels.size - labels.sum()
    tp, fp = tpr[1:] * pos, fpr[1:] * neg
    f1 = 2 * tp / (tp + fp + pos)
    best = int(np.argmax(f1))
    cut = thresholds[1 + best]
    below = thresholds[2 + best] if best + 2 < thresholds.size else cut - max(abs(cut) * 1e-6, 1e-12)
    return float((cut + below) / 2.0), float(f1[best])


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the ranks starts+1 .. ends
    out = np.empty(values.size)
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks); NaN if either is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.size != rb.size:
        raise ValueError(f"spearman: {ra.size} values against {rb.size}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
