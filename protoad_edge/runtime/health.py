"""Health: a run that says when it stops making sense.

A model judges frames like the normal images it was built on; a frame unlike them gets a verdict that means
nothing, and nothing in the verdict says so. A lamp that changed can flag every part, a camera that moved closer
can make every frame score lower, so that the line passes every defect in silence. So each frame is compared with
what the bundle records of its normal images (``ModelInfo.built_on``, ``builder.reference``):

==============  =================================================================================================
finding         rule (one frame; ``BUILT_ON`` checks are "unknown" for a bundle that does not record them)
==============  =================================================================================================
size            the judged area (ROI or frame) is more than ``SIZE`` (10 %) wider, narrower, taller or shorter than
                every training image's: parts appear at another scale, or the region covers something else
over-exposed    brightness above the brightest training image's by more than ``EXPOSURE`` (15 %), or halfway to
                white, whichever is lower
under-exposed   brightness below the darkest training image's by more than ``EXPOSURE``
blurred         sharpness below ``BLUR`` (half) of the least sharp training image's: out of focus, or the camera
                moved closer (the detail grows coarser)
black           brightness below ``BLACK_LEVEL`` (16) and contrast below ``BLACK_CONTRAST`` (4): no picture
                (needs no record; exposure and focus are not judged on such a frame)
frozen          the judged area is identical, pixel for pixel, to the previous frame's: a camera or stream
                that repeats its last picture (needs no record)
scores-high     the score is above the 95th percentile of the held-out normal images' scores (unknown with fewer
                than ``DRIFT_MIN_IMAGES``, 10, held-out images: their percentiles say too little)
scores-low      the score is below their 5th percentile
==============  =================================================================================================

A finding becomes a problem of the source's health when more than half of the last ``window`` frames (30 by
default: ``--health-window``) have it, and stops being one when no more than half have it. For the scores that is
the window's median beyond the held-out 5th or 95th percentile: drift in either direction, robust to a minority of
real defects. The scores are the statistic watched for drift because they are what the verdict is made of, they
move with every cause (light, distance, focus, another product variant) in both directions, and they cost nothing
to watch; the share of flagged frames cannot see the silent direction (fewer flags), and the images' statistics
miss a change the model sees and they do not (another product variant). Those statistics still name the likely
cause (exposure, focus) beside the drift.

Each record carries ``health``: ``{"problems": [...], "frame": [...]}``, the source's problems in force after this
frame and this frame's own image findings (black, frozen, exposure, blur, size). Each change of a source's
problems is one log line and one message to ``on_change`` (the station, MQTT).
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..imagestats import image_stats
from .outputs.sinks import Sink
from .result import FrameResult

WINDOW = 30
SIZE = 0.10
EXPOSURE = 0.15
BLUR = 0.5
BLACK_LEVEL, BLACK_CONTRAST = 16.0, 4.0
DRIFT_MIN_IMAGES = 10  # fewer held-out scores than this say too little of where normal scores lie
IMAGE_FINDINGS = ("black", "frozen", "over-exposed", "under-exposed", "blurred", "size")
# check -> the findings it makes, and the part of ``built_on`` it needs (None: none)
CHECKS = {
    "size": (("size",), "region"),
    "exposure": (("over-exposed", "under-exposed"), "brightness"),
    "focus": (("blurred",), "sharpness"),
    "drift": (("scores-high", "scores-low"), "scores"),
    "black": (("black",), None),
    "frozen": (("frozen",), None),
}


@dataclass(frozen=True)
class Problem:
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def checks_known(built_on: dict[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """(checks that can run, {check that cannot: why}) for a bundle's ``built_on``."""
    known, unknown = [], {}
    for check, (_, needs) in CHECKS.items():
        if needs is not None and not (built_on or {}).get(needs):
            unknown[check] = "the bundle does not record its normal images (built by an older protoad-export)"
        elif needs == "scores" and (count := built_on["scores"].get("count", 0)) < DRIFT_MIN_IMAGES:  # type: ignore
            unknown[check] = (
                f"{count} held-out normal images are too few to tell where normal scores lie (at "
                f"least {DRIFT_MIN_IMAGES}: protoad-export --val-split)"
            )
        else:
            known.append(check)
    return known, unknown


