"""One source as the station shows it: the shift's verdict counters, its frame rate, the live view, and the
capture-to-station latency. A sink of that source (``Station.lane_sinks``), so it sees every frame judged."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..latency import Latencies
from ..loop import FPS_SMOOTHING
from ..outputs.sinks import Sink
from ..result import FrameResult
from .live import LiveView


class StationLane(Sink):
    def __init__(self, index: int, name: str, latency: Latencies) -> None:
        self.index, self.name = index, name
        self.live = LiveView()
        self.frames = self.anomalies = 0
        self.fps = 0.0
        self.last = 0.0  # time.monotonic() of the newest frame
        self.last_result: FrameResult | None = None
        self.ended = False
        self.latency = latency  # capture -> the station has the verdict (shared by the run's sources)
        self.health: Any = None  # the source's HealthMonitor, when the run has one

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        now = time.monotonic()
        self.latency.since_capture(result.timestamp)
        if self.frames:
            rate = 1.0 / max(now - self.last, 1e-9)
            self.fps = rate if self.fps == 0.0 else (1 - FPS_SMOOTHING) * self.fps + FPS_SMOOTHING * rate
        self.last = now
        self.frames += 1
        self.anomalies += result.anomalous
        self.last_result = result
        self.live.update(result, self.fps)
        return True

    def close(self, keep: bool) -> str | None:
        self.ended = True
        return None

    def state(self) -> dict[str, Any]:
        """The page's view of this source."""
        result = self.last_result
        return {
            "index": self.index,
            "name": self.name,
            "frames": self.frames,
            "anomalies": self.anomalies,
            "ok": self.frames - self.anomalies,
            "fps": round(self.fps, 2),
            "seconds_since_frame": round(time.monotonic() - self.last, 1) if self.frames else None,
            "ended": self.ended,
            "live_seq": self.live.seq,
            "threshold": result.context.threshold if result is not None else None,
            "threshold_rule": result.context.threshold_rule if result is not None else None,
            "model_version": result.context.model_version if result is not None else None,
            "health": self.health.state() if self.health is not None else None,
        }
