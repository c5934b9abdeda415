"""INT8 Q/DQ export on the tiny bundle: which layers may be INT8, the search's trial models, the calibration images
(held out, never test), and the accuracy gate deciding whether NAME.int8.onnx is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import normal_crops
from PIL import Image

from protoad_edge.bundle import Bundle, sha256
from protoad_edge.constants import FP32_SCOPE, QDQ_SCHEME
from protoad_edge.errors import ProtoADError
from protoad_edge.evaluation import int8_export
from protoad_edge.evaluation.accuracy_gate import Verdict
from protoad_edge.export import int8
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.ort import OrtBackend

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def float_model(tiny_model: Path) -> onnx.ModelProto:
    return onnx.load(str(tiny_model))


def test_only_backbone_convs_are_candidates(float_model: onnx.ModelProto) -> None:
    convs = int8.backbone_convs(float_model)
    assert len(convs) == 43  # wide_resnet50_2 up to layer3
    assert all(c.startswith("/features/") and FP32_SCOPE not in c for c in convs)
    assert int8.prototype_matmuls(float_model) == ["/prototypes/MatMul"]  # after the L2 norm: never a candidate


@pytest.mark.slow
def test_trial_models_quantize_exactly_the_layers_kept(
    tiny_model: Path, float_model: onnx.ModelProto, tmp_path: Path
) -> None:
    convs = int8.backbone_convs(float_model)
    crops = normal_crops(4, 64, seed=3)
    int8._quantize(tiny_model, tmp_path / "all.onnx", convs, int8._Reader(float_model.graph.input[0].name, crops))
    qdq = onnx.load(str(tmp_path / "all.onnx"))
    assert int8.tensorrt_problems(qdq) == []  # INT8 zero points of 0, float biases: what TensorRT's parser builds
    zero_points = {n.input[2] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    asymmetric = onnx.ModelProto.FromString(qdq.SerializeToString())
    for init in asymmetric.graph.initializer:
        if init.name in zero_points:  # what the quantizer writes for UINT8 activations
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(128, np.uint8), init.name))
    assert len(int8.tensorrt_problems(asymmetric)) == 2 * len(zero_points)  # each Q and its DQ
    assert "zero point UINT8 [128] (needs INT8 zeros)" in int8.tensorrt_problems(asymmetric)[0]
    none = int8.only(qdq, float_model, set())
    assert not [n for n in none.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    x = to_batch(crops)
    fp32 = OrtBackend(tiny_model, providers=["CPUExecutionProvider"]).infer(x)[0]

    def maps(model: onnx.ModelProto) -> np.ndarray:
        path = tmp_path / "trial.int8.onnx"
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.metadata_props[:]  # the quantizer adds its own key; the bundle's are what the backend reads
        model.metadata_props.extend(float_model.metadata_props)
        onnx.save(model, str(path))
        return OrtBackend(path, providers=["CPUExecutionProvider"]).infer(x)[0]

    assert np.abs(maps(none) - fp32).max() < 1e-6  # nothing kept: FP32 again
    assert not [
        n
        for n in qdq.graph.node
        if n.op_type == "QuantizeLinear"
        and n.input[0] in {o for c in qdq.graph.node if c.op_type == "Conv" for o in c.output}
    ]  # no conv output rounded

    def rounded_readers(model: onnx.ModelProto) -> set[str]:
        return {n.name for n in model.graph.node for i in n.input if i.endswith("DequantizeLinear_Output")}

    full = int8.only(qdq, float_model, set(convs))
    assert rounded_readers(qdq) - set(convs)  # the quantizer hands rounded tensors to residual adds and taps too
    assert rounded_readers(full) == set(convs)  # only() to the convs alone: the rest read FP32
    assert np.abs(maps(full) - fp32).max() > 0
    assert rounded_readers(int8.only(qdq, float_model, {convs[5]})) == {convs[5]}


def qdq_model(zero_point: np.ndarray | None, bias: np.ndarray | None = None) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> y with ``zero_point`` (or none: the default 0), and optionally
    a quantized bias dequantized on its own (what the quantizer writes for a conv's bias)."""
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    inits, qdq_inputs = [scale], ["scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zero"))
        qdq_inputs.append("zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", *qdq_inputs], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", *qdq_inputs], ["y"], name="dq"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias_q"))
        nodes.append(helper.make_node("DequantizeLinear", ["bias_q", "scale"], ["bias"], name="dq_bias"))
        outputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])], outputs, initializer=inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensorrt_takes_int8_zero_points_of_zero_only() -> None:
    """TensorRT builds Q/DQ whose zero points are INT8 zeros: a non-zero INT8 one (the right type, an asymmetric
    range) is refused like a UINT8 one; so is a dequantized INT32 bias."""
    assert int8.tensorrt_problems(qdq_model(np.array(0, np.int8))) == []
    assert int8.tensorrt_problems(qdq_model(np.zeros(3, np.int8))) == []  # per channel
    assert int8.tensorrt_problems(qdq_model(None)) == []  # omitted: 0
    assert int8.tensorrt_problems(qdq_model(np.array(3, np.int8))) == [
        "q: zero point INT8 [3] (needs INT8 zeros)",
        "dq: zero point INT8 [3] (needs INT8 zeros)",
    ]
    assert int8.tensorrt_problems(qdq_model(np.array([0, 0, -1], np.int8))) == [
        "q: zero point INT8 [0, 0, -1] (needs INT8 zeros)",
        "dq: zero point INT8 [0, 0, -1] (needs INT8 zeros)",
    ]
    assert int8.tensorrt_problems(qdq_model(np.array(0, np.uint8)))[0] == "q: zero point UINT8 [0] (needs INT8 zeros)"
    assert int8.tensorrt_problems(qdq_model(np.array(0, np.int8), bias=np.array([1, 2, 3], np.int32))) == [
        "dq_bias: dequantizes INT32 bias_q (needs INT8)"
    ]


