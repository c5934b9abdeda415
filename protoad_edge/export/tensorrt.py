"""TensorRT engine build from the exported ONNX, without torch: ONNX -> network -> config -> plan -> ``NAME.plan``.

Small loaders in the spirit of Polygraphy, composed by :func:`build_engine`. The FP16 path
depends on the TensorRT version found:

- TensorRT 10.0-10.11 (JetPack 6 ships 10.3): FP32 ONNX + ``BuilderFlag.FP16``, with the layers of the
  L2 normalisation (every layer on a path from its input tensor to its output tensor) pinned to FP32
  under ``OBEY_PRECISION_CONSTRAINTS``;
- TensorRT 10.12+ (which deprecates those flags and ``set_output_type``) and 11+ (which removed them):
  a strongly typed network built from ``NAME.fp16.onnx``, whose L2 normalisation is already FP32
  (see :mod:`.fp16`).

``--precision int8`` builds a strongly typed network (TensorRT 10 and 11) from ``NAME.int8.onnx``, the Q/DQ
model ``protoad-export --int8`` wrote and the accuracy gate passed: its quantized convs run in INT8, the rest in
FP32 as the graph types it (not FP16: that conversion does not handle Q/DQ scales yet).

TensorRT is imported inside the functions, so this module loads anywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_atomic
from ..bundle import SEALED, Bundle
from ..constants import ENGINE_PRECISIONS, FEATURE_CHANNELS, FP32_SCOPE, QDQ_SCHEME, feature_size
from ..errors import ProtoADError
from ..gpu import cuda as cm
from ..gpu.tensorrt import create_with_logger, import_tensorrt, tensorrt_version, trt_logger
from ..metadata import ModelInfo

# A TensorRT tensor must hold fewer than 2^31 elements.
MAX_TENSOR_ELEMENTS = 2**31 - 1
DEFAULT_MAX_BATCH = 32
DEFAULT_WORKSPACE_MIB = 1024
# TensorRT 10.12 deprecated BuilderFlag.FP16, OBEY_PRECISION_CONSTRAINTS and set_output_type ("superseded by
# strong typing"): FP16 engines come from NAME.fp16.onnx from then on. TensorRT 11 types every network strongly
# and ignores the (deprecated) STRONGLY_TYPED creation flag.
STRONGLY_TYPED_FP16_FROM = (10, 12)
ALWAYS_STRONGLY_TYPED_FROM = (11, 0)


def batch_limit(num_prototypes: int, crop: int, cap: int = DEFAULT_MAX_BATCH) -> int:
    """Largest batch whose biggest tensor stays under 2^31 elements, capped at ``cap``.

    The biggest per-image tensor is the K x h x w similarity map (or the 1792-channel features
    when K is small): at crop 224, K = 10,000 gives 31.4 M elements per image, so at most 68.
    """
    h = feature_size(crop)
    per_image = max(num_prototypes, FEATURE_CHANNELS) * h * h
    limit = MAX_TENSOR_ELEMENTS // per_image
    if limit < 1:
        raise ProtoADError(
            f"one image at crop {crop} with {num_prototypes:,} prototypes needs {per_image:,} elements, "
            "over TensorRT's 2^31 limit: export with fewer prototypes or a smaller crop"
        )
    return min(limit, cap)


def strongly_typed(version: str, precision: str) -> bool:
    """Whether the network is strongly typed: always on TensorRT 11+, for FP16 from 10.12 on, and for INT8: its
    Q/DQ graph (explicit quantization) says which convs are INT8 and that the rest is FP32, and a weakly typed build
    could also pick INT8 or FP16 kernels elsewhere, outside what the accuracy gate measured."""
    found = tensorrt_version(version)
    return (
        found >= ALWAYS_STRONGLY_TYPED_FROM
        or precision == "int8"
        or (precision == "fp16" and found >= STRONGLY_TYPED_FP16_FROM)
    )


def check_int8_scheme(info: ModelInfo, int8_onnx: Path, onnx_path: Path) -> None:
    """Refuse, before TensorRT loads, an INT8 model the sidecar does not record in ``QDQ_SCHEME``: one written
    before TensorRT's form was (UINT8 activations, INT32 biases), which its ONNX parser rejects node by node."""
    scheme = info.build.get("int8", {}).get("scheme")
    if scheme != QDQ_SCHEME:
        raise ProtoADError(
            f"{int8_onnx} is not recorded as TensorRT's INT8 form ({QDQ_SCHEME}) in "
            f"{Bundle.of(onnx_path).sidecar.name} (recorded: {scheme or 'nothing'}): write it again with "
            f"protoad-export --from-onnx {onnx_path} --int8 --category ..."
        )


