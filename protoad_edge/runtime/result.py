"""One judged frame: what the model saw, what it found (in frame pixels), and its JSON record."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..preprocess import Geometry


@dataclass(frozen=True)
class Region:
    """A connected defect region above the pixel threshold, in frame pixels."""

    bbox: list[int]  # x, y, w, h
    area: int
    peak: float

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": self.bbox, "area": self.area, "peak": round(self.peak, 6)}


@dataclass(frozen=True)
class RunContext:
    """What every record of a run shares: which model judged, with which threshold and rule (until the run switches
    to a new version of its bundle, ``runtime/reload.py``)."""

    model: str
    category: str
    threshold: float
    threshold_rule: str
    pixel_threshold: float = math.nan  # in force: capped at the image threshold (masks and regions)
    model_version: int | None = None  # the bundle's version (``versions.py``)


@dataclass
class FrameResult:
    index: int
    timestamp: float
    label: str  # image path, or the source's name
    score: float
    anomalous: bool
    latency_ms: float  # preprocessing + inference
    frame: np.ndarray  # the source frame, HxWx3 uint8 RGB
    crop: np.ndarray  # what the model saw: SxSx3 uint8 RGB
    anomaly_map: np.ndarray  # SxS float32, the input's pixels
    geometry: Geometry  # where the input lies in the frame
    context: RunContext
    regions: list[Region] = field(default_factory=list)
    pos_ms: float | None = None  # position in a video file
    mask_file: str | None = None  # the mask written for this frame, if any
    health: dict[str, Any] | None = None  # the source's health after this frame (runtime.health), if watched

    def record(self) -> dict[str, Any]:
        """The JSON record (README: "JSON records")."""
        record: dict[str, Any] = {
            "frame": self.index,
            "timestamp": round(self.timestamp, 6),
            "source": self.label,
            "score": self.score,
            "verdict": "anomaly" if self.anomalous else "ok",
            "latency_ms": round(self.latency_ms, 3),
            "model": self.context.model,
            "category": self.context.category,
            "threshold": self.context.threshold,
            "threshold_rule": self.context.threshold_rule,
            "model_version": self.context.model_version,
            "roi": list(self.geometry.judged),
            "regions": [region.to_dict() for region in self.regions],
        }
        if self.pos_ms is not None:
            record["pos_ms"] = round(self.pos_ms, 3)
        if self.mask_file is not None:
            record["mask"] = self.mask_file
        if self.health is not None:
            record["health"] = self.health
        return record
