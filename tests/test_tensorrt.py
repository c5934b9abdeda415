"""TensorRT engine build and runtime.

Three tiers: pure rules and error paths (run everywhere); the build's wiring against a stand-in
``tensorrt`` module (run everywhere: no machine of this project has TensorRT, so this is what
checks the TensorRT 10 / 11 branches); real builds and runs (only where TensorRT and a GPU exist).
"""

from __future__ import annotations

import configparser
import enum
import importlib.abc
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_CROP, normal_crops

from protoad_edge.bundle import Bundle
from protoad_edge.constants import QDQ_SCHEME, feature_size
from protoad_edge.errors import ProtoADError
from protoad_edge.export.engine import engine_for_bundle, engine_from_onnx, engine_summary, engine_unavailable
from protoad_edge.export.tensorrt import DEFAULT_WORKSPACE_MIB, batch_limit, build_engine
from protoad_edge.gpu import cuda as cm
from protoad_edge.gpu import tensorrt as gpu_tensorrt
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends import trt as trt_backend
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.trt import plan_mismatch

# Maps are compared with onnxruntime's FP32 CPU run. FP32 engines: the ONNX parity tolerance.
FP32_TOLERANCE = 1e-4
# FP16 engines: ten FP16 steps near 1 (2^-11 each) - the similarity is an FP16 dot product over
# 1792 channels after a 50-layer FP16 backbone; the L2 norm itself runs in FP32.
FP16_TOLERANCE = 5e-3


