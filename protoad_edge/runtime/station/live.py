"""The live view of one source: the newest judged frame, drawn only when a page asks for it.

The judging thread only swaps a reference (``update``); the drawing (``view.overlay``) and the JPEG encoding
happen in the page's request thread, once per new frame and width however many pages watch, at the rate the
page asks for. So the view costs the judging loop nothing while nobody looks, and a few milliseconds of CPU
per picture shown while someone does (``benchmarks/bench_station.py`` measures it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..result import FrameResult
from .view import jpeg, overlay

MAX_WIDTH = 1920  # the widest picture a page may ask for


@dataclass(frozen=True)
class Picture:
    seq: int  # counts the frames this view was given: a page sees whether it has this one already
    frame: int  # the frame's index in its source
    score: float
    anomalous: bool
    jpeg: bytes


class LiveView:
    def __init__(self, pixel_threshold: float) -> None:
        self.pixel_threshold = pixel_threshold
        self._latest: tuple[int, FrameResult, float] | None = None
        self._seq = 0
        self._cache: dict[int, Picture] = {}  # width -> the picture of the newest frame drawn at that width
        self._lock = threading.Lock()  # one drawing at a time: two pages asking at once get the same picture

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
            drawn = jpeg(overlay(result, width, self.pixel_threshold, fps))
            picture = Picture(seq, result.index, result.score, result.anomalous, drawn)
            self._cache = {w: p for w, p in self._cache.items() if p.seq == seq}
            self._cache[width] = picture
            return picture
