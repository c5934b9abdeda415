"""The accuracy gate: a reduced precision (BF16, FP16, INT8) is a feature only when it keeps FP32's accuracy.

Anomaly scores are small differences of cosines near 1, so a careless lower precision cost 5-17 AUROC points on
bottle (issue 17). Every reduced-precision artefact or backend precision is measured against FP32 on labelled
images it was not tuned on, and fails when image or pixel AUROC drops by more than :data:`MAX_AUROC_DROP_PT`
points or the Spearman rank correlation of its image scores with FP32's falls below :data:`MIN_SPEARMAN`. A
failing one is not written or run as the default unless the user accepts it knowingly (:data:`ACCEPT_FLAG`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ProtoADError

MAX_AUROC_DROP_PT = 0.5  # image and pixel AUROC, percentage points below FP32
MIN_SPEARMAN = 0.99  # rank correlation of the image scores with FP32's
DROP_DIGITS = 6  # drops are compared rounded to a millionth of a point: float noise in 0.9 - 0.895 never decides
ACCEPT_FLAG = "--accept-accuracy-loss"


@dataclass(frozen=True)
class GateFigures:
    """What the gate judges: one reduced precision against FP32 on the same labelled images (fractions)."""

    what: str  # "openvino bf16", "NAME.int8.onnx"
    images: int
    reference_image_auroc: float
    image_auroc: float
    spearman: float
    reference_pixel_auroc: float | None = None  # None: no masks, the pixel check cannot be made
    pixel_auroc: float | None = None
    anomalous: int | None = None  # how many of ``images`` are anomalous (None: not known)

    @property
    def image_drop_pt(self) -> float:
        return _drop(self.reference_image_auroc, self.image_auroc)

    @property
    def pair_pt(self) -> float | None:
        """Image AUROC points one normal/anomalous pair ranked the other way moves (None: the counts unknown)."""
        if self.anomalous is None or not 0 < self.anomalous < self.images:
            return None
        return 100.0 / (self.anomalous * (self.images - self.anomalous))

    @property
    def pixel_drop_pt(self) -> float | None:
        if self.reference_pixel_auroc is None or self.pixel_auroc is None:
            return None
        return _drop(self.reference_pixel_auroc, self.pixel_auroc)

    def line(self) -> str:
        """``image AUROC 86.67 -> 69.17 (-17.50 pt), pixel ..., Spearman 0.871``: the figures for a message."""
        parts = [
            f"image AUROC {100 * self.reference_image_auroc:.2f} -> {100 * self.image_auroc:.2f} "
            f"({-self.image_drop_pt:+.2f} pt)"
        ]
        if self.pixel_drop_pt is not None:
            parts.append(
                f"pixel AUROC {100 * self.reference_pixel_auroc:.2f} -> {100 * self.pixel_auroc:.2f} "
                f"({-self.pixel_drop_pt:+.2f} pt)"
            )
        parts.append(f"Spearman {self.spearman:.4f}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Verdict:
    figures: GateFigures
    failures: tuple[str, ...]  # empty: passed

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """For the sidecar and JSON reports: the figures, the limits and the outcome."""
        return {
            **asdict(self.figures),
            "image_drop_pt": self.figures.image_drop_pt,
            "pixel_drop_pt": self.figures.pixel_drop_pt,
            "max_auroc_drop_pt": MAX_AUROC_DROP_PT,
            "min_spearman": MIN_SPEARMAN,
            "passed": self.passed,
            "failures": list(self.failures),
        }


def judge(figures: GateFigures, rank: bool = True) -> Verdict:
    """The gate's one rule: fail on an image or pixel AUROC drop above MAX_AUROC_DROP_PT points, or a rank
    correlation below MIN_SPEARMAN (NaN, a constant score, fails too). Without ``rank`` the AUROCs alone: a teach
    (``teach/check.py``) is meant to move the scores of frames like the ones taught, so a new order there is no
    loss, only a lower AUROC is."""
    failures = []
    if figures.image_drop_pt > MAX_AUROC_DROP_PT:
        failures.append(
            f"image AUROC drops {figures.image_drop_pt:.2f} pt (limit {MAX_AUROC_DROP_PT}{_coarse(figures)})"
        )
    pixel = figures.pixel_drop_pt
    if pixel is not None and pixel > MAX_AUROC_DROP_PT:
        failures.append(f"pixel AUROC drops {pixel:.2f} pt (limit {MAX_AUROC_DROP_PT})")
    if rank and not figures.spearman >= MIN_SPEARMAN:
        failures.append(f"Spearman {figures.spearman:.4f} below {MIN_SPEARMAN}")
    return Verdict(figures, tuple(failures))


def enforce(verdict: Verdict, refused: str, accept: bool) -> None:
    """Raise the ProtoADError that stops ``refused`` (what would happen: "not written") when the verdict failed
    and the user did not pass :data:`ACCEPT_FLAG`."""
    if verdict.passed or accept:
        return
    f = verdict.figures
    raise ProtoADError(
        f"{f.what} fails the accuracy gate on {f.images} labelled images against FP32: {f.line()} - "
        f"{'; '.join(verdict.failures)}. {refused}; pass {ACCEPT_FLAG} to accept the loss knowingly"
    )


def _coarse(figures: GateFigures) -> str:
    """Where one reordered pair already costs more than the limit, say so: the refusal stands (the gate cannot
    tell a reordered pair from a real loss), but what the line needs is more labelled images, not a verdict on the
    precision."""
    pair = figures.pair_pt
    if pair is None or pair <= MAX_AUROC_DROP_PT:
        return ""
    normal = figures.images - (figures.anomalous or 0)
    return (
        f"; on {normal} normal and {figures.anomalous} anomalous images one pair ranked the other way moves it "
        f"{pair:.2f} pt: judge on more labelled images"
    )


def _drop(reference: float, value: float) -> float:
    """Points lost from ``reference`` to ``value`` (negative: a gain); NaN counts as everything lost."""
    if math.isnan(value):
        return 100.0 * reference
    return round(100.0 * (reference - value), DROP_DIGITS)
