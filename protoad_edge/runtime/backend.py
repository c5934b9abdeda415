"""One small interface for every inference backend, and the factory that picks one.

A backend takes the network input (float32 NCHW RGB 0-255 crops, see ``preprocess.to_batch``)
and returns the anomaly maps [N,H,W] and image scores [N] as numpy arrays.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import ProtoADError
from ..metadata import ModelInfo, sidecar_path

BACKENDS = ("auto", "ort", "trt")


class Backend(ABC):
    """Run an exported ProtoAD model; ``info`` carries preprocessing and thresholds."""

    name: str = ""
    info: ModelInfo

    @abstractmethod
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N,3,S,S] RGB 0-255 -> (maps float32 [N,S,S], scores float32 [N])."""

    def close(self) -> None:
        """Release device resources (no-op for backends that hold none)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backend(model: str | os.PathLike, backend: str = "auto", **options: object) -> Backend:
    """``auto`` picks ``trt`` for a ``.plan`` and ``ort`` for an ``.onnx``."""
    path = Path(model)
    if backend not in BACKENDS:
        raise ProtoADError(f"bad backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise ProtoADError(f"model not found: {path}")
    if backend == "auto":
        backend = "trt" if path.suffix in (".plan", ".engine") else "ort"
    if backend == "ort":
        from .ort_backend import OrtBackend

        return OrtBackend(path, **options)  # type: ignore[arg-type]
    from .trt_backend import TrtBackend

    return TrtBackend(path, **options)  # type: ignore[arg-type]


def check_batch(batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Validate the input once, at the edge, so backends can trust it."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (3, info.crop, info.crop):
        raise ProtoADError(f"model {info.category!r} expects input [N,3,{info.crop},{info.crop}], got {list(batch.shape)}")
    return batch


def load_sidecar(model: Path) -> ModelInfo:
    """The ``NAME.json`` beside a model file (required for plans; ONNX also carries it inside)."""
    return ModelInfo.load_json(sidecar_path(model))
