"""A Triton Inference Server model repository from a bundle (``protoad-export --triton-repo DIR``).

    DIR/NAME/config.pbtxt       platform onnxruntime_onnx, dynamic batching
    DIR/NAME/1/model.onnx       the bundle's FP32 ONNX
    DIR/NAME_trt/config.pbtxt   platform tensorrt_plan (only where the bundle has a plan)
    DIR/NAME_trt/1/model.plan

Both models carry the bundle's metadata (thresholds included) as the ``protoad`` parameter, and declare the
signature of ``runtime.triton.signature``, so ``protoad-run --server`` judges with either, or with
``protoad-serve``. A Triton container serves the folder as it is (``tritonserver --model-repository DIR``).
No torch and no protobuf here: the configuration is protobuf text written directly; the tests parse it
into Triton's own ``ModelConfig`` message, so a misspelt field fails there.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import atomic_folder
from ..bundle import Bundle
from ..errors import ProtoADError
from ..metadata import ModelInfo
from ..runtime.serving.triton import (
    DEFAULT_MAX_BATCH,
    DEFAULT_QUEUE_DELAY_US,
    PARAMETER,
    TensorSpec,
    check_model_name,
    info_parameter,
    signature,
)
from .tensorrt import DEFAULT_WORKSPACE_MIB, batch_limit

ACCELERATORS = ("none", "tensorrt")
TRT_SUFFIX = "_trt"
VERSION = "1"


@dataclass(frozen=True)
class RepositoryModel:
    """One model written into the repository."""

    name: str
    platform: str
    folder: Path
    max_batch: int


def write_repository(
    model: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    accelerate: str = "none",
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    log: Callable[[str], None] = lambda m: None,
) -> list[RepositoryModel]:
    """Write ``repo/NAME`` (and ``repo/NAME_trt`` where the plan exists) for the bundle of ``model``.

    Each model folder is written whole to a temporary folder and then renamed into place, so a server
    polling the repository never loads half a model; other models in ``repo`` are left as they are.
    """
    if accelerate not in ACCELERATORS:
        raise ProtoADError(f"--triton-accelerate {accelerate!r}: choose one of {', '.join(ACCELERATORS)}")
    bundle = Bundle.of(model)
    if not bundle.onnx.is_file():
        raise ProtoADError(f"--triton-repo needs the bundle's ONNX model {bundle.onnx}, which does not exist")
    for kind in ("onnx", "plan"):  # the server runs them with this sidecar's thresholds
        bundle.check(bundle.file(kind))
    info = bundle.info()
    name = check_model_name(name or bundle.name, "model name")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ProtoADError(f"--triton-repo {repo} is a file: expected a folder")
    onnx_batch = min(max_batch, batch_limit(info.num_prototypes, info.crop))
    written = []
    started = time.perf_counter()
    text = model_config(info, name, "onnxruntime_onnx", onnx_batch, queue_delay_us, accelerate=accelerate)
    written.append(_write_model(repo / name, text, bundle.onnx, "model.onnx", "onnxruntime_onnx", onnx_batch))
    plan_batch = info.build.get("tensorrt", {}).get("max_batch")
    if bundle.plan.is_file() and plan_batch:
        trt_name = name + TRT_SUFFIX
        text = model_config(info, trt_name, "tensorrt_plan", int(plan_batch), queue_delay_us)
        written.append(_write_model(repo / trt_name, text, bundle.plan, "model.plan", "tensorrt_plan", int(plan_batch)))
        log(
            f"  {trt_name}: built with TensorRT {info.tensorrt_version} on {info.gpu_name}: serve it with the Triton "
            "release that ships this TensorRT, on that GPU model (plans are not portable)"
        )
    elif bundle.plan.is_file():
        log(
            f"  {bundle.plan} left out: its sidecar does not record the engine's batch range (rebuild it with "
            "protoad-export --from-onnx)"
        )
    for m in written:
        log(f"  {m.folder}: {m.platform}, batch up to {m.max_batch}")
    log(
        f"  Triton repository {repo} written in {time.perf_counter() - started:.1f} s: "
        f"tritonserver --model-repository {repo.resolve()}"
    )
    return written


def _write_model(
    folder: Path, config_text: str, source: Path, file_name: str, platform: str, max_batch: int
) -> RepositoryModel:
    with atomic_folder(folder) as tmp:
        (tmp / "config.pbtxt").write_text(config_text, encoding="utf-8")
        (tmp / VERSION).mkdir()
        shutil.copyfile(source, tmp / VERSION / file_name)
    return RepositoryModel(folder.name, platform, folder, max_batch)


def model_config(
    info: ModelInfo, name: str, platform: str, max_batch: int, queue_delay_us: int, *, accelerate: str = "none"
) -> str:
    """The ``config.pbtxt`` text of the bundle's network as ``platform`` (protobuf text format of ModelConfig)."""
    inputs, outputs = signature(info)
    lines = [
        f"name: {quote(name)}",
        f"platform: {quote(platform)}",
        f"max_batch_size: {max_batch}",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    lines += [f"input {tensor(t)}" for t in inputs] + [f"output {tensor(t)}" for t in outputs]
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    if accelerate == "tensorrt":
        # onnxruntime's TensorRT provider inside Triton, FP16 (the graph's L2 norm is FP16-safe, as for protoad-run).
        settings = {"precision_mode": "FP16", "max_workspace_size_bytes": str(DEFAULT_WORKSPACE_MIB * 2**20)}
        params = " ".join(f"parameters {{ key: {quote(k)} value: {quote(v)} }}" for k, v in settings.items())
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: "
            f'[ {{ name: "tensorrt" {params} }} ] }} }}'
        )
    lines.append(f"parameters {{ key: {quote(PARAMETER)} value: {{ string_value: {quote(info_parameter(info))} }} }}")
    return "\n".join(lines) + "\n"


def tensor(spec: TensorSpec) -> str:
    dims = ", ".join(map(str, spec.dims))
    reshape = "" if spec.reshape is None else f" reshape: {{ shape: [ {', '.join(map(str, spec.reshape))} ] }}"
    return f"{{ name: {quote(spec.name)} data_type: TYPE_FP32 dims: [ {dims} ]{reshape} }}"


def quote(text: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, quotes and backslashes escaped, every other
    byte of the UTF-8 encoding as an octal escape (what the text format reads back byte for byte)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