def network_flags(trt: Any, typed: bool) -> int:
    """``create_network``'s flags: TensorRT 10 types strongly only when asked; 11 always does (flag deprecated)."""
    if typed and tensorrt_version(trt.__version__) < ALWAYS_STRONGLY_TYPED_FROM:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def parse_onnx(trt: Any, builder: Any, onnx_path: Path, flags: int) -> tuple[Any, Any]:
    """ONNX file -> (network, parser). Keep the parser alive until the build: it owns the weights."""
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no detail from the parser"]
        raise ProtoADError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors))
    return network, parser


def layers_between(network: Any, entries: list[str], exits: list[str]) -> list[Any]:
    """The layers on a path from a tensor in ``entries`` to one in ``exits``, in network order.

    Tensors are found by name: TensorRT's ONNX parser keeps ONNX tensor names on the outputs of the layers it
    makes, but may give helper layers (casts, shuffles, reductions split in two) default names, so layer
    names cannot tell which layers compute a scope. A layer is on such a path when it is downstream of an
    entry and upstream of an exit.
    """
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    inputs: list[list[str]] = []
    for i, layer in enumerate(layers):
        read = [layer.get_input(j) for j in range(layer.num_inputs)]
        inputs.append([t.name for t in read if t is not None])
        for name in inputs[-1]:
            consumers.setdefault(name, []).append(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = i
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    unknown = [name for name in entries if name not in producer and name not in network_inputs]
    unknown += [name for name in exits if name not in producer]
    if unknown:
        raise ProtoADError(f"TensorRT's network has no tensor {', '.join(map(repr, unknown))}")
    downstream = _reach(
        [i for name in entries for i in consumers.get(name, [])],
        lambda i: [c for j in range(layers[i].num_outputs) for c in consumers.get(layers[i].get_output(j).name, [])],
    )
    upstream = _reach(
        [producer[name] for name in exits], lambda i: [producer[name] for name in inputs[i] if name in producer]
    )
    return [layers[i] for i in sorted(downstream & upstream)]


def _reach(start: list[int], step: Callable[[int], list[int]]) -> set[int]:
    seen: set[int] = set()
    todo = list(start)
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(step(i))
    return seen


def pin_fp32_layers(trt: Any, network: Any, onnx_path: Path, scope: str = FP32_SCOPE) -> int:
    """FP16-flag builds (TensorRT < 10.12): run the layers that compute ``scope`` in FP32; returns how many.

    Which layers those are comes from the graph, not from layer names: every layer between the scope's
    input and output tensors as the ONNX graph names them (:func:`.fp16.scope_boundary`).
    """
    from .fp16 import read_scope_boundary

    entries, exits = read_scope_boundary(onnx_path, scope)
    try:
        layers = layers_between(network, entries, exits)
    except ProtoADError as exc:
        raise ProtoADError(
            f"{exc} (the input or output of {scope!r} in {onnx_path}): the FP16 engine cannot keep "
            "the L2 normalisation in FP32"
        ) from None
    pinned = 0
    for layer in layers:
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not all(t.dtype in (trt.float32, trt.float16) for t in outputs):
            continue  # shape arithmetic (int64) has no precision to pin
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if pinned == 0:
        raise ProtoADError(
            f"no float layer lies between {entries} and {exits} ({scope!r} in {onnx_path}) in "
            "TensorRT's network: the FP16 engine would normalise in FP16 and overflow"
        )
    return pinned


def builder_config(
    trt: Any,
    builder: Any,
    network: Any,
    info: ModelInfo,
    *,
    precision: str,
    typed: bool,
    opt_batch: int,
    max_batch: int,
    workspace_mib: int,
) -> Any:
    """Precision flags, workspace limit and the batch-axis optimisation profile.

    A strongly typed network takes its precision from its tensors' types: only weakly typed FP16 builds
    (TensorRT < 10.12) set the FP16 flag, and OBEY_PRECISION_CONSTRAINTS so that the layers
    :func:`pin_fp32_layers` pinned stay FP32.
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp32", "int8") and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 keeps 10 mantissa bits: "fp32" (and INT8's FP32 part) means FP32
    if precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
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
    onnx: Path  # the graph TensorRT parsed (NAME.fp16.onnx for strongly typed FP16 builds: TensorRT 10.12+)
    precision: str
    tensorrt_version: str
    gpu_name: str
    opt_batch: int
    max_batch: int
    seconds: float


def build_engine(
    onnx_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    opt_batch: int = 1,
    max_batch: int | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    device: int = 0,
    log: Callable[[str], None] = print,
) -> EngineBuild:
    """Build ``NAME.plan`` beside ``NAME.onnx`` on this machine's GPU and record the build, and the digests of the
    files it wrote, in ``NAME.json``.

    Needs TensorRT and cuda-python, never torch: this is what runs on a Jetson
    (``protoad-export --from-onnx models/cable.onnx``).
    """
    onnx_path = Path(onnx_path)
    if precision not in ENGINE_PRECISIONS:
        raise ProtoADError(f"bad --precision {precision!r}: choose one of {', '.join(ENGINE_PRECISIONS)}")
    if not onnx_path.is_file():
        raise ProtoADError(f"ONNX model not found: {onnx_path}")
    bundle = Bundle.of(onnx_path)
    int8_onnx = bundle.file("int8_onnx")
    if precision == "int8" and not int8_onnx.is_file():
        raise ProtoADError(
            f"--precision int8 builds from {int8_onnx}, which is not there: write it first with "
            f"protoad-export --from-onnx {onnx_path} --int8 --category ... (the accuracy gate decides)"
        )
    if max_batch is not None and max_batch < 1:
        raise ProtoADError(f"--max-batch {max_batch} must be at least 1")
    bundle.check(onnx_path)  # a plan built from a stranger would be sealed into the bundle
    created = not bundle.sidecar.is_file()
    info = bundle.info()
    if precision == "int8":
        bundle.check(int8_onnx)
        check_int8_scheme(info, int8_onnx, onnx_path)
    limit = batch_limit(info.num_prototypes, info.crop, cap=max_batch or DEFAULT_MAX_BATCH)
    if max_batch is not None and max_batch > limit:
        raise ProtoADError(
            f"--max-batch {max_batch} is too large for {info.num_prototypes:,} prototypes at crop "
            f"{info.crop}: a tensor would reach 2^31 elements; at most {limit}"
        )
    max_batch = limit
    if not 1 <= opt_batch <= max_batch:
        raise ProtoADError(f"--opt-batch {opt_batch} must be between 1 and the largest batch {max_batch}")
    trt = import_tensorrt()
    gpu = cm.device_name(device)
    typed = strongly_typed(trt.__version__, precision)
    source = onnx_path
    if precision == "fp16" and typed:
        from .fp16 import write_fp16_onnx  # needs the onnx package, as strongly typed FP16 builds do

        source = write_fp16_onnx(onnx_path, bundle.fp16_onnx)
        log(f"mixed-precision ONNX for TensorRT {trt.__version__}: {source}")
    elif precision == "int8":
        source = int8_onnx
        log(f"INT8 Q/DQ ONNX for TensorRT {trt.__version__}: {source} (its quantized convs in INT8, the rest in FP32)")
    plan_file, cache_file = bundle.plan, bundle.timing_cache
    logger = trt_logger(trt)
    logger.clear()
    started = time.perf_counter()
    builder = create_with_logger(trt, trt.Builder, "Builder")
    network, parser = parse_onnx(trt, builder, source, network_flags(trt, typed))
    facts: dict[str, Any] = {"strongly_typed": typed}
    if precision == "fp16" and not typed:
        facts["fp32_layers"] = pin_fp32_layers(trt, network, source)
        log(
            f"FP16 flag build (TensorRT {trt.__version__}): {facts['fp32_layers']} layers of the L2 normalisation "
            "pinned to FP32"
        )
    config = builder_config(
        trt,
        builder,
        network,
        info,
        precision=precision,
        typed=typed,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=workspace_mib,
    )
    attach_timing_cache(config, cache_file, log)
    log(
        f"building the TensorRT {trt.__version__} {precision} engine on {gpu} (batch 1..{max_batch}, opt {opt_batch}) "
        "..."
    )
    plan = serialized_plan(trt, builder, network, config, source)
    seconds = time.perf_counter() - started
    del parser
    write_atomic(plan_file, lambda f: f.write(plan))
    write_atomic(cache_file, lambda f: f.write(config.get_timing_cache().serialize()))
    info.tensorrt_version, info.gpu_name, info.tensorrt_precision = trt.__version__, gpu, precision
    info.build["tensorrt"] = {
        "plan": plan_file.name,
        "onnx": source.name,
        **facts,
        "build_seconds": round(seconds, 1),
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "workspace_mib": workspace_mib,
    }
    wrote = ("plan", "fp16_onnx") if source == bundle.fp16_onnx else ("plan",)
    sidecar = bundle.seal(info, SEALED if created else wrote).save_json(bundle.sidecar)
    for warning in dict.fromkeys(logger.warnings):
        log(f"TensorRT warning: {warning}")
    return EngineBuild(plan_file, sidecar, source, precision, trt.__version__, gpu, opt_batch, max_batch, seconds)
