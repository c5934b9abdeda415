"""What the build's normal images were like (``ModelInfo.built_on``), so a run can tell when the frames it judges
stop looking like them (``runtime.health``): the judged region's size, the images' own statistics, and the scores
of the held-out normal images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..imagestats import ranges
from ..preprocess import Preprocess
from .datasets import Sample

SCORE_QUANTILES = {"p05": 5, "p50": 50, "p95": 95}


def built_on(
    samples: Sequence[Sample], crops: Iterable[np.ndarray], pre: Preprocess, scores: np.ndarray, held_out: bool
) -> dict[str, Any]:
    """The record of the normal images ``samples`` (decoded and cropped: ``crops``) and the ``scores`` thresholds
    were set on (the held-out images', or with ``held_out`` False the training images')."""
    sizes = []
    for sample in samples:
        with Image.open(sample.path) as image:  # the header only: the size without decoding again
            sizes.append(pre.region(*image.size)[2:])
    quantiles = np.percentile(np.asarray(scores, np.float64), list(SCORE_QUANTILES.values())) if len(scores) else []
    return {
        "images": len(samples),
        "region": {
            "min": [min(w for w, _ in sizes), min(h for _, h in sizes)],
            "max": [max(w for w, _ in sizes), max(h for _, h in sizes)],
        },
        **ranges(crops),
        "scores": {
            "images": "held-out" if held_out else "training",
            "count": len(scores),
            **{name: round(float(q), 8) for name, q in zip(SCORE_QUANTILES, quantiles)},
        },
    }