def copy_bundle(onnx: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(onnx, dest / onnx.name)
    shutil.copy(Bundle.of(onnx).sidecar, Bundle.of(dest / onnx.name).sidecar)
    return dest / onnx.name


def reference(onnx: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of onnxruntime's FP32 CPU run: what every engine is compared with."""
    from protoad_edge.runtime.backends.ort import OrtBackend

    return OrtBackend(onnx, providers=["CPUExecutionProvider"]).infer(batch)


# --- pure rules and error paths --------------------------------------------------------------


def test_batch_limit_keeps_every_tensor_under_2_31_elements() -> None:
    # FACTS: K = 10,000 at 56 x 56 holds 31.4 M elements per image -> batch <= 68.
    assert batch_limit(10_000, 224, cap=1000) == 68
    assert 68 * 10_000 * 56 * 56 < 2**31 <= 69 * 10_000 * 56 * 56
    assert batch_limit(10_000, 224) == 32  # default cap
    assert batch_limit(48, TINY_CROP, cap=10**6) == (2**31 - 1) // (1792 * 16 * 16)  # small K: the features dominate
    with pytest.raises(ProtoADError, match="2\\^31"):
        batch_limit(10_000, 2048 * 4)


@pytest.mark.slow
def test_feature_size_is_the_networks() -> None:
    torch = pytest.importorskip("torch")
    from protoad_edge.builder.features import PatchFeatures, build_backbone

    backbone = build_backbone("none", 0)[0]
    for crop in (32, 63, 65, 97):
        with torch.no_grad():
            size = PatchFeatures(backbone, crop)(torch.zeros(1, 3, crop, crop)).shape[-1]
        assert feature_size(crop) == size


def test_file_names(tmp_path: Path) -> None:
    onnx = tmp_path / "cable.onnx"
    assert Bundle.of(onnx).plan == tmp_path / "cable.plan"
    assert Bundle.of(onnx).timing_cache == tmp_path / "cable.timing.cache"
    assert Bundle.of(onnx).sidecar == Bundle.of(onnx).sidecar


def info_with(**changes: Any) -> ModelInfo:
    base = ModelInfo(
        category="x",
        resize=72,
        crop=64,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=4,
        image_threshold=0.1,
        pixel_threshold=0.2,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        tensorrt_precision="fp16",
    )
    for k, v in changes.items():
        setattr(base, k, v)
    return base


def test_plan_mismatch_names_what_differs() -> None:
    assert plan_mismatch(info_with(), "10.3.0", "Orin") is None
    why = plan_mismatch(info_with(), "10.7.0", "Orin")
    assert why is not None and "TensorRT 10.3.0" in why and "TensorRT 10.7.0" in why and "GPU" not in why
    why = plan_mismatch(info_with(), "10.3.0", "NVIDIA H200")
    assert why is not None and "'Orin'" in why and "'NVIDIA H200'" in why and "TensorRT" not in why
    why = plan_mismatch(info_with(), "11.0.0", "NVIDIA H200")
    assert why is not None and "11.0.0" in why and "H200" in why
    assert "records no TensorRT version" in (plan_mismatch(info_with(tensorrt_version=""), "10.3.0", "Orin") or "")


def test_build_options_are_checked_before_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    onnx = copy_bundle(tiny_model, tmp_path)
    with pytest.raises(ProtoADError, match="--precision"):
        build_engine(onnx, precision="int4")
    with pytest.raises(
        ProtoADError,
        match=r"^--precision int8 builds from .*tiny\.int8\.onnx, which is not there: "
        r"write it first with protoad-export --from-onnx .*tiny\.onnx --int8",
    ):
        build_engine(onnx, precision="int8")
    with pytest.raises(ProtoADError, match="--max-batch 5000 .* at most 4681"):
        build_engine(onnx, max_batch=5000)
    with pytest.raises(ProtoADError, match="--max-batch 0 must be at least 1"):
        build_engine(onnx, max_batch=0)
    with pytest.raises(ProtoADError, match="--opt-batch 9"):
        build_engine(onnx, opt_batch=9, max_batch=8)
    with pytest.raises(ProtoADError, match="not found"):
        build_engine(tmp_path / "missing.onnx")


def test_model_info_falls_back_to_onnx_metadata(tiny_model: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model, tmp_path / "tiny.onnx")
    assert not Bundle.of(tmp_path / "tiny.onnx").sidecar.exists()
    assert Bundle.of(tmp_path / "tiny.onnx").info() == ModelInfo.load_json(Bundle.of(tiny_model).sidecar)


def test_engine_choice(tiny_model: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    assert engine_for_bundle(tiny_model, "no", log=lines.append) is None and not lines
    with pytest.raises(ProtoADError, match="--tensorrt"):
        engine_for_bundle(tiny_model, "maybe")
    with pytest.raises(ProtoADError, match="drop --tensorrt no"):
        engine_from_onnx(tiny_model, "no")
    with pytest.raises(ProtoADError, match="--from-onnx .*missing.onnx"):
        engine_from_onnx(tmp_path / "missing.onnx")


def test_engine_auto_skips_with_the_reason_where_it_cannot_build(tiny_model: Path) -> None:
    why = engine_unavailable()
    if why is None:
        pytest.skip("TensorRT and a GPU are here: auto builds")
    lines: list[str] = []
    assert engine_for_bundle(tiny_model, "auto", log=lines.append) is None
    assert len(lines) == 1 and why in lines[0] and f"--from-onnx {tiny_model}" in lines[0]
    with pytest.raises(ProtoADError, match=re.escape(why.split(":")[0])):
        engine_for_bundle(tiny_model, "yes")


def test_cuda_python_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cm, "_cudart", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(ProtoADError, match="cuda-python is not installed"):
        cm.require_gpu()


def cuda_python() -> Any:
    try:
        return cm.cudart()
    except ProtoADError:
        pytest.skip("cuda-python is not installed")


def gpu_present() -> bool:
    try:
        cm.require_gpu()
    except ProtoADError:
        return False
    return True


def test_cuda_errors_are_named() -> None:
    rt = cuda_python()
    with pytest.raises(ProtoADError, match="CUDA cudaMalloc failed: cudaErrorMemoryAllocation"):
        cm.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert cm.check((rt.cudaError_t.cudaSuccess, 7), "x") == 7
    assert cm.check((rt.cudaError_t.cudaSuccess,), "x") is None


def test_no_gpu_is_a_clear_error() -> None:
    cuda_python()
    if gpu_present():
        pytest.skip("a GPU is present")
    with pytest.raises(ProtoADError, match="no usable CUDA GPU: cudaError"):
        cm.require_gpu()
    with pytest.raises(ProtoADError, match="no usable CUDA GPU"):
        cm.device_name()
    with pytest.raises(ProtoADError, match="CUDA cudaMallocHost"):
        cm.HostDeviceBuffer((4,))


@pytest.mark.gpu
def test_pinned_round_trip() -> None:
    cuda_python()
    if not gpu_present():
        pytest.skip("no CUDA GPU")
    assert cm.device_name()
    buf, stream = cm.HostDeviceBuffer((3, 5)), cm.Stream()
    start, end = cm.Event(), cm.Event()
    try:
        data = np.arange(15, dtype=np.float32).reshape(3, 5)
        buf.host[:] = data
        stream.record(start)
        stream.to_device(buf)
        buf.host[:] = 0
        stream.to_host(buf, 2 * 5 * 4)  # the leading two rows only
        stream.record(end)
        stream.synchronize()
        assert np.array_equal(buf.host[:2], data[:2]) and not buf.host[2].any()
        assert end.ms_since(start) >= 0
    finally:
        buf.free()
        buf.free()  # idempotent
        stream.close()
        start.close()
        end.close()


# --- the build's wiring, against a stand-in tensorrt module ----------------------------------


def fake_tensorrt(
    version: str, fail_build: bool = False, fail_builder: bool = False, layer_names: str = "onnx"
) -> types.ModuleType:
    """Just enough of TensorRT's Python API for build_engine; records what was asked of it.

    The fake parser reads the real ONNX and makes layers whose output tensors carry the ONNX tensor names, as
    TensorRT's ONNX parser does. ``layer_names``: "onnx" names one layer per node after the node; "default" makes
    two per node (a helper, then the node's own), all with TensorRT's default names, as the parser may; "lost"
    does that and also loses the ONNX tensor names. TensorRT 11 has no FP16 / precision-constraint flags; from
    10.12 on they and ``set_output_type`` are deprecated, which this stand-in refuses; strongly typed networks
    refuse layer precisions. ``fail_builder``: ``trt.Builder`` logs an error and fails as pybind11 does.
    """
    import onnx

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    found = tuple(int(part) for part in version.split(".")[:2])
    removed, deprecated = found >= (11, 0), found >= (10, 12)
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    flags = ["TF32"] + ([] if removed else ["FP16", "OBEY_PRECISION_CONSTRAINTS"])
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # TensorRT's kSTRONGLY_TYPED is 1
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING = 0, 1, 2

        def __init__(self) -> None:
            pass

    class Layer:
        def __init__(self, name: str, node: Any, network: Network, inputs: list[str], outputs: list[str]) -> None:
            self.name, self.node, self.type, self.network = name, node.name, node.op_type, network
            self.inputs = [types.SimpleNamespace(name=n) if n else None for n in inputs]
            dtype = "int64" if node.op_type == "Shape" else "float32"
            self.outputs = [types.SimpleNamespace(name=n, dtype=dtype) for n in outputs]
            self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)
            self._precision: str | None = None
            self.output_types: dict[int, str] = {}

        @property
        def precision(self) -> str | None:
            return self._precision

        @precision.setter
        def precision(self, value: str) -> None:
            assert not self.network.strongly_typed, "strongly typed networks refuse layer precisions"
            self._precision = value

        def get_input(self, j: int) -> Any:
            return self.inputs[j]

        def get_output(self, j: int) -> Any:
            return self.outputs[j]

        def set_output_type(self, j: int, dtype: str) -> None:
            assert not self.network.strongly_typed and not deprecated, "set_output_type: deprecated in TensorRT 10.12"
            self.output_types[j] = dtype

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.parsed, self.layers, self.inputs = flags, "", [], []
            self.num_layers = self.num_inputs = 0
            self.strongly_typed = removed or bool(flags & 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

        def get_input(self, i: int) -> Any:
            return self.inputs[i]

        def make_layers(self, node: Any) -> list[Layer]:
            if layer_names == "onnx" or node.op_type == "Constant":
                name = node.name if layer_names == "onnx" else f"(Unnamed Layer* {len(self.layers)}) [Constant]"
                return [Layer(name, node, self, list(node.input), list(node.output))]
            helper = f"(Unnamed Layer* {len(self.layers)}) [Shuffle]"
            own = f"(Unnamed Layer* {len(self.layers) + 1}) [{node.op_type}]"
            outputs = list(node.output)
            if layer_names == "lost":
                outputs = [f"{own}_output_{j}" for j in range(len(outputs))]
            return [
                Layer(helper, node, self, list(node.input), [f"{helper}_output"]),
                Layer(own, node, self, [f"{helper}_output"], outputs),
            ]

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            self.network.parsed = path
            try:
                graph = onnx.load(path).graph
            except Exception:
                self.errors = ["In node -1 (parseGraph): INVALID_GRAPH: Failed to parse the ONNX model"]
                return False
            for node in graph.node:
                self.network.layers += self.network.make_layers(node)
            self.network.inputs = [types.SimpleNamespace(name=i.name) for i in graph.input]
            self.network.num_layers, self.network.num_inputs = len(self.network.layers), len(graph.input)
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Cache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return b"timings:" + self.blob

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (lo, opt, hi)

    class Config:
        def __init__(self) -> None:
            self.flags: set[str] = set()
            self.cleared: set[str] = set()
            self.pools: dict[str, int] = {}
            self.profiles: list[Profile] = []
            self.cache: Cache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: str) -> None:
            assert not (deprecated and flag in ("FP16", "OBEY_PRECISION_CONSTRAINTS")), f"{flag}: deprecated in 10.12"
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.cleared.add(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: bytes) -> Cache:
            return Cache(bytes(blob))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            if cache.blob.startswith(b"stale"):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> Cache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            trt.last_builder = self

        def create_network(self, flags: int) -> Network:
            self.network = Network(flags)
            return self.network

        def create_builder_config(self) -> Config:
            self.config = Config()
            return self.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            if fail_build:
                self.logger.log(ILogger.ERROR, "out of device memory")
                return None
            return f"plan of {Path(network.parsed).name}".encode()

    def failing_builder(logger: Any) -> Builder:
        logger.log(ILogger.ERROR, "CUDA initialization failure with error: 35. Please check your CUDA installation")
        raise TypeError("pybind11::init(): factory function returned nullptr")

    trt.ILogger, trt.OnnxParser, trt.Builder = ILogger, OnnxParser, failing_builder if fail_builder else Builder
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a fake tensorrt of the version asked for; the GPU is called 'Fake GPU'."""
    pytest.importorskip("onnx")
    monkeypatch.setattr(gpu_tensorrt, "_LOGGER", None)
    monkeypatch.setattr(cm, "device_name", lambda device=0: "Fake GPU")

    def install(version: str, **kwargs: Any) -> types.ModuleType:
        module = fake_tensorrt(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        return module

    return install


def l2norm_layer_names(onnx_path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(onnx_path)).graph.node if "/l2norm/" in n.name and n.op_type != "Constant"}


@pytest.mark.parametrize("version", ["10.3.0", "10.11.0"])
def test_tensorrt10_fp16_pins_l2norm_to_fp32(fake_trt: Any, tiny_model: Path, tmp_path: Path, version: str) -> None:
    trt = fake_trt(version)
    onnx = copy_bundle(tiny_model, tmp_path)
    lines: list[str] = []
    build = build_engine(onnx, log=lines.append)
    builder = trt.last_builder
    assert builder.network.parsed == str(onnx) and builder.network.flags == 0
    assert builder.config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = {layer.name for layer in builder.network.layers if layer.precision == "float32"}
    assert pinned == l2norm_layer_names(onnx) and len(pinned) >= 6
    assert any(f"{len(pinned)} layers of the L2 normalisation pinned to FP32" in line for line in lines)
    assert all(layer.output_types == {0: "float32"} for layer in builder.network.layers if layer.name in pinned)
    s = TINY_CROP
    assert builder.config.profiles[0].shapes == {"image": ((1, 3, s, s), (1, 3, s, s), (32, 3, s, s))}
    assert builder.config.pools == {"WORKSPACE": DEFAULT_WORKSPACE_MIB << 20}
    assert build.plan == tmp_path / "tiny.plan" and build.plan.read_bytes() == b"plan of tiny.onnx"
    assert Bundle.of(build.plan).timing_cache.read_bytes() == b"timings:"
    assert not (tmp_path / "tiny.fp16.onnx").exists()
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    assert (info.tensorrt_version, info.gpu_name, info.tensorrt_precision) == (version, "Fake GPU", "fp16")
    assert info.build["tensorrt"]["max_batch"] == 32 and info.build["tensorrt"]["onnx"] == "tiny.onnx"
    assert (info.build["tensorrt"]["strongly_typed"], info.build["tensorrt"]["fp32_layers"]) == (False, len(pinned))
    assert info.category == ModelInfo.load_json(Bundle.of(tiny_model).sidecar).category
    assert (build.max_batch, build.opt_batch, build.onnx) == (32, 1, onnx)
    assert "tiny.plan" in engine_summary(build) and f"TensorRT {version}" in engine_summary(build)


def test_fp16_pins_the_layers_between_the_l2norm_tensors_whatever_their_names(
    fake_trt: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """The parser may name helper layers by default ("(Unnamed Layer* 12) [Shuffle]"): pin by what they compute."""
    trt = fake_trt("10.3.0", layer_names="default")
    onnx = copy_bundle(tiny_model, tmp_path)
    lines: list[str] = []
    build_engine(onnx, log=lines.append)
    layers = trt.last_builder.network.layers
    assert not any("/l2norm/" in layer.name for layer in layers)
    pinned = [layer for layer in layers if layer.precision == "float32"]
    assert {layer.node for layer in pinned} == l2norm_layer_names(onnx)
    assert len(pinned) == 2 * len(l2norm_layer_names(onnx))  # each node's helper and its own layer
    assert all(layer.output_types == {0: "float32"} for layer in pinned)
    assert any(f"{len(pinned)} layers of the L2 normalisation pinned to FP32" in line for line in lines)


def test_fp16_build_fails_where_the_l2norm_cannot_be_pinned(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    import onnx as onnx_module

    fake_trt("10.3.0", layer_names="lost")  # a parser that kept no ONNX tensor name
    onnx = copy_bundle(tiny_model, tmp_path / "lost")
    with pytest.raises(
        ProtoADError,
        match="network has no tensor '/.*, '/l2norm/.*' \\(the input or output of "
        "'/l2norm/' in .*tiny.onnx\\): the FP16 engine cannot keep",
    ):
        build_engine(onnx, log=lambda line: None)
    fake_trt("10.3.0")
    onnx = copy_bundle(tiny_model, tmp_path / "renamed")
    model = onnx_module.load(str(onnx))
    for node in model.graph.node:
        node.name = node.name.replace("/l2norm/", "/norm/")
    onnx_module.save(model, str(onnx))
    with pytest.raises(ProtoADError, match="tiny.onnx: no computation in scope '/l2norm/'.*overflow"):
        build_engine(onnx, log=lambda line: None)
    assert not Bundle.of(onnx).plan.exists()


@pytest.mark.parametrize("version", ["10.12.0", "10.16.1.11"])
def test_tensorrt10_12_on_builds_fp16_strongly_typed(
    fake_trt: Any, tiny_model: Path, tmp_path: Path, version: str
) -> None:
    """10.12 deprecated the FP16 flag, precision constraints and set_output_type: the stand-in refuses them."""
    trt = fake_trt(version)
    onnx = copy_bundle(tiny_model, tmp_path)
    build = build_engine(onnx, log=lambda line: None)
    network = trt.last_builder.network
    assert network.flags == 1 << 1 and network.strongly_typed  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert build.onnx == tmp_path / "tiny.fp16.onnx" and network.parsed == str(build.onnx)
    assert trt.last_builder.config.flags == set()
    assert all(layer.precision is None and not layer.output_types for layer in network.layers)
    assert build.plan.read_bytes() == b"plan of tiny.fp16.onnx"
    facts = ModelInfo.load_json(Bundle.of(onnx).sidecar).build["tensorrt"]
    assert (facts["onnx"], facts["strongly_typed"], "fp32_layers" in facts) == ("tiny.fp16.onnx", True, False)


def test_tensorrt11_fp16_builds_from_the_mixed_precision_onnx(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    trt = fake_trt("11.0.0")
    onnx = copy_bundle(tiny_model, tmp_path)
    build = build_engine(onnx, log=lambda line: None)
    builder = trt.last_builder
    assert build.onnx == tmp_path / "tiny.fp16.onnx" and builder.network.parsed == str(build.onnx)
    assert builder.config.flags == set()
    assert all(layer.precision is None for layer in builder.network.layers)
    assert build.plan.read_bytes() == b"plan of tiny.fp16.onnx"
    assert builder.network.flags == 0  # TensorRT 11 ignores the deprecated STRONGLY_TYPED flag: always strongly typed
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    assert (info.tensorrt_version, info.tensorrt_precision, info.build["tensorrt"]["onnx"]) == (
        "11.0.0",
        "fp16",
        "tiny.fp16.onnx",
    )
    assert info.build["tensorrt"]["strongly_typed"]


@pytest.mark.parametrize("version", ["10.3.0", "10.16.1.11", "11.0.0"])
def test_fp32_clears_tf32(fake_trt: Any, tiny_model: Path, tmp_path: Path, version: str) -> None:
    trt = fake_trt(version)
    build = build_engine(copy_bundle(tiny_model, tmp_path), precision="fp32", opt_batch=4, max_batch=8)
    config = trt.last_builder.config
    assert config.flags == set() and config.cleared == {"TF32"} and trt.last_builder.network.flags == 0
    assert all(layer.precision is None for layer in trt.last_builder.network.layers)
    s = TINY_CROP
    assert config.profiles[0].shapes["image"] == ((1, 3, s, s), (4, 3, s, s), (8, 3, s, s))
    assert build.onnx == tmp_path / "tiny.onnx"


@pytest.mark.parametrize("version, flags", [("10.3.0", 1 << 1), ("11.0.0", 0)])
def test_int8_builds_strongly_typed_from_the_qdq_model(
    fake_trt: Any, tiny_model: Path, tmp_path: Path, version: str, flags: int
) -> None:
    """The Q/DQ model's types decide: strongly typed on TensorRT 10 too (the STRONGLY_TYPED flag, 1 << 1) and 11
    (always), no precision flags, TF32 off for its FP32 part. (The stand-in parses any ONNX: a copy stands in for the
    Q/DQ model.)"""
    trt = fake_trt(version)
    onnx = copy_bundle(tiny_model, tmp_path)
    shutil.copy(onnx, Bundle.of(onnx).file("int8_onnx"))
    record_int8_scheme(onnx, QDQ_SCHEME)
    lines: list[str] = []
    build = build_engine(onnx, precision="int8", log=lines.append)
    builder = trt.last_builder
    assert builder.network.parsed == str(tmp_path / "tiny.int8.onnx") and builder.network.flags == flags
    assert builder.network.strongly_typed or version.startswith("11")
    assert builder.config.flags == set() and builder.config.cleared == {"TF32"}
    assert all(layer.precision is None and not layer.output_types for layer in builder.network.layers)
    assert build.plan == tmp_path / "tiny.plan" and build.plan.read_bytes() == b"plan of tiny.int8.onnx"
    assert any("INT8 Q/DQ ONNX for TensorRT" in line for line in lines)
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    assert (info.tensorrt_precision, info.build["tensorrt"]["onnx"], info.build["tensorrt"]["strongly_typed"]) == (
        "int8",
        "tiny.int8.onnx",
        True,
    )
    assert not (tmp_path / "tiny.fp16.onnx").exists()


def record_int8_scheme(onnx: Path, scheme: str | None) -> None:
    """Record in the sidecar what ``protoad-export --int8`` records of its Q/DQ form (None: an older export's
    record)."""
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    info.build = {**info.build, "int8": {"quantized": 43} | ({"scheme": scheme} if scheme else {})}
    info.save_json(Bundle.of(onnx).sidecar)


def test_int8_model_in_another_qdq_form_is_refused_before_tensorrt(
    fake_trt: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """An INT8 model written before the TensorRT form (UINT8 activations, INT32 biases) is refused by name, with the
    command that writes it again: TensorRT's parser would reject it node by node."""
    trt = fake_trt("10.3.0")
    onnx = copy_bundle(tiny_model, tmp_path)
    shutil.copy(onnx, Bundle.of(onnx).file("int8_onnx"))
    record_int8_scheme(onnx, None)
    with pytest.raises(
        ProtoADError,
        match=r"tiny\.int8\.onnx is not recorded as TensorRT's INT8 form \(int8 symmetric "
        r".*\) in tiny\.json \(recorded: nothing\): write it again with "
        r"protoad-export --from-onnx .*tiny\.onnx --int8",
    ):
        build_engine(onnx, precision="int8")
    assert getattr(trt, "last_builder", None) is None and not (tmp_path / "tiny.plan").exists()  # TensorRT never asked


def test_timing_cache_is_reused_and_a_stale_one_ignored(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    trt = fake_trt("10.3.0")
    onnx = copy_bundle(tiny_model, tmp_path)
    cache = Bundle.of(onnx).timing_cache
    cache.write_bytes(b"earlier")
    build_engine(onnx, log=lambda line: None)
    assert trt.last_builder.config.cache.blob == b"earlier"
    cache.write_bytes(b"stale: another GPU")
    lines: list[str] = []
    build_engine(onnx, log=lines.append)
    assert any("ignoring timing cache" in line and str(cache) in line for line in lines)
    assert trt.last_builder.config.cache.blob == b"" and cache.read_bytes() == b"timings:"


def test_parser_errors_are_quoted(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    fake_trt("10.3.0")
    onnx = copy_bundle(tiny_model, tmp_path)
    onnx.write_bytes(b"not an onnx file")
    with pytest.raises(ProtoADError, match=f"parser rejected {onnx}: .*INVALID_GRAPH"):
        build_engine(onnx)
    assert not Bundle.of(onnx).plan.exists()


def test_build_failure_quotes_tensorrt_and_leaves_no_plan(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    fake_trt("10.3.0", fail_build=True)
    onnx = copy_bundle(tiny_model, tmp_path)
    with pytest.raises(ProtoADError, match="could not build an engine from .*tiny.onnx: out of device memory"):
        build_engine(onnx, log=lambda line: None)
    assert not Bundle.of(onnx).plan.exists()
    assert ModelInfo.load_json(Bundle.of(onnx).sidecar).tensorrt_version == ""


def test_builder_that_tensorrt_cannot_create_is_one_line(fake_trt: Any, tiny_model: Path, tmp_path: Path) -> None:
    """pybind11's "factory function returned nullptr" becomes TensorRT's own logged reason."""
    fake_trt("10.3.0", fail_builder=True)
    onnx = copy_bundle(tiny_model, tmp_path)
    with pytest.raises(
        ProtoADError, match="^TensorRT 10.3.0 could not create its Builder: CUDA initialization failure with error: 35"
    ):
        build_engine(onnx, log=lambda line: None)
    assert not Bundle.of(onnx).plan.exists()


class FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import tensorrt`` finds a module whose execution raises ``error`` (what its bindings raise)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name == "tensorrt" else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        ImportError("libnvonnxparser.so.10: cannot open shared object file: No such file or directory"),
        OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory"),  # tensorrt_libs' ctypes
        ModuleNotFoundError("No module named 'tensorrt_bindings'", name="tensorrt_bindings"),
    ],
)
def test_tensorrt_that_cannot_load_is_not_called_missing(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingImport(error), *sys.meta_path])
    with pytest.raises(ProtoADError) as caught:
        gpu_tensorrt.import_tensorrt()
    message = str(caught.value)
    assert message.startswith(f"TensorRT's Python module is installed but cannot load: {error}. ")
    assert "not installed" not in message and "gpu-cu12" in message and "\n" not in message


def test_tensorrt_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ProtoADError, match="^TensorRT is not installed: .*JetPack.*protoad-edge\\[gpu-cu12\\]"):
        gpu_tensorrt.import_tensorrt()


def fake_cudart(driver: int, runtime: int) -> Any:
    """cuda-python's runtime module where the driver is too old for it: no device can be counted."""
    errors = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInsufficientDriver": 35})
    ok, insufficient = errors.cudaSuccess, errors.cudaErrorInsufficientDriver
    return types.SimpleNamespace(
        cudaError_t=errors,
        cudaGetDeviceCount=lambda: (insufficient, 0),
        cudaDriverGetVersion=lambda: (ok, driver),
        cudaRuntimeGetVersion=lambda: (ok, runtime),
        cudaGetErrorName=lambda err: (ok, b"cudaErrorInsufficientDriver"),
        cudaGetErrorString=lambda err: (ok, b"CUDA driver version is insufficient for CUDA runtime version"),
    )


@pytest.mark.parametrize(
    "driver,runtime,expected",
    [
        (
            12020,
            13000,
            "the NVIDIA driver supports CUDA 12.2, and this cuda-python's runtime needs CUDA 13.0; install "
            "the cuda-python \\(and TensorRT\\) of the driver's CUDA: pip install 'protoad-edge\\[gpu-cu12\\]'",
        ),
        (
            12060,
            13050,
            "supports CUDA 12.6, and this cuda-python's runtime needs CUDA 13.5; .*'protoad-edge\\[gpu-cu12\\]",
        ),
        (
            12020,
            12080,
            "supports CUDA 12.2, and this cuda-python's runtime needs CUDA 12.8; update the driver to one for "
            "CUDA 12.8$",
        ),
        (11080, 12000, "supports CUDA 11.8, .*needs CUDA 12.0; update the driver to one for CUDA 12.0$"),
        (0, 13000, "no NVIDIA driver was found"),
    ],
)
def test_insufficient_driver_names_both_cuda_versions_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, driver: int, runtime: int, expected: str
) -> None:
    monkeypatch.setattr(cm, "_cudart", fake_cudart(driver, runtime))
    with pytest.raises(
        ProtoADError,
        match="^no usable CUDA GPU: cudaErrorInsufficientDriver \\(CUDA driver version "
        f"is insufficient for CUDA runtime version\\): .*{expected}",
    ):
        cm.require_gpu()


