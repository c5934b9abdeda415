"""TensorRT's import, version and process-wide logger, for the engine build and the runtime alike."""

from __future__ import annotations

from typing import Any

from ..errors import ProtoADError

_LOGGER: Any = None


def import_tensorrt() -> Any:
    """``import tensorrt`` with a message that says where to get it."""
    try:
        import tensorrt
    except ImportError:
        raise ProtoADError(
            "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); "
            "elsewhere pip install tensorrt; or run the ONNX model with --backend ort"
        ) from None
    return tensorrt


def tensorrt_major(version: str) -> int:
    """``'10.3.0'`` -> 10. TensorRT 11 removed the FP16 builder flag (strongly typed networks only)."""
    return int(version.split(".")[0])


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
