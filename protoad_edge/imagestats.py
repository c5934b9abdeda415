"""An image's own statistics, measured the same way on the training images (the build records their ranges in the
bundle, ``ModelInfo.built_on``) and on every frame a run judges (``runtime.health``), on what the model sees: the
square network input of the judged area.

- brightness: the mean grey level (0-255): a lamp, the exposure, a lens cap;
- contrast: the standard deviation of the grey levels;
- sharpness: the variance of the Laplacian over the variance of the grey levels (plus 1, so a flat image is 0, not
  noise over nothing): fine detail per unit of contrast. Divided by the contrast so a dimmer lamp is not taken for
  blur; it falls when the lens is out of focus (and when the camera moved closer: the detail grows coarser).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

STATS = ("brightness", "contrast", "sharpness")


@dataclass(frozen=True)
class ImageStats:
    brightness: float
    contrast: float
    sharpness: float


def image_stats(rgb: np.ndarray) -> ImageStats:
    """The statistics of one HxWx3 uint8 RGB image."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean, std = cv2.meanStdDev(grey)
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    _, detail = cv2.meanStdDev(laplacian)
    contrast = float(std[0, 0])
    return ImageStats(float(mean[0, 0]), contrast, float(detail[0, 0]) ** 2 / (contrast**2 + 1.0))


def ranges(images: Iterable[np.ndarray]) -> dict[str, Any]:
    """{stat: [min, max]} over ``images`` (the bundle's record of its normal images)."""
    measured = [image_stats(image) for image in images]
    if not measured:
        return {}
    return {
        name: [round(min(getattr(m, name) for m in measured), 6), round(max(getattr(m, name) for m in measured), 6)]
        for name in STATS
    }
