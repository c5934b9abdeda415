"""Decision thresholds from held-out normal images (no defect examples needed).

Rule (named ``held-out`` in the model metadata's ``threshold_rule`` and in every record, and described in its
``threshold_detail``):

- image threshold = max(highest held-out normal score, mean + 3 std of those scores). No held-out
  normal part raises an alarm (the verdict is ``score > threshold``, see ``protoad_edge.decision``),
  and under a normal approximation about 0.13 % of good parts would.
- pixel threshold = the 99.9th percentile of all held-out normal pixel scores. It outlines the
  defect inside frames already judged anomalous: 0.1 % of normal pixels exceed it. It is never
  above the image threshold here (a quantile of the pixels is at most their maximum, which is the
  highest image score); where a lower image threshold is put in force (``--threshold``), the
  runtime caps it (``decision.capped_pixel_threshold``) so the outline stays around the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decision import image_scores
from ..metadata import HELD_OUT

DETAIL = (
    "image: max(max, mean + 3 std) of held-out normal image scores; "
    "pixel: 99.9th percentile of held-out normal pixel scores, capped at the image threshold in force"
)
SIGMAS = 3.0
PIXEL_QUANTILE = 0.999


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    rule: str = HELD_OUT
    detail: str = DETAIL


def from_normal_maps(maps: np.ndarray) -> Thresholds:
    """maps: [N,H,W] anomaly maps of held-out normal images (N >= 1)."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.size == 0:
        raise ValueError("thresholds need at least one held-out normal image")
    scores = image_scores(maps)
    image = max(float(scores.max()), float(scores.mean() + SIGMAS * scores.std()))
    return Thresholds(image=image, pixel=float(np.quantile(maps, PIXEL_QUANTILE)))
