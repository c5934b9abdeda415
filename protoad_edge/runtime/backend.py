"""One small interface for every inference backend, and the factory that picks one.

A backend takes the network input (float32 NCHW RGB 0-255 crops, see ``preprocess.to_batch``)
and returns the anomaly maps [N,H,W] and image scores [N] as numpy arrays.
"""

from __future__ import annotations

import importlib.util
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import ProtoADError
from ..metadata import ModelInfo, sidecar_path
from ..preprocess import to_batch
from ..progress import progress_bar

BACKENDS = ("auto", "ort", "trt")
# Model files per backend, preferred first. ``NAME.fp16.onnx`` is the strongly typed graph a TensorRT 11
# FP16 build starts from, so a plain ``NAME.onnx`` beats it.
MODEL_SUFFIXES = {"trt": (".plan", ".engine"), "ort": (".onnx", ".fp16.onnx")}
# The sidecar fields that must equal the ONNX metadata: they decide the input, the network and the verdict.
# TensorRT build facts and the free-form ``build`` dict may legitimately be added to the sidecar later.
IDENTITY_FIELDS = (
    "format", "category", "resize", "crop", "backbone", "weights", "feature_upsample", "num_prototypes",
    "blur_sigma", "input_name", "outputs", "opset", "seed", "image_threshold", "pixel_threshold",
)


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
    is_plan = path.name.endswith(MODEL_SUFFIXES["trt"])
    if backend == "auto":
        backend = "trt" if is_plan else "ort"
    if backend == "ort" and is_plan:
        raise ProtoADError(f"{path} is a TensorRT plan: the ort backend runs .onnx files (use --backend trt)")
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


def find_model(folder: str | os.PathLike = "models", backend: str = "auto") -> Path:
    """The one model in ``folder`` that ``backend`` can run, for when no ``--model`` is given.

    Per model name, ``auto`` takes the TensorRT plan when TensorRT is installed (the plan was built
    for this GPU and is the fastest path) and the ONNX otherwise (a plan is useless without TensorRT).
    Several model names is an error that lists them: guessing which product line to inspect is unsafe.
    """
    folder = Path(folder)
    if backend not in BACKENDS:
        raise ProtoADError(f"bad backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not folder.is_dir():
        raise ProtoADError(f"no --model given and no {folder}/ folder here: pass --model PATH")
    if backend == "auto":
        have_trt = importlib.util.find_spec("tensorrt") is not None
        order = (*MODEL_SUFFIXES["trt"], *MODEL_SUFFIXES["ort"]) if have_trt else MODEL_SUFFIXES["ort"]
    else:
        order = MODEL_SUFFIXES[backend]
    by_name: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        # ``x.fp16.onnx`` also ends with ``.onnx``: the longest matching suffix decides its rank.
        matches = [i for i, suffix in enumerate(order) if path.name.endswith(suffix)]
        if matches and path.is_file():
            rank = max(matches, key=lambda i: len(order[i]))
            by_name.setdefault(sidecar_path(path).stem, []).append((rank, path))
    if not by_name:
        kinds = ", ".join(f"*{s}" for s in order)
        raise ProtoADError(f"no --model given and no model ({kinds}) in {folder}/: pass --model PATH")
    best = sorted(min(found)[1] for found in by_name.values())
    if len(best) > 1:
        raise ProtoADError(f"several models in {folder}/, choose one with --model: {', '.join(str(p) for p in best)}")
    return best[0]


def check_sidecar(model: Path, info: ModelInfo) -> None:
    """A ``NAME.json`` beside the model must describe that model: a stale or swapped sidecar would make
    tools that read it (TensorRT plans, reports) disagree with what the runtime actually does."""
    path = sidecar_path(model)
    if not path.exists():
        return
    side = ModelInfo.load_json(path)
    differ = []
    for name in IDENTITY_FIELDS:
        a, b = getattr(side, name), getattr(info, name)
        if isinstance(a, float) and isinstance(b, float):
            same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
        else:
            same = a == b
        if not same:
            differ.append(f"{name} {a!r} vs {b!r}")
    if differ:
        raise ProtoADError(
            f"model sidecar {path} does not match {model} ({'; '.join(differ)}): "
            "restore the pair the build wrote, or delete the stale sidecar"
        )


def load_sidecar(model: Path) -> ModelInfo:
    """The ``NAME.json`` beside a model file (required for plans; ONNX also carries it inside)."""
    return ModelInfo.load_json(sidecar_path(model))


def run_maps(backend: Backend, crops: np.ndarray, batch_size: int, label: str, progress: bool) -> np.ndarray:
    """Anomaly maps [N,S,S] of ``crops`` through the exported graph."""
    maps = np.empty(crops.shape[:3], dtype=np.float32)
    starts = list(range(0, len(crops), batch_size))
    for start in progress_bar(starts, label, progress):
        maps[start : start + batch_size] = backend.infer(to_batch(crops[start : start + batch_size]))[0]
    return maps
