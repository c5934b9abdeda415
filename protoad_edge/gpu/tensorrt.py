"""TensorRT's import, version and process-wide logger, for the engine build and the runtime alike."""

from __future__ import annotations

import re
from typing import Any, Callable

from ..errors import ProtoADError

_LOGGER: Any = None

ALTERNATIVE = "or run the ONNX model with --backend ort"


def import_tensorrt() -> Any:
    """``import tensorrt`` with a message that says where to get it, or why the installed one cannot load.

    Only a missing top-level ``tensorrt`` means "not installed": pip's bindings import ``tensorrt_bindings``
    and ``tensorrt_libs``, which load libnvinfer and friends, and fail with ImportError or OSError when those
    libraries are missing or of another CUDA or TensorRT version. Their message names the library.
    """
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            raise _cannot_load(exc) from None
        raise ProtoADError(
            "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); elsewhere "
            f"pip install 'protoad-edge[gpu-cu12]' (or [gpu-cu13] with a CUDA 13 driver); {ALTERNATIVE}"
        ) from None
    except (ImportError, OSError) as exc:
        raise _cannot_load(exc) from None
    return tensorrt


def _cannot_load(exc: BaseException) -> ProtoADError:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ProtoADError(
        f"TensorRT's Python module is installed but cannot load: {detail}. Its libraries are missing or of another "
        "TensorRT or CUDA version: reinstall one TensorRT (pip install 'protoad-edge[gpu-cu12]' or [gpu-cu13]; on a "
        f"Jetson, JetPack's python3-libnvinfer), or put its libraries on LD_LIBRARY_PATH; {ALTERNATIVE}"
    )


def tensorrt_version(version: str) -> tuple[int, int]:
    """``'10.16.1.11'`` -> (10, 16): the FP16 path depends on the minor too (strongly typed from 10.12)."""
    found = re.match(r"(\d+)(?:\.(\d+))?", version)
    if found is None:
        raise ProtoADError(f"cannot read TensorRT's version {version!r}")
    return int(found.group(1)), int(found.group(2) or 0)


def create_with_logger(trt: Any, factory: Callable[[Any], Any], what: str) -> Any:
    """``trt.Builder(logger)`` or ``trt.Runtime(logger)``, with TensorRT's own reason when it cannot.

    When TensorRT cannot start (no usable GPU, a driver older than its CUDA, missing libraries) its factory
    returns nullptr, which pybind11 turns into ``TypeError: pybind11::init(): factory function returned
    nullptr``; the reason is only in what TensorRT logged.
    """
    logger = trt_logger(trt)
    try:
        made = factory(logger)
    except TypeError as exc:
        if "nullptr" not in str(exc):
            raise
        made = None
    if made is None:
        detail = logger.last_error("it logged no reason; check the GPU driver and the CUDA version TensorRT needs")
        raise ProtoADError(f"TensorRT {trt.__version__} could not create its {what}: {detail}")
    return made


def trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger that keeps warnings and errors, so failures can quote them.

    TensorRT treats the logger as a singleton: every Builder and Runtime gets this same one.
    """
    global _LOGGER
    if _LOGGER is None:

        class CollectingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.warnings: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if int(severity) <= int(trt.ILogger.ERROR):
                    self.errors.append(msg)
                elif int(severity) == int(trt.ILogger.WARNING):
                    self.warnings.append(msg)

            def clear(self) -> None:
                self.errors.clear()
                self.warnings.clear()

            def last_error(self, default: str) -> str:
                return self.errors[-1] if self.errors else default

        _LOGGER = CollectingLogger()
    return _LOGGER