def test_gpu_extras_pin_cuda_python_to_the_cuda_major() -> None:
    """The extra the insufficient-driver message names exists, and keeps cuda-python and TensorRT to its CUDA."""
    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    extras = {name: config["options.extras_require"][name].split() for name in ("gpu", "gpu-cu12", "gpu-cu13")}
    assert "cuda-python>=12.0,<13" in extras["gpu-cu12"] and "tensorrt-cu12>=10.0" in extras["gpu-cu12"]
    assert "cuda-python>=13,<14" in extras["gpu-cu13"] and "tensorrt-cu13>=10.13" in extras["gpu-cu13"]
    assert extras["gpu"] == ["protoad-edge[gpu-cu12]"]
    assert cm.CUDA_EXTRAS == (12, 13)


# --- the runtime's logic, against a stand-in engine (numpy memory here, real CUDA memory on a GPU) ---


class NumpyMemory:
    """Device memory simulated in host arrays, with the gpu.cuda layer's interface.

    Like a real CUDA stream, copies are asynchronous: they are queued and complete only when the
    engine runs (which waits for the copies queued before it) or when the stream is synchronised,
    so a backend that reads its host buffers without synchronising reads stale data.
    """

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.allocated = self.freed = 0
        memory = self

        class Buffer:
            def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32) -> None:
                self.host = np.zeros(shape, dtype)
                self.nbytes = self.host.nbytes
                self.device = 4096 * (len(memory.blocks) + 1)
                memory.blocks[self.device] = np.zeros(self.nbytes, np.uint8)
                memory.allocated += 1

            def free(self) -> None:
                if self.device:
                    memory.freed += 1
                    self.device = 0

        class Event:
            def __init__(self) -> None:
                self.tick = 0

            def ms_since(self, start: Event) -> float:
                return float(self.tick - start.tick)

            def close(self) -> None:
                pass

        class Stream:
            ptr = 0
            ticks = 0

            def to_device(self, buf: Buffer, nbytes: int) -> None:
                data = buf.host.reshape(-1).view(np.uint8)[:nbytes].copy()
                memory.pending.append(lambda: memory.write(buf.device, data))

            def to_host(self, buf: Buffer, nbytes: int) -> None:
                def copy() -> None:
                    buf.host.reshape(-1).view(np.uint8)[:nbytes] = memory.read(buf.device, nbytes)

                memory.pending.append(copy)

            def record(self, event: Event) -> None:
                Stream.ticks += 1  # every stage "takes" 1 ms
                event.tick = Stream.ticks

            def synchronize(self) -> None:
                memory.sync(self.ptr)

            def close(self) -> None:
                memory.stream_closed = True

        self.HostDeviceBuffer, self.Stream, self.Event = Buffer, Stream, Event
        self.stream_closed = False
        self.pending: list[Any] = []

    def read(self, ptr: int, nbytes: int) -> np.ndarray:
        return self.blocks[ptr][:nbytes].copy()

    def write(self, ptr: int, data: np.ndarray) -> None:
        self.blocks[ptr][: data.nbytes] = data.reshape(-1).view(np.uint8)

    def sync(self, stream_ptr: int) -> None:
        """Complete the queued copies, in order."""
        while self.pending:
            self.pending.pop(0)()


