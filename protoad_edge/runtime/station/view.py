"""The overlay ``--show`` draws, at the page's width, for a fraction of its cost.

``overlay.render`` works at the frame's resolution and shrinks at the end: 1920x1080 costs tens of milliseconds.
The page never needs more than a screen's width, so here the frame is shrunk first and the same ``render`` draws
on the small frame, with the geometry scaled to it: the same picture, drawn on a sixth of the pixels. For the
gallery the frame is first cut to the judged area and a margin (``around``): the part, not the belt around it.
"""

from __future__ import annotations

import cv2
import numpy as np

from ...preprocess import Geometry
from ..outputs.overlay import render, view_size
from ..result import FrameResult

MARGIN = 0.25  # the gallery's picture: the judged area and this share of its size around it


def scaled(geometry: Geometry, size: tuple[int, int]) -> Geometry:
    """``geometry`` for the same frame resized to ``size`` (width, height)."""
    sx, sy = size[0] / geometry.frame[0], size[1] / geometry.frame[1]
    x, y, w, h = geometry.roi
    fx, fy, fw, fh = geometry.frame_box
    return Geometry(
        size,
        (round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))),
        geometry.input_box,
        (fx * sx, fy * sy, fw * sx, fh * sy),
    )


def around(geometry: Geometry, margin: float = MARGIN) -> tuple[int, int, int, int]:
    """The judged area grown by ``margin`` of its size on each side, within the frame: x, y, w, h."""
    x, y, w, h = geometry.judged
    dx, dy = round(margin * w), round(margin * h)
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(geometry.frame[0], x + w + dx), min(geometry.frame[1], y + h + dy)
    return x0, y0, x1 - x0, y1 - y0


def cut(geometry: Geometry, box: tuple[int, int, int, int]) -> Geometry:
    """``geometry`` for the part ``box`` (x, y, w, h) of the frame."""
    bx, by, bw, bh = box
    x, y, w, h = geometry.roi
    fx, fy, fw, fh = geometry.frame_box
    return Geometry((bw, bh), (x - bx, y - by, w, h), geometry.input_box, (fx - bx, fy - by, fw, fh))


def overlay(
    result: FrameResult,
    width: int | None,
    fps: float | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """BGR overlay of ``result`` (of its part ``box``, default all) at most ``width`` pixels wide (None: its own
    width), as ``--show`` draws it: heat, defect outlines, the judged area, the header with the verdict, score,
    threshold and ``fps``, with the thresholds the frame was judged with (``result.context``)."""
    frame, geometry = result.frame, result.geometry
    if box is not None:
        x, y, w, h = box
        frame, geometry = frame[y : y + h, x : x + w], cut(geometry, box)
    size = view_size((frame.shape[1], frame.shape[0]), width)
    if size != (frame.shape[1], frame.shape[0]):
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        geometry = scaled(geometry, size)
    return render(
        frame,
        result.anomaly_map,
        geometry,
        score=result.score,
        anomalous=result.anomalous,
        threshold=result.context.threshold,
        pixel_threshold=result.context.pixel_threshold,
        fps=fps,
    )


def jpeg(image_bgr: np.ndarray, quality: int = 80) -> bytes:
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode a JPEG")
    return data.tobytes()
