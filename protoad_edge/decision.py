"""The decision rule, in one place: how an anomaly map becomes an image score, a verdict and an outline.

- The image score is the maximum of the map (the network's ``score`` output computes the same).
- A frame is anomalous when its score is strictly above the image threshold. Thresholds are set at
  or above the highest score of a normal image (``build.thresholds``), so a score equal to the
  threshold is normal, and an F1-optimal threshold is reported for this same comparison.
- A pixel belongs to a defect when its map value is strictly above the pixel threshold. That
  threshold is capped at the image threshold, so every anomalous frame has an outline around the
  peak that made it anomalous.

Build, runtime, evaluation and report all call these functions; none compares scores itself.
"""

from __future__ import annotations

import math

import numpy as np


def image_scores(maps: np.ndarray) -> np.ndarray:
    """[N,H,W] anomaly maps -> [N] image scores (the maximum of each map)."""
    maps = np.asarray(maps)
    return maps.reshape(len(maps), -1).max(axis=1)


def is_anomalous(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    """The verdict: True where a score is strictly above the image threshold."""
    return np.greater(scores, threshold)


def capped_pixel_threshold(pixel: float, image: float) -> float:
    """The pixel threshold in force: never above the image threshold (and the image one if unset)."""
    return min(pixel, image) if math.isfinite(pixel) else image


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """uint8 mask, 255 where the map is strictly above the pixel threshold (the map's resolution)."""
    return np.where(np.greater(anomaly_map, pixel_threshold), 255, 0).astype(np.uint8)


def defect_regions(
    anomaly_map: np.ndarray, pixel_threshold: float, limit: int
) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """The connected defect regions of a map (8-connected pixels above the pixel threshold), largest first,
    at most ``limit``: ((x, y, w, h), pixel count, peak score), in the map's own pixels."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        defect_mask(anomaly_map, pixel_threshold), connectivity=8
    )
    if count <= 1:
        return []
    peaks = np.full(count, -np.inf)
    np.maximum.at(peaks, labels.ravel(), anomaly_map.ravel())
    order = sorted(range(1, count), key=lambda i: (-stats[i, cv2.CC_STAT_AREA], i))[:limit]
    return [
        (
            (int(stats[i, 0]), int(stats[i, 1]), int(stats[i, 2]), int(stats[i, 3])),
            int(stats[i, cv2.CC_STAT_AREA]),
            float(peaks[i]),
        )
        for i in order
    ]
