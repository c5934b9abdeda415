"""The mixed-precision ONNX (``NAME.fp16.onnx``) for TensorRT 11: checked here with onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import TINY_CROP, normal_crops  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from protoad_edge.bundle import Bundle  # noqa: E402
from protoad_edge.errors import ProtoADError  # noqa: E402
from protoad_edge.export.fp16 import (  # noqa: E402
    FP16_MAX,
    convert_to_mixed_fp16,
    read_scope_boundary,
    scope_boundary,
    write_fp16_onnx,
)
from protoad_edge.metadata import ModelInfo  # noqa: E402
from protoad_edge.preprocess import to_batch  # noqa: E402

# The map is 1 - cosine similarity; FP16 stores a similarity near 1 to a step of 2^-11 (4.9e-4).
# After the blur (an average) the map may not move by more than one such step.
MAP_TOLERANCE = 2.0**-11


def run(path: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(["anomaly_map", "score"], {"image": batch})
    return maps, scores


def output_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every node output, as ONNX type inference sees it."""
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}


@pytest.fixture(scope="module")
def fp16_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp16_onnx(tiny_model, tmp_path_factory.mktemp("fp16") / "tiny.fp16.onnx")


def test_fp16_onnx_is_beside_the_model_and_shares_its_sidecar(tiny_model: Path) -> None:
    assert Bundle.of(tiny_model).fp16_onnx == tiny_model.with_name("tiny.fp16.onnx")
    assert Bundle.of(tiny_model).sidecar == Bundle.of(tiny_model).sidecar


def test_fp16_maps_match_fp32(tiny_model: Path, fp16_model: Path) -> None:
    """FP16 weights and tensors change the maps by less than one FP16 step near 1.

    onnxruntime's CPU kernels upcast FP16 internally, so this bounds the effect of the conversion
    (weights, constants, Casts), not of FP16 arithmetic on a GPU: test_tensorrt.py covers that.
    """
    batch = to_batch(normal_crops(4, TINY_CROP, seed=3))
    maps32, scores32 = run(tiny_model, batch)
    maps16, scores16 = run(fp16_model, batch)
    assert maps16.dtype == np.float32 and scores16.dtype == np.float32  # the interface stays FP32
    assert maps16.shape == maps32.shape and scores16.shape == scores32.shape
    assert np.abs(maps16 - maps32).max() <= MAP_TOLERANCE
    assert np.abs(scores16 - scores32).max() <= MAP_TOLERANCE


