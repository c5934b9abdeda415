"""One judged frame: what the model saw, what it found, and its JSON line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FrameResult:
    index: int
    timestamp: float
    label: str  # image path, or the source's name
    score: float
    anomalous: bool
    latency_ms: float  # preprocessing + inference
    crop: np.ndarray  # what the model saw: SxSx3 uint8 RGB
    anomaly_map: np.ndarray  # SxS float32

    def record(self) -> dict[str, Any]:
        """The JSON line."""
        return {
            "frame": self.index,
            "timestamp": round(self.timestamp, 6),
            "source": self.label,
            "score": self.score,
            "verdict": "anomaly" if self.anomalous else "ok",
            "latency_ms": round(self.latency_ms, 3),
        }
