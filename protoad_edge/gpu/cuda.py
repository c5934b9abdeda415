"""A tiny layer over cuda-python's runtime API: pinned host arrays, device buffers, one stream, events.

NVIDIA's TensorRT samples use cuda-python instead of pycuda (which compiles from source and often
fails on a Jetson). cuda-python returns ``(error, value...)`` tuples; :func:`check` turns an error
into a :class:`ProtoADError` naming the CUDA error, so callers never look at error codes.
Nothing is imported until first use: this module loads on machines without CUDA.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import ProtoADError

_cudart: Any = None
# The CUDA majors with an extra in setup.cfg (gpu-cu12, gpu-cu13) that pins cuda-python and TensorRT to them.
CUDA_EXTRAS = (12, 13)


def cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime
        except ImportError:
            try:
                from cuda import cudart as runtime  # type: ignore[no-redef]
            except ImportError:
                raise ProtoADError(
                    "cuda-python is not installed (needed for the TensorRT backend): pip install "
                    "'protoad-edge[gpu-cu12]', or [gpu-cu13] with a CUDA 13 driver"
                ) from None
        _cudart = runtime
    return _cudart


def check(result: tuple, what: str) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple; raise ProtoADError naming the CUDA error."""
    rt = cudart()
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise ProtoADError(f"CUDA {what} failed: {error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def error_text(err: Any) -> str:
    rt = cudart()
    name = rt.cudaGetErrorName(err)[1]
    text = rt.cudaGetErrorString(err)[1]
    return (
        f"{name.decode() if isinstance(name, bytes) else name} ({text.decode() if isinstance(text, bytes) else text})"
    )


def require_gpu(device: int = 0) -> None:
    """Fail with one clear line where there is no usable GPU (no driver, no device, wrong index)."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        raise ProtoADError(f"no usable CUDA GPU: {error_text(err)}: {driver_mismatch()}")
    if err != rt.cudaError_t.cudaSuccess:
        raise ProtoADError(f"no usable CUDA GPU: {error_text(err)}")
    if not 0 <= device < count:
        raise ProtoADError(f"no CUDA device {device}: this machine has {count}")
    check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")


def cuda_version(encoded: int) -> str:
    """CUDA's version encoding: 12020 -> '12.2'."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def driver_mismatch() -> str:
    """Why the driver is "insufficient", and the fix: cuda-python's major must not exceed the driver's CUDA.

    ``cuda-python>=12`` lets pip pick 13.x, whose runtime needs a CUDA 13 driver; JetPack 6 and drivers
    older than R580 support CUDA 12 at most. The driver reports 0 when there is none at all.
    """
    rt = cudart()
    driver = rt.cudaDriverGetVersion()[1] or 0
    runtime = rt.cudaRuntimeGetVersion()[1] or 0
    if not driver:
        return "no NVIDIA driver was found (cudaDriverGetVersion reports none): install the GPU's driver"
    need, have = cuda_version(runtime), cuda_version(driver)
    if runtime // 1000 > driver // 1000 and driver // 1000 in CUDA_EXTRAS:
        fix = (
            f"install the cuda-python (and TensorRT) of the driver's CUDA: pip install "
            f"'protoad-edge[gpu-cu{driver // 1000}]', or update the driver"
        )
    else:
        fix = f"update the driver to one for CUDA {need}"
    return f"the NVIDIA driver supports CUDA {have}, and this cuda-python's runtime needs CUDA {need}; {fix}"


def device_name(device: int = 0) -> str:
    """The GPU's name as the driver reports it (recorded beside a TensorRT plan: plans are not portable)."""
    require_gpu(device)
    prop = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()


class HostDeviceBuffer:
    """A pinned (page-locked) host array and a device buffer of the same size.

    Pinned memory lets the copies run asynchronously on the stream and at full bus speed.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> None:
        rt = cudart()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.host_ptr = 0
        self.device = 0
        self.host_ptr = int(check(rt.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes} bytes)"))
        try:
            self.device = int(check(rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes} bytes)"))
        except ProtoADError:
            self.free()
            raise
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)

    def free(self) -> None:
        """Release both buffers (idempotent)."""
        rt = cudart()
        self.host = np.empty((0,), self.dtype)
        if self.device:
            rt.cudaFree(self.device)
            self.device = 0
        if self.host_ptr:
            rt.cudaFreeHost(self.host_ptr)
            self.host_ptr = 0


class Stream:
    """One CUDA stream with async copies of (leading parts of) :class:`HostDeviceBuffer` and events."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        """The raw handle, as TensorRT's ``execute_async_v3(stream_handle)`` takes it."""
        return int(self.handle)

    def to_device(self, buf: HostDeviceBuffer, nbytes: int | None = None) -> None:
        rt = cudart()
        n = buf.nbytes if nbytes is None else nbytes
        check(
            rt.cudaMemcpyAsync(buf.device, buf.host_ptr, n, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle),
            "host-to-device copy",
        )

    def to_host(self, buf: HostDeviceBuffer, nbytes: int | None = None) -> None:
        rt = cudart()
        n = buf.nbytes if nbytes is None else nbytes
        check(
            rt.cudaMemcpyAsync(buf.host_ptr, buf.device, n, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle),
            "device-to-host copy",
        )

    def record(self, event: Event) -> None:
        check(cudart().cudaEventRecord(event.handle, self.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None


class Event:
    """A CUDA event: GPU-side timestamps, so stage timings cost no host synchronisation per stage."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def ms_since(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (both recorded, stream synchronised)."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaEventDestroy(self.handle)
            self.handle = None
