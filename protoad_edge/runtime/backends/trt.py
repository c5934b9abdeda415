"""TensorRT backend: runs ``NAME.plan`` through TensorRT's name-based tensor API and cuda-python.

Buffers (pinned host + device) are allocated once for the engine's largest batch; each call
copies the batch in, runs ``execute_async_v3`` and copies maps and scores out on one stream.
A plan only runs on the TensorRT version and GPU it was built with, so the sidecar's record of
both is checked before TensorRT sees the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import Bundle
from ...errors import ProtoADError
from ...gpu import cuda as cm
from ...gpu.tensorrt import create_with_logger, import_tensorrt, trt_logger
from ...metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .base import Backend, BackendFacts, BackendOptions, check_batch


def plan_mismatch(info: ModelInfo, tensorrt_version: str, gpu_name: str) -> str | None:
    """Why a plan described by ``info`` cannot run on this TensorRT/GPU, or None if it can."""
    if not info.tensorrt_version or not info.gpu_name:
        return "its sidecar records no TensorRT version or GPU (not built by protoad-export)"
    problems = []
    if info.tensorrt_version != tensorrt_version:
        problems.append(
            f"it was built with TensorRT {info.tensorrt_version}, this machine has TensorRT {tensorrt_version}"
        )
    if info.gpu_name != gpu_name:
        problems.append(f"it was built on GPU {info.gpu_name!r}, this machine has {gpu_name!r}")
    return "; ".join(problems) or None


@dataclass
class StageTimes:
    """GPU-side milliseconds of one ``infer`` call (summed over its chunks), from CUDA events."""

    batch: int
    h2d_ms: float
    compute_ms: float
    d2h_ms: float


class TrtBackend(Backend):
    """``options.timing`` records CUDA events around the copies and the compute (``stage_times``)."""

    name = "trt"

    def __init__(self, path: str | os.PathLike, options: BackendOptions | None = None) -> None:
        options = options or BackendOptions()
        path = Path(path)
        self.path = path
        bundle = Bundle.of(path)
        self.info = ModelInfo.load_json(bundle.sidecar)
        if options.device == "cpu":
            raise ProtoADError(f"{path}: a TensorRT plan runs on a GPU, not with --device cpu (use --backend ort)")
        trt = import_tensorrt()
        self.gpu = cm.device_name(0)
        self.tensorrt_version = trt.__version__
        why = plan_mismatch(self.info, trt.__version__, self.gpu)
        rebuild = f"protoad-export --from-onnx {bundle.onnx}"
        if why:
            raise ProtoADError(
                f"{path} cannot run here: {why}. TensorRT plans are not portable: "
                f"rebuild it on this machine with {rebuild}"
            )
        data = path.read_bytes()
        if not data:
            raise ProtoADError(f"{path} is empty: rebuild it with {rebuild}")
        self._logger = trt_logger(trt)
        self._logger.clear()
        self._runtime = create_with_logger(trt, trt.Runtime, "Runtime")
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ProtoADError(
                f"{path} is not a TensorRT {trt.__version__} plan this GPU can load (truncated, corrupt "
                f"or built elsewhere): {self._logger.last_error('no detail from TensorRT')}"
            )
        self.context = self.engine.create_execution_context()
        self.max_batch = self._check_io(trt)
        self.last_times: StageTimes | None = None
        timing = options.timing
        self._bound_batch = 0
        self.stream: cm.Stream | None = None
        self.buffers: dict[str, cm.HostDeviceBuffer] = {}
        self.events: list[cm.Event] = []
        try:
            self._allocate(timing)
        except BaseException:
            self.close()
            raise

    def _allocate(self, timing: bool) -> None:
        """Pinned host and device buffers for the largest batch, bound to the context once."""
        s, b = self.info.crop, self.max_batch
        self.stream = cm.Stream()
        shapes = {self.info.input_name: (b, 3, s, s), MAP_NAME: (b, 1, s, s), SCORE_NAME: (b,)}
        for name, shape in shapes.items():
            self.buffers[name] = cm.HostDeviceBuffer(shape)
            if not self.context.set_tensor_address(name, self.buffers[name].device):
                raise ProtoADError(f"{self.path}: TensorRT refused the buffer for tensor {name!r}")
        self.events = [cm.Event() for _ in range(4)] if timing else []

    def _check_io(self, trt: Any) -> int:
        """Check the plan's tensors against the sidecar; return the profile's largest batch."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = {
            self.info.input_name: trt.TensorIOMode.INPUT,
            MAP_NAME: trt.TensorIOMode.OUTPUT,
            SCORE_NAME: trt.TensorIOMode.OUTPUT,
        }
        for name, mode in want.items():
            if name not in names or self.engine.get_tensor_mode(name) != mode:
                raise ProtoADError(f"{self.path}: plan tensors {names} do not match the model's {list(want)}")
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise ProtoADError(
                    f"{self.path}: tensor {name!r} is {self.engine.get_tensor_dtype(name)}, expected float32"
                )
        shape = tuple(self.engine.get_tensor_shape(self.info.input_name))
        if shape[1:] != (3, self.info.crop, self.info.crop):
            raise ProtoADError(
                f"{self.path}: plan input {list(shape)} does not match the sidecar's crop {self.info.crop} "
                f"({Bundle.of(self.path).sidecar})"
            )
        return int(self.engine.get_tensor_profile_shape(self.info.input_name, 0)[2][0])

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(batch, self.info)
        n, s = len(batch), self.info.crop
        maps = np.empty((n, s, s), np.float32)
        scores = np.empty((n,), np.float32)
        times = np.zeros(3)
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            times += self._run(batch[start:stop])
            maps[start:stop] = self.buffers[MAP_NAME].host[: stop - start, 0]
            scores[start:stop] = self.buffers[SCORE_NAME].host[: stop - start]
        if self.events:
            self.last_times = StageTimes(n, *map(float, times))
        return maps, scores

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """One chunk (<= max batch) through the engine; returns [h2d, compute, d2h] ms (zeros without timing)."""
        k = len(chunk)
        image, amap, score = self.buffers[self.info.input_name], self.buffers[MAP_NAME], self.buffers[SCORE_NAME]
        if k != self._bound_batch:
            if not self.context.set_input_shape(self.info.input_name, (k, *chunk.shape[1:])):
                raise ProtoADError(f"{self.path}: TensorRT refused batch {k} (profile allows 1..{self.max_batch})")
            self._bound_batch = k
        image.host[:k] = chunk
        ev = self.events
        if ev:
            self.stream.record(ev[0])
        self.stream.to_device(image, k * image.nbytes // self.max_batch)
        if ev:
            self.stream.record(ev[1])
        if not self.context.execute_async_v3(self.stream.ptr):
            raise ProtoADError(
                f"{self.path}: TensorRT execution failed: {self._logger.last_error('no detail from TensorRT')}"
            )
        if ev:
            self.stream.record(ev[2])
        self.stream.to_host(amap, k * amap.nbytes // self.max_batch)
        self.stream.to_host(score, k * score.nbytes // self.max_batch)
        if ev:
            self.stream.record(ev[3])
        self.stream.synchronize()
        if not ev:
            return np.zeros(3)
        return np.array([ev[1].ms_since(ev[0]), ev[2].ms_since(ev[1]), ev[3].ms_since(ev[2])])

    def describe(self) -> BackendFacts:
        return BackendFacts(
            self.name,
            str(self.path),
            self.info.tensorrt_precision or "unknown",
            self.gpu,
            [f"TensorRT {self.tensorrt_version}"],
            {"max_batch": self.max_batch},
        )

    def stage_times(self) -> dict[str, float] | None:
        t = self.last_times
        return None if t is None else {"h2d": t.h2d_ms, "compute": t.compute_ms, "d2h": t.d2h_ms}

    def close(self) -> None:
        """Free the buffers, events and stream; drop the context and engine (idempotent)."""
        if self.stream is not None:
            self.stream.synchronize()
        self.context = None
        self.engine = None
        for buf in self.buffers.values():
            buf.free()
        self.buffers = {}
        for event in self.events:
            event.close()
        self.events = []
        if self.stream is not None:
            self.stream.close()
            self.stream = None
