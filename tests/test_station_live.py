"""The live view: what --show draws, at the page's width, drawn only when asked and within its CPU budget."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from protoad_edge.preprocess import Preprocess
from protoad_edge.runtime.outputs.overlay import render
from protoad_edge.runtime.result import FrameResult, RunContext
from protoad_edge.runtime.station import live
from protoad_edge.runtime.station.live import LiveView
from protoad_edge.runtime.station.view import around, overlay

PRE = Preprocess(resize=256, crop=224, roi=(300, 100, 600, 500))


def judged(index: int = 0, size: tuple[int, int] = (1280, 720), score: float = 0.5) -> FrameResult:
    rng = np.random.default_rng(index)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), (0, 0), 3)
    amap = np.zeros((224, 224), np.float32)
    amap[100:140, 80:120] = 0.9  # a defect
    geometry = PRE.geometry(*size)
    return FrameResult(
        index,
        time.time(),
        "cam",
        score,
        score > 0.4,
        1.0,
        frame,
        PRE(frame),
        amap,
        geometry,
        RunContext("m", "c", 0.4, "manual", pixel_threshold=0.3),
    )


def test_the_live_view_is_what_show_draws_at_the_pages_width() -> None:
    result = judged()
    small = overlay(result, 640, fps=12.0)
    full = render(
        result.frame,
        result.anomaly_map,
        result.geometry,
        score=result.score,
        anomalous=True,
        threshold=0.4,
        pixel_threshold=0.3,
        fps=12.0,
        view_width=640,
    )
    assert small.shape == full.shape == (360, 640, 3)
    # drawn on the shrunk frame rather than shrunk after: the same picture but for the resampling of thin lines
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 4.0
    heat = np.abs(
        small.astype(int)
        - cv2.resize(cv2.cvtColor(result.frame, cv2.COLOR_RGB2BGR), (640, 360), interpolation=cv2.INTER_AREA).astype(
            int
        )
    ).sum(axis=2)
    x, y, w, h = (round(v / 2) for v in result.geometry.box_to_frame(80, 100, 40, 40))
    assert heat[y + h // 2, x + w // 2] > 100  # the defect's heat where the region is, in view pixels
    assert overlay(result, None).shape == (720, 1280, 3)  # no width: the frame's own


def test_nothing_is_drawn_until_asked_and_each_frame_once_per_width() -> None:
    view = LiveView()
    assert view.picture(640) is None
    for index in range(5):
        view.update(judged(index), 10.0)
    assert view.drawn == 0
    first = view.picture(640)
    assert first is not None and first.seq == 5 and first.frame == 4 and view.drawn == 1
    assert view.picture(640) is first and view.drawn == 1  # asked again: the same picture
    assert view.picture(320) is not first and view.drawn == 2
    assert cv2.imdecode(np.frombuffer(view.picture(320).jpeg, np.uint8), cv2.IMREAD_COLOR).shape[1] == 320
    assert cv2.imdecode(np.frombuffer(view.picture(10**6).jpeg, np.uint8), cv2.IMREAD_COLOR).shape[1] == 1280


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
def test_drawing_stays_within_its_share_of_a_core() -> None:
    """A page asking for every new frame as fast as it can: the drawing takes at most LIVE_SHARE of the time (plus
    the one drawing that may run over), and the page gets the newest picture drawn meanwhile."""
    view = LiveView()
    frames = [judged(i, size=(1920, 1080)) for i in range(4)]
    started = time.perf_counter()
    index = 0
    seen = []
    while time.perf_counter() - started < 2 * live.BUDGET_WINDOW_S:
        view.update(frames[index % 4], 10.0)
        index += 1
        seen.append(view.picture(960).seq)  # type: ignore[union-attr]
    elapsed = time.perf_counter() - started
    one = max(seconds for _, seconds in view._spent)
    assert view.held > 0 and view.drawn < index
    # within the budget, give or take the one drawing per window that may start just under it
    assert view.seconds <= 0.04 * elapsed + one * (elapsed / live.BUDGET_WINDOW_S + 1)  # 4 % of one core
    assert seen == sorted(seen)  # never an older picture than one already shown


def test_the_gallerys_picture_is_the_judged_area_and_a_margin() -> None:
    result = judged()
    x, y, w, h = result.geometry.judged
    box = around(result.geometry)
    dx, dy = round(w / 4), round(h / 4)
    assert box == (x - dx, y - dy, w + 2 * dx, min(720 - (y - dy), h + 2 * dy))  # the frame ends below it
    part = overlay(result, None, box=box)
    whole = overlay(result, None)
    bx, by, bw, bh = box
    assert part.shape[:2] == (bh - bh % 2, bw - bw % 2)
    below_header = slice(80, part.shape[0])  # the header is drawn over the top rows of each picture
    same = whole[by : by + part.shape[0], bx : bx + part.shape[1]][below_header]
    differ = np.abs(part[below_header].astype(int) - same.astype(int)).max(axis=2) > 10
    assert differ.mean() < 0.03  # the same heat and outlines, the lines drawn thinner in a narrower picture
