"""The engine step of ``protoad-export``: when to build ``NAME.plan`` for a bundle, and how to report it.

``--tensorrt auto`` builds where TensorRT and a GPU exist and otherwise says why not and how to
build later on the target; ``yes`` insists (an error names what is missing); ``no`` skips.
``--from-onnx`` builds for an existing bundle without torch (the Jetson case).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..constants import TENSORRT_CHOICES
from ..errors import ProtoADError
from ..gpu import cuda as cm
from ..gpu.tensorrt import import_tensorrt
from .tensorrt import DEFAULT_WORKSPACE_MIB, EngineBuild, build_engine


def engine_unavailable(device: int = 0) -> str | None:
    """Why no engine can be built here (no TensorRT, no cuda-python, no GPU), or None."""
    try:
        import_tensorrt()
        cm.require_gpu(device)
    except ProtoADError as exc:
        return str(exc)
    return None


def engine_for_bundle(
    onnx_path: str | os.PathLike,
    tensorrt: str = "auto",
    *,
    precision: str = "fp16",
    opt_batch: int = 1,
    max_batch: int | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    device: int = 0,
    log: Callable[[str], None] = print,
) -> EngineBuild | None:
    """Build the bundle's engine as ``tensorrt`` asks; None when skipped (the reason is logged for ``auto``)."""
    _check_choice(tensorrt)
    if tensorrt == "no":
        return None
    if tensorrt == "auto":
        why = engine_unavailable(device)
        if why:
            log(f"TensorRT engine skipped: {why}. Build it on the target with: protoad-export --from-onnx {onnx_path}")
            return None
    return build_engine(
        onnx_path,
        precision=precision,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=workspace_mib,
        device=device,
        log=log,
    )


def engine_from_onnx(onnx_path: str | os.PathLike, tensorrt: str = "auto", **options: Any) -> EngineBuild:
    """``--from-onnx PATH``: the engine is the only thing to make, so ``auto`` means ``yes``.

    ``options`` are :func:`build_engine`'s (precision, opt_batch, max_batch, workspace_mib, device, log).
    """
    _check_choice(tensorrt)
    if tensorrt == "no":
        raise ProtoADError("--from-onnx only builds a TensorRT engine: drop --tensorrt no")
    if not Path(onnx_path).is_file():
        raise ProtoADError(f"--from-onnx {onnx_path}: no such file")
    return build_engine(onnx_path, **options)


def engine_summary(build: EngineBuild) -> str:
    """One summary line: where the plan is and what it is bound to."""
    return (
        f"{build.plan} (TensorRT {build.tensorrt_version}, {build.precision}, {build.gpu_name}, "
        f"batch 1..{build.max_batch}, opt {build.opt_batch}; built in {build.seconds:.1f} s)"
    )


def _check_choice(tensorrt: str) -> None:
    if tensorrt not in TENSORRT_CHOICES:
        raise ProtoADError(f"bad --tensorrt {tensorrt!r}: choose one of {', '.join(TENSORRT_CHOICES)}")
