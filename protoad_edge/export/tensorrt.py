"""TensorRT engine build from the exported ONNX, without torch: ONNX -> network -> config -> plan -> ``NAME.plan``.

Small loaders in the spirit of Polygraphy, composed by :func:`build_engine`. The FP16 path
depends on the TensorRT version found:

- TensorRT 10 (JetPack 6): FP32 ONNX + ``BuilderFlag.FP16``, with the L2-normalisation layers
  pinned to FP32 under ``OBEY_PRECISION_CONSTRAINTS``;
- TensorRT 11+: no precision flags exist; the network is built from ``NAME.fp16.onnx``, a
  strongly typed graph whose L2 normalisation is already FP32 (see :mod:`.fp16`).

TensorRT is imported inside the functions, so this module loads anywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_atomic
from ..bundle import Bundle
from ..constants import ENGINE_PRECISIONS, FEATURE_CHANNELS, FP32_SCOPE, feature_size
from ..errors import ProtoADError
from ..gpu import cuda as cm
from ..gpu.tensorrt import import_tensorrt, tensorrt_major, trt_logger
from ..metadata import ModelInfo

# A TensorRT tensor must hold fewer than 2^31 elements.
MAX_TENSOR_ELEMENTS = 2**31 - 1
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_MIB = 1024
FIRST_STRONGLY_TYPED_MAJOR = 11


def batch_limit(num_prototypes: int, crop: int, cap: int = DEFAULT_MAX_BATCH) -> int:
    """Largest batch whose biggest tensor stays under 2^31 elements, capped at ``cap``.

    The biggest per-image tensor is the K x h x w similarity map (or the 1792-channel features
    when K is small): at crop 224, K = 10,000 gives 31.4 M elements per image, so at most 68.
    """
    h = feature_size(crop)
    per_image = max(num_prototypes, FEATURE_CHANNELS) * h * h
    limit = MAX_TENSOR_ELEMENTS // per_image
    if limit < 1:
        raise ProtoADError(f"one image at crop {crop} with {num_prototypes:,} prototypes needs {per_image:,} elements, "
                           "over TensorRT's 2^31 limit: export with fewer prototypes or a smaller crop")
    return min(limit, cap)


def parse_onnx(trt: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    """ONNX file -> (network, parser). Keep the parser alive until the build: it owns the weights."""
    network = builder.create_network(0)  # 0: TensorRT 10 weakly typed; TensorRT 11 is always strongly typed
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no detail from the parser"]
        raise ProtoADError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors))
    return network, parser


def pin_fp32_layers(trt: Any, network: Any, scope: str = FP32_SCOPE) -> int:
    """TensorRT 10 FP16 builds: run the layers named in ``scope`` in FP32; returns how many were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONSTANT or scope not in layer.name:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not all(t.dtype in (trt.float32, trt.float16) for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def builder_config(trt: Any, builder: Any, network: Any, info: ModelInfo, *, precision: str, opt_batch: int,
                   max_batch: int, workspace_mib: int) -> Any:
    """Precision flags, workspace limit and the batch-axis optimisation profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    strongly_typed = tensorrt_major(trt.__version__) >= FIRST_STRONGLY_TYPED_MAJOR
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 keeps 10 mantissa bits: "fp32" means FP32
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if pin_fp32_layers(trt, network) == 0:
            raise ProtoADError(f"no layer named {FP32_SCOPE!r} in the network: the FP16 engine would normalise "
                               "in FP16 and overflow; re-export the ONNX with this version of protoad-edge")
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    name, s = info.input_name, info.crop
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [name]:
        raise ProtoADError(f"the network's inputs {inputs} are not [{name!r}] as the model metadata says")
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (1, 3, s, s), (opt_batch, 3, s, s), (max_batch, 3, s, s))
    config.add_optimization_profile(profile)
    return config


def attach_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> None:
    """Seed the build with the timing cache at ``path`` if there is one; a stale or bad one only costs time."""
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # TensorRT raises its own types for a corrupt cache
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            return
        log(f"warning: ignoring timing cache {path} (corrupt, or from another TensorRT version or GPU)")
    config.set_timing_cache(config.create_timing_cache(b""), False)


def serialized_plan(trt: Any, builder: Any, network: Any, config: Any, onnx_path: Path) -> Any:
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = trt_logger(trt).last_error("see TensorRT's log")
        raise ProtoADError(f"TensorRT could not build an engine from {onnx_path}: {detail}")
    return plan


@dataclass
class EngineBuild:
    """What :func:`build_engine` wrote and measured."""

    plan: Path
    sidecar: Path
    onnx: Path  # the graph TensorRT parsed (NAME.fp16.onnx on TensorRT 11 FP16 builds)
    precision: str
    tensorrt_version: str
    gpu_name: str
    opt_batch: int
    max_batch: int
    seconds: float


def build_engine(onnx_path: str | os.PathLike, *, precision: str = "fp16", opt_batch: int = 1,
                 max_batch: int | None = None, workspace_mib: int = DEFAULT_WORKSPACE_MIB, device: int = 0,
                 log: Callable[[str], None] = print) -> EngineBuild:
    """Build ``NAME.plan`` beside ``NAME.onnx`` on this machine's GPU and record the build in ``NAME.json``.

    Needs TensorRT and cuda-python, never torch: this is what runs on a Jetson
    (``protoad-export --from-onnx models/cable.onnx``).
    """
    onnx_path = Path(onnx_path)
    if precision not in ENGINE_PRECISIONS:
        raise ProtoADError(f"bad --precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    if not onnx_path.is_file():
        raise ProtoADError(f"ONNX model not found: {onnx_path}")
    bundle = Bundle.of(onnx_path)
    if max_batch is not None and max_batch < 1:
        raise ProtoADError(f"--max-batch {max_batch} must be at least 1")
    info = bundle.info()
    limit = batch_limit(info.num_prototypes, info.crop, cap=max_batch or DEFAULT_MAX_BATCH)
    if max_batch is not None and max_batch > limit:
        raise ProtoADError(f"--max-batch {max_batch} is too large for {info.num_prototypes:,} prototypes at crop "
                           f"{info.crop}: a tensor would reach 2^31 elements; at most {limit}")
    max_batch = limit
    if not 1 <= opt_batch <= max_batch:
        raise ProtoADError(f"--opt-batch {opt_batch} must be between 1 and the largest batch {max_batch}")
    trt = import_tensorrt()
    gpu = cm.device_name(device)
    source = onnx_path
    if precision == "fp16" and tensorrt_major(trt.__version__) >= FIRST_STRONGLY_TYPED_MAJOR:
        from .fp16 import write_fp16_onnx  # needs the onnx package, as TensorRT 11 FP16 builds do

        source = write_fp16_onnx(onnx_path, bundle.fp16_onnx)
        log(f"mixed-precision ONNX for TensorRT {trt.__version__}: {source}")
    plan_file, cache_file = bundle.plan, bundle.timing_cache
    logger = trt_logger(trt)
    logger.clear()
    started = time.perf_counter()
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder, source)
    config = builder_config(trt, builder, network, info, precision=precision, opt_batch=opt_batch,
                            max_batch=max_batch, workspace_mib=workspace_mib)
    attach_timing_cache(config, cache_file, log)
    log(f"building the TensorRT {trt.__version__} {precision} engine on {gpu} (batch 1..{max_batch}, opt {opt_batch}) ...")
    plan = serialized_plan(trt, builder, network, config, source)
    seconds = time.perf_counter() - started
    del parser
    write_atomic(plan_file, lambda f: f.write(plan))
    write_atomic(cache_file, lambda f: f.write(config.get_timing_cache().serialize()))
    info.tensorrt_version, info.gpu_name, info.tensorrt_precision = trt.__version__, gpu, precision
    info.build["tensorrt"] = {"plan": plan_file.name, "onnx": source.name, "build_seconds": round(seconds, 1),
                              "opt_batch": opt_batch, "max_batch": max_batch, "workspace_mib": workspace_mib}
    sidecar = info.save_json(bundle.sidecar)
    for warning in dict.fromkeys(logger.warnings):
        log(f"TensorRT warning: {warning}")
    return EngineBuild(plan_file, sidecar, source, precision, trt.__version__, gpu, opt_batch, max_batch, seconds)
