"""The end-to-end latency figures a reject gate is placed by: percentiles, and the jitter as p99 - p50."""

from __future__ import annotations

import time

import pytest

from protoad_edge.runtime.latency import Latencies


def test_percentiles_and_jitter() -> None:
    leg = Latencies()
    assert leg.figures() is None
    for ms in range(1, 101):  # 1 .. 100 ms
        leg.add(float(ms))
    figures = leg.figures()
    assert figures is not None and figures.count == 100
    assert (figures.p50, figures.p95, figures.p99) == pytest.approx((50.5, 95.05, 99.01))
    assert figures.jitter == pytest.approx(99.01 - 50.5)  # how much later than the typical verdict a gate waits
    assert figures.line() == "p50 50.5 ms, p95 95.0 ms, p99 99.0 ms, jitter 48.5 ms (100 frames)"
    assert figures.to_dict()["jitter_ms"] == pytest.approx(48.51)


def test_the_newest_values_are_kept() -> None:
    leg = Latencies(keep=10)
    for ms in [1000.0] * 10 + [1.0] * 10:  # an old outage, then ten quick frames
        leg.add(ms)
    figures = leg.figures()
    assert figures is not None and figures.count == 10 and figures.p99 == pytest.approx(1.0)


def test_since_capture() -> None:
    leg = Latencies()
    captured = time.time()
    leg.since_capture(captured, captured + 0.25)
    figures = leg.figures()
    assert figures is not None and figures.p50 == pytest.approx(250.0)