class CudaMemory:
    """Real device memory through cuda-python: the stand-in engine reads and writes it synchronously."""

    def read(self, ptr: int, nbytes: int) -> np.ndarray:
        rt = cm.cudart()
        out = np.empty(nbytes, np.uint8)
        cm.check(rt.cudaMemcpy(out.ctypes.data, ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "read")
        return out

    def write(self, ptr: int, data: np.ndarray) -> None:
        rt = cm.cudart()
        data = np.ascontiguousarray(data)
        cm.check(rt.cudaMemcpy(ptr, data.ctypes.data, data.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "write")

    def sync(self, stream_ptr: int) -> None:
        cm.check(cm.cudart().cudaStreamSynchronize(stream_ptr), "sync")


def fake_runtime_tensorrt(
    version: str, onnx: Path, memory: Any, max_batch: int, outputs: tuple[str, ...], fail_runtime: bool = False
) -> Any:
    """A TensorRT whose 'engine' runs the ONNX model with onnxruntime on whatever sits in device memory.

    ``fail_runtime``: ``trt.Runtime`` logs an error and fails as pybind11 does when TensorRT returns nullptr.
    """
    from protoad_edge.runtime.backends.ort import OrtBackend

    reference = OrtBackend(onnx, providers=["CPUExecutionProvider"])
    s = reference.info.crop
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32 = version, "float32"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.calls = {"set_input_shape": [], "execute": 0}

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING = 0, 1, 2

        def __init__(self) -> None:
            pass

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.batch = 0

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            trt.calls["set_input_shape"].append(shape[0])
            self.batch = shape[0]
            return name == "image" and 1 <= shape[0] <= max_batch and tuple(shape[1:]) == (3, s, s)

        def execute_async_v3(self, stream_handle: int) -> bool:
            trt.calls["execute"] += 1
            memory.sync(stream_handle)
            k = self.batch
            image = memory.read(self.addresses["image"], k * 3 * s * s * 4).view(np.float32).reshape(k, 3, s, s)
            maps, scores = reference.infer(image)
            memory.write(self.addresses["anomaly_map"], maps.astype(np.float32))
            memory.write(self.addresses["score"], scores.astype(np.float32))
            return True

    class Engine:
        names = ("image", *outputs)
        num_io_tensors = len(names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "image" else "OUTPUT"

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def get_tensor_shape(self, name: str) -> tuple:
            return (-1, 3, s, s)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            return [(1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s)]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            if data != b"FAKEPLAN":
                self.logger.log(ILogger.ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            return Engine()

    def failing_runtime(logger: Any) -> Runtime:
        logger.log(ILogger.ERROR, "createInferRuntime: Error Code 6: API Usage Error (CUDA driver is too old)")
        raise TypeError("pybind11::init(): factory function returned nullptr")

    trt.ILogger, trt.Runtime = ILogger, failing_runtime if fail_runtime else Runtime
    return trt


@pytest.fixture(params=["numpy", pytest.param("cuda", marks=pytest.mark.gpu)])
def fake_plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A plan of the tiny model for the stand-in engine (largest batch 4), on simulated or real CUDA memory."""
    if request.param == "cuda":
        cuda_python()
        if not gpu_present():
            pytest.skip("no CUDA GPU")
        memory: Any = CudaMemory()
        gpu = cm.device_name()
    else:
        memory = NumpyMemory()
        gpu = "Fake GPU"
        for name in ("HostDeviceBuffer", "Stream", "Event"):
            monkeypatch.setattr(cm, name, getattr(memory, name))
        monkeypatch.setattr(cm, "device_name", lambda device=0: gpu)
    monkeypatch.setattr(gpu_tensorrt, "_LOGGER", None)
    onnx = copy_bundle(request.getfixturevalue("tiny_model"), tmp_path)  # after the skips: it takes seconds
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    info.tensorrt_version, info.gpu_name, info.tensorrt_precision = "10.3.0", gpu, "fp16"
    info.save_json(Bundle.of(onnx).sidecar)
    plan = Bundle.of(onnx).plan
    plan.write_bytes(b"FAKEPLAN")

    def install(outputs: tuple[str, ...] = ("anomaly_map", "score"), fail_runtime: bool = False) -> Any:
        trt = fake_runtime_tensorrt("10.3.0", onnx, memory, 4, outputs, fail_runtime)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return types.SimpleNamespace(plan=plan, onnx=onnx, memory=memory, install=install)


def test_runtime_chunks_batches_and_binds_buffers_once(fake_plan: Any) -> None:
    trt = fake_plan.install()
    crops = normal_crops(6, TINY_CROP, seed=7)
    batch = to_batch(crops)
    ref_maps, ref_scores = reference(fake_plan.onnx, batch)
    backend = trt_backend.TrtBackend(fake_plan.plan, BackendOptions(timing=True))
    assert backend.max_batch == 4
    maps, scores = backend.infer(batch)
    assert np.allclose(maps, ref_maps, atol=1e-6) and np.allclose(scores, ref_scores, atol=1e-6)
    assert trt.calls == {"set_input_shape": [4, 2], "execute": 2}
    facts = backend.describe()
    assert (facts.name, facts.precision, facts.details["max_batch"]) == ("trt", "fp16", 4)
    assert facts.providers == ["TensorRT 10.3.0"] and facts.model == str(fake_plan.plan)
    times = backend.last_times
    split = backend.stage_times()
    assert split == {"h2d": times.h2d_ms, "compute": times.compute_ms, "d2h": times.d2h_ms}
    assert times is not None and times.batch == 6
    if isinstance(fake_plan.memory, NumpyMemory):
        assert (times.h2d_ms, times.compute_ms, times.d2h_ms) == (2.0, 2.0, 2.0)  # 1 "ms" per stage, 2 chunks
    else:
        assert times.compute_ms >= 0 and times.h2d_ms + times.compute_ms + times.d2h_ms > 0
    maps2, _ = backend.infer(batch[4:])  # same batch size as the last chunk: no new shape
    assert np.allclose(maps2, ref_maps[4:], atol=1e-6)
    assert trt.calls == {"set_input_shape": [4, 2], "execute": 3}
    with pytest.raises(ProtoADError, match="expects input"):
        backend.infer(batch[:, :, :32])
    backend.close()
    backend.close()  # idempotent
    assert backend.buffers == {} and backend.stream is None
    if isinstance(fake_plan.memory, NumpyMemory):
        assert fake_plan.memory.allocated == fake_plan.memory.freed == 3 and fake_plan.memory.stream_closed


def test_runtime_refuses_foreign_and_broken_plans(fake_plan: Any) -> None:
    fake_plan.install()
    sidecar = Bundle.of(fake_plan.plan).sidecar
    info = ModelInfo.load_json(sidecar)
    info.tensorrt_version = "10.7.0"
    info.save_json(sidecar)
    with pytest.raises(ProtoADError, match="built with TensorRT 10.7.0, this machine has TensorRT 10.3.0.*--from-onnx"):
        trt_backend.TrtBackend(fake_plan.plan)
    info.tensorrt_version = "10.3.0"
    info.save_json(sidecar)
    fake_plan.plan.write_bytes(b"FAKEPL")  # truncated
    with pytest.raises(ProtoADError, match="not a TensorRT 10.3.0 plan .*magic tag mismatch"):
        trt_backend.TrtBackend(fake_plan.plan)
    fake_plan.plan.write_bytes(b"")
    with pytest.raises(ProtoADError, match="is empty"):
        trt_backend.TrtBackend(fake_plan.plan)


def test_runtime_that_tensorrt_cannot_create_is_one_line(fake_plan: Any) -> None:
    fake_plan.install(fail_runtime=True)
    with pytest.raises(
        ProtoADError,
        match="^TensorRT 10.3.0 could not create its Runtime: createInferRuntime: "
        "Error Code 6: API Usage Error \\(CUDA driver is too old\\)$",
    ):
        trt_backend.TrtBackend(fake_plan.plan)


def test_runtime_checks_the_plan_tensors(fake_plan: Any) -> None:
    fake_plan.install(outputs=("map", "score"))
    with pytest.raises(ProtoADError, match="do not match"):
        trt_backend.TrtBackend(fake_plan.plan)


# --- real TensorRT on a GPU ------------------------------------------------------------------


def tensorrt_ready() -> bool:
    try:
        gpu_tensorrt.import_tensorrt()  # installed bindings whose libraries fail to load raise OSError too
    except ProtoADError:
        return False
    return gpu_present()


needs_tensorrt = pytest.mark.skipif(not tensorrt_ready(), reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def engines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An FP32 and an FP16 plan of the tiny model (largest batch 4), each in its own bundle copy."""
    plans = {}
    for precision in ("fp32", "fp16"):
        onnx = copy_bundle(tiny_model, tmp_path_factory.mktemp(f"engine_{precision}"))
        plans[precision] = build_engine(onnx, precision=precision, max_batch=4, log=lambda line: None).plan
    return plans


@needs_tensorrt
@pytest.mark.tensorrt
@pytest.mark.parametrize("precision,tolerance", [("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)])
def test_engine_matches_onnxruntime(
    engines: dict[str, Path], tiny_model: Path, precision: str, tolerance: float
) -> None:
    from protoad_edge.runtime.backends.registry import open_backend

    crops = normal_crops(4, TINY_CROP, seed=5)
    noisy = np.clip(crops + np.random.default_rng(1).normal(0, 40, crops.shape), 0, 255).astype(np.uint8)
    batch = to_batch(np.concatenate([crops, noisy[:2]]))  # 6 images: more than the largest batch, 4
    ref_maps, ref_scores = reference(tiny_model, batch)
    with open_backend(engines[precision], options=BackendOptions(timing=True)) as backend:
        assert backend.name == "trt" and backend.max_batch == 4
        maps, scores = backend.infer(batch)
        times = backend.last_times
    assert maps.shape == ref_maps.shape and np.isfinite(maps).all()
    assert np.abs(maps - ref_maps).max() <= tolerance
    assert np.abs(scores - ref_scores).max() <= tolerance
    assert times is not None and times.batch == 6 and times.compute_ms > 0 and times.h2d_ms >= 0


@needs_tensorrt
@pytest.mark.tensorrt
def test_int8_engine_matches_its_qdq_model(tiny_model: Path, tmp_path: Path) -> None:
    """An INT8 plan from a real Q/DQ model (every backbone conv quantized, inputs only, as ``protoad-export --int8``
    writes them) gives that model's maps as onnxruntime simulates them, within the FP16 tolerance: TensorRT's INT8
    convs accumulate in int32 and dequantize as the Q/DQ nodes say. Not yet run on a GPU (none lent so far)."""
    import onnx as onnx_module

    from protoad_edge.export import int8
    from protoad_edge.runtime.backends.registry import open_backend

    onnx = copy_bundle(tiny_model, tmp_path)
    qdq = Bundle.of(onnx).file("int8_onnx")
    model = onnx_module.load(str(onnx))
    int8._quantize(
        onnx,
        qdq,
        int8.backbone_convs(model),
        int8._Reader(model.graph.input[0].name, normal_crops(16, TINY_CROP, seed=7)),
    )
    quantized = onnx_module.load(str(qdq))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)  # the bundle's metadata, as the export writes it
    onnx_module.save(quantized, str(qdq))
    record_int8_scheme(onnx, QDQ_SCHEME)
    build = build_engine(onnx, precision="int8", max_batch=4, log=lambda line: None)
    batch = to_batch(normal_crops(4, TINY_CROP, seed=5))
    ref_maps, ref_scores = reference(qdq, batch)
    with open_backend(build.plan) as backend:
        maps, scores = backend.infer(batch)
    assert np.abs(maps - ref_maps).max() <= FP16_TOLERANCE
    assert np.abs(scores - ref_scores).max() <= FP16_TOLERANCE


@needs_tensorrt
@pytest.mark.tensorrt
@pytest.mark.parametrize(
    "field,value,message", [("tensorrt_version", "0.0.0", "TensorRT 0.0.0"), ("gpu_name", "Other GPU", "'Other GPU'")]
)
def test_plan_from_elsewhere_is_refused(
    engines: dict[str, Path], tmp_path: Path, field: str, value: str, message: str
) -> None:
    plan = tmp_path / "tiny.plan"
    shutil.copy(engines["fp16"], plan)
    data = json.loads(Bundle.of(engines["fp16"]).sidecar.read_text())
    data[field] = value
    Bundle.of(plan).sidecar.write_text(json.dumps(data))
    with pytest.raises(ProtoADError, match=f"cannot run here: .*{message}.*--from-onnx"):
        trt_backend.TrtBackend(plan)


@needs_tensorrt
@pytest.mark.tensorrt
def test_truncated_or_empty_plan_is_a_clear_error(engines: dict[str, Path], tmp_path: Path) -> None:
    plan = tmp_path / "tiny.plan"
    shutil.copy(Bundle.of(engines["fp32"]).sidecar, Bundle.of(plan).sidecar)
    data = engines["fp32"].read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProtoADError, match="not a TensorRT .* plan"):
        trt_backend.TrtBackend(plan)
    plan.write_bytes(b"")
    with pytest.raises(ProtoADError, match="is empty"):
        trt_backend.TrtBackend(plan)


@needs_tensorrt
@pytest.mark.tensorrt
def test_real_parser_errors_are_quoted(tiny_model: Path, tmp_path: Path) -> None:
    onnx = copy_bundle(tiny_model, tmp_path)
    onnx.write_bytes(b"not an onnx file")
    with pytest.raises(ProtoADError, match=f"parser rejected {onnx}"):
        build_engine(onnx, log=lambda line: None)


def test_module_imports_without_torch() -> None:
    """The engine build runs on a Jetson without torch: nothing here may import it at module level."""
    import subprocess

    code = (
        "import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import protoad_edge.runtime, protoad_edge.runtime.backends.trt, protoad_edge.export.engine\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_from_onnx_through_the_cli_without_torch(version: str, tiny_model: Path, tmp_path: Path) -> None:
    """The Jetson step end to end: ``protoad-export --from-onnx`` with torch blocked and TensorRT stood in."""
    import subprocess

    pytest.importorskip("onnx")
    onnx = copy_bundle(tiny_model, tmp_path)
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError('torch is blocked: ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_tensorrt import fake_tensorrt
sys.modules['tensorrt'] = fake_tensorrt({version!r})
from protoad_edge.gpu import cuda
cuda.device_name = lambda device=0: 'Fake GPU'
from protoad_edge.cli.export import main
try:
    main(['--from-onnx', {str(onnx)!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
assert 'torch' not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "engine" in result.stdout and "tiny.plan" in result.stdout and "Traceback" not in result.stderr
    assert (tmp_path / "tiny.plan").read_bytes() == b"plan of " + (
        b"tiny.fp16.onnx" if version.startswith("11") else b"tiny.onnx"
    )
    info = ModelInfo.load_json(Bundle.of(onnx).sidecar)
    assert (info.tensorrt_version, info.gpu_name, info.tensorrt_precision) == (version, "Fake GPU", "fp16")