def test_conv_macs_from_shapes(float_model: onnx.ModelProto) -> None:
    macs = int8.conv_macs(float_model, int8.backbone_convs(float_model))
    assert macs["/features/backbone/conv1/Conv"] == 64 * 3 * 7 * 7 * 32 * 32  # crop 64, stride 2
    assert macs["/features/backbone/layer1/layer1.0/conv2/Conv"] == 128 * 128 * 3 * 3 * 16 * 16  # wide: 2x width
    assert len(macs) == 43


def test_search_takes_the_least_noise_per_multiply_add_within_tolerance() -> None:
    """Independent noises (error = root sum of squares): the search keeps the prefix that fits SEARCH_TOLERANCE,
    ordered by variance per multiply-add, so a 3x3 conv with 9x the work beats a quieter 1x1."""
    t = int8.SEARCH_TOLERANCE
    sensitivity = {"a_1x1": 0.6 * t, "b_1x1": 0.6 * t, "c_3x3": 0.7 * t}
    macs = {"a_1x1": 1, "b_1x1": 1, "c_3x3": 9}

    def error(nodes: list[str]) -> float:
        return float(np.sqrt(sum(sensitivity[n] ** 2 for n in nodes)))

    chosen, measured = int8._search(list(sensitivity), macs, error, lambda _: None)
    assert chosen == ["a_1x1", "c_3x3"]  # 0.92 t; least sensitive first would take a and b (0.85 t), 2 MACs not 10
    assert measured == sensitivity
    everything, measured = int8._search(["a_1x1"], macs, error, lambda _: None)
    assert everything == ["a_1x1"] and measured == {}  # all within tolerance: all, no per-layer trials


def test_search_tolerance_is_the_one_chosen_on_the_demo() -> None:
    """SEARCH_TOLERANCE was set on the generated demo category (benchmarks/RESULTS.md, "INT8 search tolerance"):
    the largest label-free error whose model passed the demo's accuracy gate. Changing it means re-measuring."""
    assert int8.SEARCH_TOLERANCE == 0.15


