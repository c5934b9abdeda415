"""The overlay ``--show`` draws, at the page's width, for a fraction of its cost.

``overlay.render`` works at the frame's resolution and shrinks at the end: 1920x1080 costs tens of milliseconds.
The page never needs more than a screen's width, so here the frame is shrunk first and the same ``render`` draws
on the small frame, with the geometry scaled to it: the same picture, drawn on a sixth of the pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from ...decision import capped_pixel_threshold
from ...preprocess import Geometry
from ..outputs.overlay import render, view_size
from ..result import FrameResult


def scaled(geometry: Geometry, size: tuple[int, int]) -> Geometry:
    """``geometry`` for the same frame resized to ``size`` (width, height)."""
    sx, sy = size[0] / geometry.frame[0], size[1] / geometry.frame[1]
    x, y, w, h = geometry.roi
    fx, fy, fw, fh = geometry.frame_box
    return Geometry(size, (round(x * sx), round(y * sy), max(1, round(w * sx)), max(1, round(h * sy))),
                    geometry.input_box, (fx * sx, fy * sy, fw * sx, fh * sy))


def overlay(result: FrameResult, width: int | None, pixel_threshold: float, fps: float | None = None) -> np.ndarray:
    """BGR overlay of ``result`` at most ``width`` pixels wide (None: the frame's width), as ``--show`` draws it:
    heat, defect outlines, the judged area, the header with the verdict, score, threshold and ``fps``.
    ``pixel_threshold`` is capped at the frame's image threshold, as the run caps it."""
    frame = result.frame
    size = view_size((frame.shape[1], frame.shape[0]), width)
    geometry = result.geometry
    if size != (frame.shape[1], frame.shape[0]):
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        geometry = scaled(geometry, size)
    threshold = result.context.threshold
    return render(frame, result.anomaly_map, geometry, score=result.score, anomalous=result.anomalous,
                  threshold=threshold, pixel_threshold=capped_pixel_threshold(pixel_threshold, threshold), fps=fps)


def jpeg(image_bgr: np.ndarray, quality: int = 80) -> bytes:
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode a JPEG")
    return data.tobytes()
