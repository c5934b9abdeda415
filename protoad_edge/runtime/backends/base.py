"""One small interface for every inference backend: what it takes, what it returns, how it describes itself.

A backend takes the network input (float32 NCHW RGB 0-255 crops, see ``preprocess.to_batch``) and
returns the anomaly maps [N,H,W] and image scores [N] as numpy arrays. Which class runs which file
of a bundle is decided in ``protoad_edge.runtime.backends.registry`` (the registry), never here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ProtoADError
from ...metadata import ModelInfo
from ...preprocess import to_batch
from ...progress import progress_bar


@dataclass(frozen=True)
class BackendOptions:
    """The settings every backend accepts; each applies those that mean something to it (see its ``describe``)."""

    device: str = "auto"  # auto | cpu | cuda: ort uses only its CPU provider for cpu; trt needs a GPU
    threads: int = 0  # CPU threads (ort intra-op, torch); 0 = the library's default
    fp16: bool | None = None  # torch: None = FP16 on CUDA, FP32 on the CPU; ort's TensorRT provider: FP16 unless False
    timing: bool = False  # trt: CUDA events around the copies and the compute (``stage_times``)
    # Compute precision where a backend can lower it at run time (openvino: fp32, bf16, fp16); None = the backend's
    # full precision (FP32), never a reduced default. A reduced one must pass the accuracy gate
    # (evaluation.accuracy_gate).
    precision: str | None = None


@dataclass
class BackendFacts:
    """What actually ran: the backend, its file, precision and device, and backend-specific details."""

    name: str
    model: str
    precision: str
    device: str
    providers: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """``ort (CPUExecutionProvider, fp32)``: for logs and tables."""
        where = ", ".join(self.providers) if self.providers else self.device
        return f"{self.name} ({where}, {self.precision})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(ABC):
    """Run an exported ProtoAD model; ``info`` carries preprocessing and thresholds."""

    name: str = ""
    info: ModelInfo
    path: Path
    max_batch: int | None = None  # the largest batch one ``infer`` call runs at once (None: any)

    @abstractmethod
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N,3,S,S] RGB 0-255 -> (maps float32 [N,S,S], scores float32 [N])."""

    @abstractmethod
    def describe(self) -> BackendFacts:
        """What this backend runs, in which precision, on which device."""

    def stage_times(self) -> dict[str, float] | None:
        """Milliseconds of the last ``infer`` by stage (h2d / compute / d2h), where the backend measures them."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release device resources (no-op for backends that hold none)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch(batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Validate the input once, at the edge, so backends can trust it."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (3, info.crop, info.crop):
        raise ProtoADError(
            f"model {info.category!r} expects input [N,3,{info.crop},{info.crop}], got {list(batch.shape)}"
        )
    return batch


def run_maps(
    backend: Backend, crops: np.ndarray, batch_size: int, label: str = "", progress: bool = False
) -> np.ndarray:
    """Anomaly maps [N,S,S] of uint8 [N,S,S,3] ``crops``, ``batch_size`` at a time."""
    maps = np.empty(crops.shape[:3], dtype=np.float32)
    starts = list(range(0, len(crops), batch_size))
    sizes = [min(batch_size, len(crops) - start) for start in starts]
    for start in progress_bar(starts, label, progress, unit="images", sizes=sizes):
        maps[start : start + batch_size] = backend.infer(to_batch(crops[start : start + batch_size]))[0]
    return maps