def test_calibration_images_are_the_builds_held_out_ones() -> None:
    torch_pipeline = pytest.importorskip("protoad_edge.builder.pipeline")
    samples = [f"img{i}" for i in range(40)]
    for val_split, seed in ((0.1, 0), (0.2, 7), (0.5, 3)):
        fit, val = torch_pipeline.split_train(samples, val_split, seed)
        chosen, held = int8_export.calibration_samples(samples, len(val), seed, minimum=4)
        assert chosen[:held] == val and held == len(val)
    chosen, held = int8_export.calibration_samples(samples, 3, 0, minimum=16)  # topped up with training images
    assert held == 3 and len(chosen) == 16 and len(set(chosen)) == 16


def write_dataset(root: Path, category: str) -> Path:
    """MVTec layout: 20 normal training images, 4 normal and 4 scratched test images with masks."""
    folder = root / category
    normal = normal_crops(28, 72, seed=21)
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (folder / sub).mkdir(parents=True)
    for i in range(20):
        Image.fromarray(normal[i]).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(4):
        Image.fromarray(normal[20 + i]).save(folder / "test/good" / f"{i:03d}.png")
        bad, mask = normal[24 + i].copy(), np.zeros((72, 72), np.uint8)
        bad[30:36, 10:60], mask[30:36, 10:60] = 255, 255
        Image.fromarray(bad).save(folder / "test/scratch" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def bundle_and_data(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("int8_bundle")
    for f in tiny_model.parent.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    bundle = Bundle.of(folder / tiny_model.name)
    bundle.seal(ModelInfo.load_json(bundle.sidecar)).save_json(bundle.sidecar)  # as a build leaves it
    return folder / tiny_model.name, write_dataset(tmp_path_factory.mktemp("int8_data"), "tiny")


@pytest.mark.slow
def test_export_writes_the_int8_model_and_records_the_loss(bundle_and_data: tuple[Path, Path]) -> None:
    model, data = bundle_and_data
    done = int8_export.export_int8(model, "tiny", data, accept=True, threads=2, log=lambda _: None)
    assert done.path == Bundle.of(model).file("int8_onnx") and done.path.is_file()
    record = ModelInfo.load_json(Bundle.of(model).sidecar).build["int8"]
    assert record["quantized"] == len(done.draft.quantized) > 0
    assert record["kept_fp32"] == done.draft.kept_fp32
    assert record["calibration_images"] == 16 and record["search"]["score_error"] <= int8.SEARCH_TOLERANCE
    gate = record["gate"]
    assert gate["images"] == 8 and gate["passed"] is done.verdict.passed
    assert gate["accepted_knowingly"] is (not done.verdict.passed)
    assert (
        gate["attempts"][-1]["quantized"] == record["quantized"]
        and gate["attempts"][-1]["passed"] is done.verdict.passed
    )
    assert gate["attempts"][0]["tolerance"] == int8.SEARCH_TOLERANCE
    assert record["scheme"] == QDQ_SCHEME  # what the TensorRT INT8 build checks
    assert {"image_auroc", "reference_image_auroc", "pixel_auroc", "spearman", "image_drop_pt"} <= set(gate)
    quantized = onnx.load(str(done.path))
    assert {p.key: p.value for p in quantized.metadata_props} == {
        p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props
    }
    backend = OrtBackend(done.path, providers=["CPUExecutionProvider"])  # the sidecar still matches it
    assert np.isfinite(backend.infer(to_batch(normal_crops(2, 64)))[0]).all()
    digests = ModelInfo.load_json(Bundle.of(model).sidecar).digests
    assert digests == {
        "onnx": sha256(model),
        "prototypes": sha256(Bundle.of(model).prototypes),
        "int8_onnx": sha256(done.path),
    }  # recorded beside the build's own
    Bundle.of(model).check(done.path)  # what protoad-run --model NAME.int8.onnx checks first
    qdq_nodes = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert qdq_nodes and not [n for n in quantized.graph.node if FP32_SCOPE in n.name and "Quantize" in n.op_type]


def test_a_failing_gate_writes_nothing(bundle_and_data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = bundle_and_data
    target = Bundle.of(model).file("int8_onnx")
    target.unlink(missing_ok=True)
    tolerances = []

    class CopyDraft:
        def __init__(self, onnx_path: Path, calibration: np.ndarray, workdir: Path, **_: object) -> None:
            assert len(calibration) == 16  # held-out (none in this bundle) topped up with training images, never test
            self.src, self.work = onnx_path, Path(workdir)

        def draft(self, tolerance: float) -> int8.Int8Draft:
            tolerances.append(tolerance)
            path = self.work / f"draft{len(tolerances)}.int8.onnx"
            shutil.copy(self.src, path)
            return int8.Int8Draft(
                path, ["c"], [], 0.1 / len(tolerances), {"quantized": 1, "search": {"tolerance": tolerance}}
            )

    monkeypatch.setattr(int8_export, "Int8Search", CopyDraft)
    monkeypatch.setattr(
        int8_export, "judge", lambda figures: Verdict(figures, ("image AUROC drops 9.00 pt (limit 0.5)",))
    )
    with pytest.raises(
        ProtoADError,
        match=r"tiny.int8.onnx fails the accuracy gate on 8 labelled images against FP32: "
        r"image AUROC .* was not written \(the most accurate of 3 searched, with 1 "
        r"convs in INT8\); pass --accept-accuracy-loss",
    ):
        int8_export.export_int8(model, "tiny", data, threads=2, log=lambda _: None)
    assert tolerances == [int8.SEARCH_TOLERANCE, 0.05, 0.025]  # each retry within half the failed draft's error
    assert not target.exists()
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".tiny.int8.")]  # the scratch folder is gone


class Gate:
    """A gate whose verdict is whether a draft's score error is at most ``limit``: what a real gate does in effect."""

    def __init__(self, limit: float) -> None:
        self.limit, self.seen = limit, []

    def __call__(self, draft: int8.Int8Draft) -> bool:
        self.seen.append(draft.search_error)
        return draft.search_error <= self.limit


def drafts_at(errors: dict[float, float | None]):
    """Drafts whose score error at each tolerance is ``errors[tolerance]`` (None: no conv fits)."""

    def draft(tolerance: float) -> int8.Int8Draft | None:
        error = errors[round(tolerance, 6)]
        return (
            None if error is None else int8.Int8Draft(Path(f"d{tolerance}"), ["c"] * round(100 * error), [], error, {})
        )

    return draft


def test_a_failed_gate_searches_again_with_less_noise() -> None:
    t = int8.SEARCH_TOLERANCE
    lines = []
    gate = Gate(0.04)
    draft, verdict, tried = int8.search_within_gate(
        drafts_at({t: 0.14, 0.07: 0.06, 0.03: 0.03}), gate, bool, lines.append
    )
    assert (draft.search_error, verdict) == (0.03, True) and [d.search_error for d, _ in tried] == [0.14, 0.06, 0.03]
    assert lines == [
        "int8: 14 convs in INT8 fail the accuracy gate; searching again within 0.07 of the FP32 spread",
        "int8: 6 convs in INT8 fail the accuracy gate; searching again within 0.03 of the FP32 spread",
    ]
    draft, verdict, tried = int8.search_within_gate(drafts_at({t: 0.12}), Gate(0.2), bool, lines.append)
    assert (draft.search_error, verdict, len(tried)) == (0.12, True, 1)  # passed at once: no retry


def test_retries_are_bounded_and_keep_the_most_accurate() -> None:
    t = int8.SEARCH_TOLERANCE
    gate = Gate(0.0)
    draft, verdict, tried = int8.search_within_gate(
        drafts_at({t: 0.14, 0.07: 0.06, 0.03: 0.02}), gate, bool, lambda _: None
    )
    assert int8.GATE_RETRIES == 2 and len(gate.seen) == 3  # the first search and two retries, then the refusal
    assert (draft.search_error, verdict) == (0.02, False)
    draft, verdict, tried = int8.search_within_gate(drafts_at({t: 0.14, 0.07: None}), gate, bool, lambda _: None)
    assert (draft.search_error, len(tried)) == (0.14, 1)  # nothing fits the retry: the failed draft is reported
    assert int8.search_within_gate(drafts_at({t: None}), gate, bool, lambda _: None) is None


def test_too_few_calibration_images(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ProtoADError, match="INT8 calibration needs at least 16 normal images, got 3"):
        int8.Int8Search(tiny_model, normal_crops(3, 64), tmp_path)