def test_l2norm_stays_fp32_and_the_rest_is_fp16(fp16_model: Path) -> None:
    model = onnx.load(str(fp16_model))
    types = output_types(model)
    l2norm = [n for n in model.graph.node if "/l2norm/" in n.name and n.op_type != "Constant"]
    assert {n.op_type for n in l2norm} >= {"ReduceSum", "Sqrt", "Div", "Pow"}
    for node in l2norm:
        assert types[node.output[0]] == TensorProto.FLOAT, node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs)
    weights = {init.name: init.data_type for init in model.graph.initializer}
    assert all(weights[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT, TensorProto.FLOAT]


def test_metadata_survives(tiny_model: Path, fp16_model: Path) -> None:
    props = {p.key: p.value for p in onnx.load(str(fp16_model)).metadata_props}
    assert ModelInfo.from_props(props) == ModelInfo.load_json(Bundle.of(tiny_model).sidecar)


def test_large_activations_stay_finite(tiny_model: Path, fp16_model: Path) -> None:
    """Noise images drive the random backbone's features so high that an FP16 sum of squares overflows."""
    batch = np.random.default_rng(0).uniform(0, 255, (2, 3, TINY_CROP, TINY_CROP)).astype(np.float32)
    probe = onnx.load(str(tiny_model))
    probe.graph.output.append(helper.make_tensor_value_info("/features/Concat_2_output_0", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["/features/Concat_2_output_0"], {"image": batch})[0]
    assert (features.astype(np.float64) ** 2).sum(axis=1).max() > FP16_MAX
    with np.errstate(over="ignore"):
        assert np.isinf(np.square(features.astype(np.float16)).sum(axis=1, dtype=np.float16)).any()
    maps32, _ = run(tiny_model, batch)
    maps16, scores16 = run(fp16_model, batch)
    assert np.isfinite(maps16).all() and np.isfinite(scores16).all()
    assert np.abs(maps16 - maps32).max() <= MAP_TOLERANCE


def plain_l2norm_model(channels: int = 8) -> onnx.ModelProto:
    """x * scale -> x / sqrt(sum(x^2)) named like the network's L2 norm (no max scaling: it overflows in FP16)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 2, 2])
    inits = [
        numpy_helper.from_array(np.full((1, channels, 1, 1), 100.0, np.float32), "scale"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["f"], name="/features/Mul"),
        helper.make_node("Mul", ["f", "f"], ["sq"], name="/l2norm/Mul"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], name="/l2norm/ReduceSum", keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm"], name="/l2norm/Sqrt"),
        helper.make_node("Div", ["f", "norm"], ["y"], name="/l2norm/Div"),
    ]
    graph = helper.make_graph(nodes, "plain", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp32_scope_is_what_prevents_overflow() -> None:
    """Without the FP32 scope the sum of squares is an FP16 tensor, and these features overflow it.

    onnxruntime's CPU kernels compute FP16 nodes in FP32 internally, so it cannot show the overflow
    itself (TensorRT on a GPU would); the test checks the types and the arithmetic instead.
    """
    model = plain_l2norm_model()
    x = np.full((1, 8, 2, 2), 30.0, np.float32)  # features of 3000: 8 * 3000^2 overflows FP16
    features = x * 100.0
    with np.errstate(over="ignore"):
        assert np.isinf(np.square(features.astype(np.float16)).sum(axis=1, dtype=np.float16)).all()
    mixed = convert_to_mixed_fp16(model)
    naive = convert_to_mixed_fp16(model, fp32_scopes=())
    assert output_types(mixed)["ss"] == TensorProto.FLOAT
    assert output_types(naive)["ss"] == TensorProto.FLOAT16
    y = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(np.sqrt((y.astype(np.float64) ** 2).sum(axis=1)), 1.0, atol=1e-3)


def test_scope_boundary_is_what_the_scope_reads_and_writes(tiny_model: Path) -> None:
    """Weights, Constants and the scope's own tensors are not entries; only tensors read outside it are exits."""
    assert scope_boundary(plain_l2norm_model().graph, "/l2norm/") == (["f"], ["y"])
    nodes = {n.name: n for n in onnx.load(str(tiny_model)).graph.node}
    entries, exits = read_scope_boundary(tiny_model)
    assert entries == [nodes["/l2norm/Abs"].input[0]] == ["/features/Concat_2_output_0"]
    assert exits == [nodes["/l2norm/Div_1"].output[0]]
    model = plain_l2norm_model()
    model.graph.node.append(helper.make_node("Identity", ["ss"], ["ss_copy"], name="/probe/Identity"))
    assert scope_boundary(model.graph, "/l2norm/") == (["f"], ["ss", "y"])  # a tensor read outside leaves the scope
    assert scope_boundary(model.graph, "/nowhere/") == ([], [])


def test_weights_beyond_fp16_range_are_refused() -> None:
    model = plain_l2norm_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((1, 8, 1, 1), 1e6, np.float32), "scale"))
    with pytest.raises(ProtoADError, match="scale.*FP16 range"):
        convert_to_mixed_fp16(model)


def test_unreadable_onnx_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ProtoADError, match="not found"):
        write_fp16_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ProtoADError, match="bad.onnx"):
        write_fp16_onnx(bad)
    assert not Bundle.of(bad).fp16_onnx.exists()
