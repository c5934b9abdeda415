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

The 0.13 % holds for many held-out images only: set on few, the rule's own estimate of the spread is rough and it
flags far more good parts (:func:`expected_false_alarm_rate`: 16 % at 2 images, 1.2 % at 10), so an export on fewer
than ``FEW_HELD_OUT`` says so (:func:`few_held_out_warning`).
"""

from __future__ import annotations

import math
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
FEW_HELD_OUT = 10  # fewer held-out images than this: the rule flags more than 1 % of good parts, and the export says so


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


def expected_false_alarm_rate(held_out: int, draws: int = 20_000) -> float:
    """The share of good parts the image rule is expected to flag when set on ``held_out`` images, for normally
    distributed normal scores (a seeded simulation of ``draws`` held-out sets): the rule's 0.13 % is its limit as
    images grow; on the demo's 2 held-out images it is 16 %, which is what the demo bundle flags of new normal frames
    (7 of 40, ``benchmarks/bench_teach.py``)."""
    scores = np.random.default_rng(0).standard_normal((draws, held_out))
    limits = np.maximum(scores.max(axis=1), scores.mean(axis=1) + SIGMAS * scores.std(axis=1))
    return float(np.mean([0.5 * math.erfc(x / math.sqrt(2.0)) for x in limits]))


def few_held_out_warning(held_out: int) -> str | None:
    """One line for an export whose thresholds rest on too few held-out images (None with enough, or with none:
    then they were set on training images, which the sidecar's rule already says)."""
    if held_out == 0 or held_out >= FEW_HELD_OUT:
        return None
    return (
        f"thresholds set on {held_out} held-out image{'s' if held_out > 1 else ''}: with so few, the rule is expected "
        f"to flag about {100 * expected_false_alarm_rate(held_out):.0f} % of good parts "
        f"({100 * expected_false_alarm_rate(FEW_HELD_OUT):.1f} % at {FEW_HELD_OUT}); give more normal images, or set "
        "the threshold on the line's sorted frames (protoad-eval --normal/--defect --set-threshold)"
    )
