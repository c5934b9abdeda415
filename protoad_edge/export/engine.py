"""The engine step of ``protoad-export``: when to build ``NAME.plan`` for a bundle, and how to report it.

``--engine auto`` builds where TensorRT and a GPU exist and otherwise says why not and how to
build later on the target; ``yes`` insists (an error names what is missing); ``no`` skips.
``--from-onnx`` builds for an existing bundle without torch (the Jetson case).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ProtoADError
from ..runtime import cuda_memory as cm
from ..runtime.trt_backend import import_tensorrt
from .tensorrt import DEFAULT_WORKSPACE_MIB, EngineBuild, build_engine

ENGINE_CHOICES = ("auto", "yes", "no")


def engine_unavailable(device: int = 0) -> str | None:
    """Why no engine can be built here (no TensorRT, no cuda-python, no GPU), or None."""
    try:
        import_tensorrt()
        cm.require_gpu(device)
    except ProtoADError as exc:
        return str(exc)
    return None


def engine_for_bundle(onnx_path: str | os.PathLike, engine: str = "auto", *, precision: str = "fp16",
                      opt_batch: int = 1, max_batch: int | None = None, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                      device: int = 0, log: Callable[[str], None] = print) -> EngineBuild | None:
    """Build the bundle's engine as ``engine`` asks; None when skipped (the reason is logged for ``auto``)."""
    if engine not in ENGINE_CHOICES:
        raise ProtoADError(f"bad --engine {engine!r}: choose one of {', '.join(ENGINE_CHOICES)}")
    if engine == "no":
        return None
    if engine == "auto":
        why = engine_unavailable(device)
        if why:
            log(f"TensorRT engine skipped: {why}. Build it on the target with: protoad-export --from-onnx {onnx_path}")
            return None
    return build_engine(onnx_path, precision=precision, opt_batch=opt_batch, max_batch=max_batch,
                        workspace_mib=workspace_mib, device=device, log=log)


def engine_from_onnx(onnx_path: str | os.PathLike, engine: str = "auto", **options: Any) -> EngineBuild:
    """``--from-onnx PATH``: the engine is the only thing to make, so ``auto`` means ``yes``.

    ``options`` are :func:`build_engine`'s (precision, opt_batch, max_batch, workspace_mib, device, log).
    """
    if engine not in ENGINE_CHOICES:
        raise ProtoADError(f"bad --engine {engine!r}: choose one of {', '.join(ENGINE_CHOICES)}")
    if engine == "no":
        raise ProtoADError("--from-onnx only builds a TensorRT engine: drop --engine no")
    if not Path(onnx_path).is_file():
        raise ProtoADError(f"--from-onnx {onnx_path}: no such file")
    return build_engine(onnx_path, **options)


def engine_summary(build: EngineBuild) -> str:
    """One summary line: where the plan is and what it is bound to."""
    return (f"{build.plan} (TensorRT {build.tensorrt_version}, {build.precision}, {build.gpu_name}, "
            f"batch 1..{build.max_batch}, opt {build.opt_batch}; built in {build.seconds:.1f} s)")
