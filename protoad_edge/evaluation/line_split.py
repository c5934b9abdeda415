"""A labelled split from the line's own frames: folders (any SOURCE) an operator sorted into normal and defect.

Used where a labelled test split is: the threshold trade (``protoad-eval --set-threshold`` with ``--normal`` and
``--defect``) and the accuracy check of a teach (``protoad-teach --check-normal/--check-defect``). The frames carry
no masks, so only image-level figures exist for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..builder.datasets import Sample
from ..errors import ProtoADError
from ..preprocess import Preprocess
from ..runtime.backends.base import BackendOptions
from ..runtime.backends.registry import AUTO, choose, locate
from ..runtime.sources.frames import read_frames
from .evaluate import CategoryResult, LabelledSplit, _timed_maps, compute_metrics

KIND = "line"


def load_line_split(
    normal: list[str], defect: list[str], pre: Preprocess, flags: str = "--normal/--defect"
) -> LabelledSplit:
    """The frames of ``normal`` and ``defect`` (SOURCEs), cut by ``pre``, labelled 0 and 1."""
    if not normal or not defect:
        raise ProtoADError(
            f"{flags}: an image-level trade needs frames of both kinds (got {len(normal)} normal and "
            f"{len(defect)} defect sources)"
        )
    good = read_frames(normal, pre, what="normal source")
    bad = read_frames(defect, pre, what="defect source")
    samples = [Sample(Path(label), 0, "good") for label in good.labels] + [
        Sample(Path(label), 1, "defect") for label in bad.labels
    ]
    crops = np.concatenate([good.crops, bad.crops])
    labels = np.array([s.label == 1 for s in samples])
    return LabelledSplit(
        category="line",
        kind=KIND,
        root=Path(normal[0]),
        samples=samples,
        crops=crops,
        masks=np.zeros(crops.shape[:3], bool),
        labels=labels,
        pixel_usable=~labels,
    )


def describe(normal: list[str], defect: list[str], split: LabelledSplit) -> str:
    """The frames in words (recorded with a threshold chosen on them)."""
    counts = split.counts
    return (
        f"{counts['normal']} normal and {counts['anomalous']} defect frames sorted on the line (normal: "
        f"{', '.join(normal)}; defect: {', '.join(defect)})"
    )


def evaluate_line(
    model: str | os.PathLike,
    normal: list[str],
    defect: list[str],
    backend: str = AUTO,
    batch_size: int = 8,
    options: BackendOptions | None = None,
    progress: bool = False,
) -> CategoryResult:
    """``evaluate_category`` on frames sorted on the line instead of a dataset's test split (image level only)."""
    entry, path = choose(*locate(model), backend)
    with entry.load()(path, options or BackendOptions()) as opened:
        split = load_line_split(normal, defect, opened.info.preprocess)
        maps, seconds = _timed_maps(opened, split, batch_size, progress)
        label, info = opened.describe().line(), opened.info
    return CategoryResult(KIND, KIND, path, label, info, split, maps, compute_metrics(split, maps), {"infer": seconds})
