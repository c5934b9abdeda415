"""The live view of one source: the newest judged frame, drawn only when a page asks for it.

The judging thread only swaps a reference (``update``); the drawing (``view.overlay``) and the JPEG encoding
happen in the page's request thread, once per new frame and width however many pages watch, at the rate the
page asks for. So the view costs the judging loop nothing while nobody looks.

While someone does, drawing may take at most ``LIVE_SHARE`` of one CPU core's time (measured over the last
``BUDGET_WINDOW_S``): a page asking faster than that allows gets the newest picture already drawn, so its rate
drops instead of the line's. A 1920x1080 frame drawn 960 px wide takes a few tens of milliseconds on a small
PC, so this allows about two pictures a second there (``benchmarks/bench_station.py`` measures the cost).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from ..result import FrameResult
from .view import jpeg, overlay

MAX_WIDTH = 1920  # the widest picture a page may ask for
LIVE_SHARE = 0.04  # of one core: the drawing's budget
BUDGET_WINDOW_S = 2.0


@dataclass(frozen=True)
class Picture:
    seq: int  # counts the frames this view was given: a page sees whether it has this one already
    frame: int  # the frame's index in its source
    score: float
    anomalous: bool
    jpeg: bytes


class LiveView:
    def __init__(self) -> None:
        self._latest: tuple[int, FrameResult, float] | None = None
        self._seq = 0
        self._cache: dict[int, Picture] = {}  # width -> the picture of the newest frame drawn at that width
        self._newest: Picture | None = None  # the last picture drawn, at any width
        self._spent: deque[tuple[float, float]] = deque()  # (when a drawing ended, its seconds), the last window
        self._lock = threading.Lock()  # one drawing at a time: two pages asking at once get the same picture
        self.drawn = self.held = 0  # pictures drawn; requests answered with an older one (over the budget)
        self.seconds = 0.0  # spent drawing, in all

    def update(self, result: FrameResult, fps: float) -> None:
        """The newest frame (judging thread: one assignment, nothing drawn)."""
        self._seq += 1
        self._latest = (self._seq, result, fps)

    @property
    def seq(self) -> int:
        return self._seq

    def picture(self, width: int) -> Picture | None:
        """The newest frame's overlay at most ``width`` pixels wide (the frame's own width if narrower), or None
        before the first frame."""
        latest = self._latest
        if latest is None:
            return None
        seq, result, fps = latest
        width = max(64, min(width, MAX_WIDTH))
        with self._lock:
            cached = self._cache.get(width)
            if cached is not None and cached.seq == seq:
                return cached
            started = time.perf_counter()
            if self._newest is not None and self._spending(started) >= LIVE_SHARE * BUDGET_WINDOW_S:
                self.held += 1
                return self._newest
            drawn = jpeg(overlay(result, width, fps))
            ended = time.perf_counter()
            self._spent.append((ended, ended - started))
            self.seconds += ended - started
            self.drawn += 1
            picture = Picture(seq, result.index, result.score, result.anomalous, drawn)
            self._cache = {w: p for w, p in self._cache.items() if p.seq == seq}
            self._cache[width] = self._newest = picture
            return picture

    def _spending(self, now: float) -> float:
        """Seconds spent drawing in the last BUDGET_WINDOW_S (call holding ``_lock``)."""
        while self._spent and self._spent[0][0] < now - BUDGET_WINDOW_S:
            self._spent.popleft()
        return sum(seconds for _, seconds in self._spent)
