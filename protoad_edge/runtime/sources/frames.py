"""Frames read from any SOURCE ``protoad-run`` takes, through a bundle's own preprocessing (its region of interest
and fit), so a frame taught or sorted on the line is cut exactly as the line cuts it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ProtoADError
from ...preprocess import Geometry, Preprocess
from .source import open_source, parse_source


@dataclass
class Frames:
    """Network inputs of frames, with where each came from."""

    crops: np.ndarray  # uint8 [N, S, S, 3] RGB
    labels: list[str]  # file path, or "SOURCE#index" for a video or stream
    geometries: list[Geometry]  # where each input lies in its frame


def read_frames(sources: list[str], pre: Preprocess, max_frames: int | None = None, what: str = "SOURCE") -> Frames:
    """Every frame of ``sources`` (a live one needs ``max_frames``: it has no end), at most ``max_frames`` of each."""
    crops, labels, geometries = [], [], []
    for text in sources:
        spec = parse_source(text)
        if spec.live and max_frames is None:
            raise ProtoADError(f"{what} {spec.name} is live and has no end: give --max-frames")
        source = open_source(spec)
        try:
            index = 0
            while max_frames is None or index < max_frames:
                got = source.read()
                if got is None:
                    break
                rgb, label = got
                try:
                    geometries.append(pre.geometry(rgb.shape[1], rgb.shape[0]))
                except ProtoADError as exc:
                    raise ProtoADError(f"{label}: {exc}") from None
                crops.append(pre(rgb))
                labels.append(label if spec.kind in ("folder", "image") else f"{spec.name}#{index}")
                index += 1
        finally:
            source.close()
        if index == 0:
            raise ProtoADError(f"{what} {spec.name}: no frame could be read")
    return Frames(np.stack(crops), labels, geometries)
