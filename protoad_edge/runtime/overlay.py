"""What the operator sees: the anomaly map as a heat overlay on the model's crop, the defect outline,
the score, the verdict and the frame rate.

The overlay is drawn on the centre crop the model actually judged, not mapped back onto the full
frame: the map says nothing about the borders the crop cut away, and showing them uncoloured
would suggest they had been inspected. The crop is enlarged (nearest pixel multiple) so the text
stays legible even for small models.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ..decision import defect_mask

MIN_VIEW = 320  # px: the crop is enlarged to at least this width
HEADER = 44  # px: two text lines above the image
ALPHA = 0.45  # heat map opacity
# Fixed colour scale per model, so one colour means one score in every frame: blue up to half the
# threshold, red from 1.25 x the threshold. Per-frame auto-scaling would paint a good part's
# harmless maximum as red as a real defect.
COLOUR_LOW, COLOUR_HIGH = 0.5, 1.25
OK_BGR, ANOMALY_BGR, OUTLINE_BGR = (80, 200, 80), (40, 40, 230), (255, 255, 255)


def view_scale(crop: int) -> int:
    """Integer enlargement so the view is at least MIN_VIEW wide and even-sized (video codecs need it)."""
    scale = max(1, math.ceil(MIN_VIEW / crop))
    return scale + 1 if (crop * scale) % 2 else scale


def render(
    crop_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    score: float,
    anomalous: bool,
    threshold: float,
    pixel_threshold: float,
    fps: float | None = None,
) -> np.ndarray:
    """BGR image: a header (verdict, score, threshold, FPS) over the enlarged crop with the heat map;
    anomalous frames also get the outline of their defect pixels."""
    size = crop_rgb.shape[0]
    scale = view_scale(size)
    view = size * scale
    base = cv2.resize(cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR), (view, view), interpolation=cv2.INTER_NEAREST)
    low, high = COLOUR_LOW * threshold, COLOUR_HIGH * threshold
    level = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.resize(heat, (view, view), interpolation=cv2.INTER_LINEAR)
    image = cv2.addWeighted(base, 1.0 - ALPHA, heat, ALPHA, 0.0)
    if anomalous:
        mask = cv2.resize(defect_mask(anomaly_map, pixel_threshold), (view, view), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, OUTLINE_BGR, 2)
    header = np.zeros((HEADER, view, 3), np.uint8)
    colour = ANOMALY_BGR if anomalous else OK_BGR
    cv2.putText(header, f"{'ANOMALY' if anomalous else 'OK'}  score {score:.4f}", (6, 18),
                cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 1, cv2.LINE_AA)
    line2 = f"threshold {threshold:.4f}" + (f"   {fps:.1f} FPS" if fps else "")
    cv2.putText(header, line2, (6, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1, cv2.LINE_AA)
    return np.vstack([header, image])