class HealthMonitor(Sink):
    """One source's health. A sink that writes before the records (``names_files``: like a mask's file name, what
    it sets on the result is in the record)."""

    names_files = True

    def __init__(
        self,
        source: str,
        built_on: dict[str, Any] | None,
        window: int = WINDOW,
        on_change: Callable[[HealthMonitor], None] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("the health window must hold at least one frame")
        self.source, self.built_on, self.window = source, built_on or {}, window
        self.known, self.unknown = checks_known(built_on)
        self.on_change = on_change
        self.frames = 0
        self.problems: dict[str, Problem] = {}  # in force, by code
        self._recent: deque[dict[str, str]] = deque()  # the findings (code -> message) of the last frames
        self._counts: Counter[str] = Counter()
        self._scores: deque[float] = deque(maxlen=window)
        self._previous: np.ndarray | None = None

    def findings(self, result: FrameResult) -> dict[str, str]:
        """This frame's findings: code -> what was seen."""
        found: dict[str, str] = {}
        crop = result.crop
        if self._previous is not None and np.array_equal(crop, self._previous):
            found["frozen"] = "frozen: the camera delivers the same picture again and again"
        self._previous = crop
        stats = image_stats(crop)
        black = stats.brightness < BLACK_LEVEL and stats.contrast < BLACK_CONTRAST
        if black:
            found["black"] = f"black: no picture (mean grey level {stats.brightness:.0f} of 255)"
        ref = self.built_on
        if "size" in self.known:
            found.update(self._size(result.geometry.roi[2:]))
        if "exposure" in self.known and not black:
            low, high = ref["brightness"]
            if stats.brightness > min(high * (1 + EXPOSURE), (high + 255) / 2):
                found["over-exposed"] = (
                    f"over-exposed: brightness {stats.brightness:.0f}, the training images "
                    f"{low:.0f} to {high:.0f}: the lamp or the exposure changed?"
                )
            elif stats.brightness < low * (1 - EXPOSURE):
                found["under-exposed"] = (
                    f"under-exposed: brightness {stats.brightness:.0f}, the training images "
                    f"{low:.0f} to {high:.0f}: the lamp or the exposure changed?"
                )
        if "focus" in self.known and not black and stats.sharpness < BLUR * ref["sharpness"][0]:
            found["blurred"] = (
                f"blurred: sharpness {stats.sharpness:.3g}, the least sharp training image "
                f"{ref['sharpness'][0]:.3g}: out of focus, or the camera moved closer"
            )
        if "drift" in self.known:
            found.update(self._drift(result.score))
        return found

    def _size(self, size: Sequence[int]) -> dict[str, str]:
        (min_w, min_h), (max_w, max_h) = self.built_on["region"]["min"], self.built_on["region"]["max"]
        w, h = size
        if min_w * (1 - SIZE) <= w <= max_w * (1 + SIZE) and min_h * (1 - SIZE) <= h <= max_h * (1 + SIZE):
            return {}
        built = f"{min_w}x{min_h}" + (f" to {max_w}x{max_h}" if (min_w, min_h) != (max_w, max_h) else "")
        return {
            "size": f"size: the judged area is {w}x{h} px, the bundle was built on {built} px: parts appear "
            "at another scale (set --roi, or teach the model this view)"
        }

    def _drift(self, score: float) -> dict[str, str]:
        self._scores.append(score)
        ref = self.built_on["scores"]
        median = statistics.median(self._scores)
        seen = f"the median score of the last {len(self._scores)} frames is {median:.4g}"
        normal = f"{ref['p05']:.4g} to {ref['p95']:.4g} for 90 % of the {ref['images']} normal images"
        if score > ref["p95"]:
            return {
                "scores-high": f"scores-high: {seen}, {normal}: the light, the camera or the product changed? "
                "Rejects may be false alarms"
            }
        if score < ref["p05"]:
            return {
                "scores-low": f"scores-low: {seen}, {normal}: the camera moved or the light changed? Defects "
                "may pass unseen"
            }
        return {}

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        found = self.findings(result)
        self.frames += 1
        self._recent.append(found)
        self._counts.update(found.keys())
        if len(self._recent) > self.window:
            self._counts.subtract(self._recent.popleft().keys())
        in_force = {code for code, count in self._counts.items() if 2 * count > self.window}
        latest = {code: message for findings in self._recent for code, message in findings.items()}
        before = set(self.problems)
        self.problems = {code: Problem(code, latest[code]) for code in sorted(in_force)}
        result.health = {"problems": sorted(in_force), "frame": [c for c in IMAGE_FINDINGS if c in found]}
        if in_force != before and self.on_change is not None:
            self.on_change(self)
        return True

    def close(self, keep: bool) -> str | None:
        return None

    def status(self) -> str:
        return "health ok" if not self.problems else "health: " + ", ".join(self.problems)

    def state(self) -> dict[str, Any]:
        """For the page and the MQTT status message."""
        return {
            "source": self.source,
            "state": "attention" if self.problems else "ok",
            "problems": [p.to_dict() for p in self.problems.values()],
            "unknown": list(self.unknown),
            "window": self.window,
            "frames": self.frames,
        }


class Health:
    """The health of a run's sources: one monitor each, one log line and one ``announce`` per change."""

    def __init__(
        self,
        sources: Sequence[str],
        built_on: dict[str, Any] | None,
        window: int,
        log: Callable[[str], None],
        announce: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.log, self.announce = log, announce
        self.monitors = [HealthMonitor(name, built_on, window, self._changed) for name in sources]
        reasons: dict[str, list[str]] = {}
        for check, why in (self.monitors[0].unknown if self.monitors else {}).items():
            reasons.setdefault(why, []).append(check)
        for why, checks in reasons.items():
            log(f"health: {', '.join(checks)} not checked: {why}")

    def lane_sinks(self, index: int) -> list[Sink]:
        return [self.monitors[index]]

    def report(self, running: bool = True) -> dict[str, Any]:
        """Every source's state: the MQTT status message."""
        return {"running": running, "sources": [monitor.state() for monitor in self.monitors]}

    def _changed(self, monitor: HealthMonitor) -> None:
        problems = "; ".join(p.message for p in monitor.problems.values())
        self.log(f"health: {monitor.source}: " + (f"ATTENTION: {problems}" if problems else "ok again"))
        if self.announce is not None:
            self.announce(self.report())
