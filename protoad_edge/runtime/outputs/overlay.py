"""What the operator sees: the whole frame as the camera delivered it, the area the model judges
outlined and the rest dimmed (visibly not inspected), heat colour only where the map nears or passes
the pixel threshold (so a good part looks like itself), defect outlines, and a header with the
verdict, score, threshold and frame rate drawn on a translucent band over the frame's top rows: the
view (``--show``, ``--save``) has exactly the frame's size, or the ``--view-width`` one.
"""

from __future__ import annotations

import cv2
import numpy as np

from ...decision import defect_mask
from ...preprocess import Geometry

HEADER = 44  # px at a 640-px-wide view; scaled with the view so the text stays legible
HEADER_SHADE = 0.6  # how much the band under the header darkens the frame (the rows stay visible through it)
DIM = 0.35  # brightness of the frame outside the judged area
MAX_ALPHA = 0.6  # heat opacity at and above the pixel threshold
# Heat starts at this share of the pixel threshold and is full from the pixel threshold on; its colour
# runs from the pixel threshold (yellow-green) to 1.25 x the image threshold (red), fixed per model so one
# colour means one score in every frame.
HEAT_FROM, COLOUR_HIGH = 0.7, 1.25
OK_BGR, ANOMALY_BGR, OUTLINE_BGR = (80, 200, 80), (40, 40, 230), (255, 255, 255)
JUDGED_BGR, ROI_BGR = (255, 200, 0), (160, 160, 160)


def view_size(frame: tuple[int, int], view_width: int | None) -> tuple[int, int]:
    """(width, height) of the view: the frame's, or ``view_width`` wide in proportion; even (video codecs need it)."""
    width, height = frame
    if view_width and view_width < width:
        height, width = max(2, round(height * view_width / width)), view_width
    return width - width % 2, height - height % 2


def render(
    frame_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    geometry: Geometry,
    *,
    score: float,
    anomalous: bool,
    threshold: float,
    pixel_threshold: float,
    fps: float | None = None,
    view_width: int | None = None,
) -> np.ndarray:
    """BGR view of the frame with the overlay and the header drawn in it, ``view_width`` wide (else the frame's
    size)."""
    image = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    judged = np.zeros(image.shape[:2], bool)
    x, y, w, h = geometry.judged
    judged[y : y + h, x : x + w] = True
    image[~judged] *= DIM
    heat_map = geometry.to_frame(anomaly_map)
    start, high = HEAT_FROM * pixel_threshold, max(COLOUR_HIGH * threshold, pixel_threshold * 1.01)
    alpha = MAX_ALPHA * np.clip((heat_map - start) / max(pixel_threshold - start, 1e-12), 0.0, 1.0) * judged
    level = np.clip((heat_map - pixel_threshold) / max(high - pixel_threshold, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((128 + 127 * level).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    image = image * (1.0 - alpha[..., None]) + heat * alpha[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)

    size = view_size(geometry.frame, view_width)
    scale = size[0] / geometry.frame[0]
    if size != geometry.frame:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    thick = max(1, round(2 * size[0] / 640))
    if anomalous:
        mask = geometry.to_frame(defect_mask(anomaly_map, pixel_threshold))
        if size != geometry.frame:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, OUTLINE_BGR, thick)
    if geometry.roi != geometry.judged:
        _rectangle(image, geometry.roi, scale, ROI_BGR, max(1, thick // 2))
    _rectangle(image, geometry.judged, scale, JUDGED_BGR, thick)
    _header(image, score, anomalous, threshold, fps)
    return image


def _rectangle(
    image: np.ndarray, box: tuple[int, int, int, int], scale: float, colour: tuple[int, int, int], thickness: int
) -> None:
    x, y, w, h = (round(v * scale) for v in box)
    cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, thickness)


def _header(image: np.ndarray, score: float, anomalous: bool, threshold: float, fps: float | None) -> None:
    """Two text lines on a darkened band over the top rows of ``image``: the verdict and score, the threshold and
    frame rate. Inside the frame, so a saved video or a window is the camera's size, not taller."""
    font = max(0.45, 0.55 * image.shape[1] / 640)
    height = min(round(HEADER * font / 0.55), image.shape[0])
    header = image[:height]
    header[:] = (header * (1.0 - HEADER_SHADE)).astype(np.uint8)
    colour = ANOMALY_BGR if anomalous else OK_BGR
    cv2.putText(
        header,
        f"{'ANOMALY' if anomalous else 'OK'}  score {score:.5f}",
        (6, round(0.42 * height)),
        cv2.FONT_HERSHEY_SIMPLEX,
        font,
        colour,
        max(1, round(font)),
        cv2.LINE_AA,
    )
    line2 = f"threshold {threshold:.5f}" + (f"   {fps:.1f} FPS" if fps else "")
    cv2.putText(
        header, line2, (6, round(0.86 * height)), cv2.FONT_HERSHEY_SIMPLEX, 0.82 * font, (220, 220, 220), 1, cv2.LINE_AA
    )


def preview(frame_rgb: np.ndarray, geometry: Geometry) -> np.ndarray:
    """One frame with the region of interest and the judged area drawn on it: to choose ``--roi``."""
    image = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    judged = np.zeros(image.shape[:2], bool)
    x, y, w, h = geometry.judged
    judged[y : y + h, x : x + w] = True
    image[~judged] = (image[~judged] * DIM).astype(np.uint8)
    thick = max(1, round(2 * geometry.frame[0] / 640))
    _rectangle(image, geometry.roi, 1.0, ROI_BGR, thick)
    _rectangle(image, geometry.judged, 1.0, JUDGED_BGR, thick)
    width, height = geometry.frame
    rx, ry, rw, rh = geometry.roi
    font = max(0.45, 0.55 * width / 640)
    lines = [
        f"frame {width}x{height}; --roi {rx},{ry},{rw},{rh} (grey)",
        f"judged: {x},{y} {w}x{h} (outlined, rest dimmed)",
    ]
    for i, line in enumerate(lines):
        org = (8, round((i + 1) * 30 * font / 0.55))
        cv2.putText(image, line, org, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), max(2, round(3 * font)), cv2.LINE_AA)
        cv2.putText(image, line, org, cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), max(1, round(font)), cv2.LINE_AA)
    return image
