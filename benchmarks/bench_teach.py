"""Day two (issue 27): a normal variant of the parts the model was built on - a changed lamp - is flagged, and
``protoad-teach`` on a few of the line's own frames of it makes it normal again. Figures and the command:
benchmarks/RESULTS.md, section "Teaching a deployed model".
"""

from __future__ import annotations

import numpy as np

# The lamp change of the issue: a gamma of 0.75, 8 % brighter, a warmer white balance.
GAMMA, GAIN, WHITE = 0.75, 1.08, (1.06, 1.0, 0.92)


def lighting_change(rgb: np.ndarray, gamma: float = GAMMA, gain: float = GAIN,
                    white: tuple[float, float, float] = WHITE) -> np.ndarray:
    """``rgb`` (uint8, ..., 3) under the changed lamp: gamma, then gain and white balance, clipped, rounded."""
    x = (rgb.astype(np.float32) / 255.0) ** gamma * gain * np.asarray(white, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
