"""End-to-end latency: from a frame's capture to the moment its verdict leaves for a reject gate.

A gate must be placed far enough down the line to cover the slowest verdicts, not the typical one, so each
leg is summed up as p50 / p95 / p99 and the jitter, here the spread p99 - p50: the extra delay a gate must
allow beyond the typical verdict. ``Frame.timestamp`` (``time.time()`` just after the capture returned the
frame) is the start; the end is stamped by whoever hands the verdict on (the MQTT sender, the station).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

KEEP = 100_000  # the newest values a leg keeps: about an hour at 30 FPS, 0.8 MB


@dataclass(frozen=True)
class Figures:
    count: int
    p50: float
    p95: float
    p99: float

    @property
    def jitter(self) -> float:
        """p99 - p50 in ms: how much later than the typical verdict a gate must still wait for one."""
        return self.p99 - self.p50

    def line(self) -> str:
        return (
            f"p50 {self.p50:.1f} ms, p95 {self.p95:.1f} ms, p99 {self.p99:.1f} ms, jitter {self.jitter:.1f} ms "
            f"({self.count:,} frames)"
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50_ms": round(self.p50, 3),
            "p95_ms": round(self.p95, 3),
            "p99_ms": round(self.p99, 3),
            "jitter_ms": round(self.jitter, 3),
        }


class Latencies:
    """One leg's latencies in ms (thread-safe: stamped by a sender thread, read by the summary and the page)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._values = np.zeros(keep, np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def since_capture(self, captured: float, now: float | None = None) -> None:
        """Records the time from ``captured`` (``time.time()`` at the capture) to ``now`` (default: now)."""
        self.add(((time.time() if now is None else now) - captured) * 1000.0)

    def add(self, ms: float) -> None:
        with self._lock:
            self._values[self._count % len(self._values)] = ms
            self._count += 1

    def figures(self) -> Figures | None:
        """The percentiles of the kept values; None before the first."""
        with self._lock:
            values = self._values[: min(self._count, len(self._values))].copy()
        if not len(values):
            return None
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return Figures(len(values), float(p50), float(p95), float(p99))
