"""Detection metrics on numpy arrays (torch-free): AUROC and the F1-optimal threshold."""

from __future__ import annotations

import numpy as np


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first; ties handled as one step."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel().astype(np.float64)
    order = np.argsort(-scores, kind="mergesort")
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


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal over the tie-aware curve, as scikit-learn)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when predicting anomalous for score >= threshold."""
    labels = np.asarray(labels).ravel().astype(bool)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    pos, neg = labels.sum(), labels.size - labels.sum()
    tp, fp = tpr[1:] * pos, fpr[1:] * neg
    f1 = 2 * tp / (tp + fp + pos)
    best = int(np.argmax(f1))
    return float(thresholds[1 + best]), float(f1[best])
