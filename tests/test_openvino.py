"""The OpenVINO backend: the same maps as onnxruntime at FP32, the precision it actually ran read back from the
compiled model, its registry row (``--backend openvino`` everywhere) and its device rules. Skipped only where
openvino is not installed (it is in the ``test`` extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import normal_crops
from PIL import Image

from protoad_edge.bundle import Bundle
from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.registry import REGISTRY, choose, open_backend

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install 'protoad-edge[openvino]')",
)


def test_registry_row() -> None:
    entry = REGISTRY["openvino"]
    assert entry.files[0] == "onnx" and "int8_onnx" in entry.files
    assert (entry.needs, entry.install) == ("openvino", "pip install 'protoad-edge[openvino]'")
    assert entry.precisions == ("fp32", "bf16", "fp16", "bf16-all", "fp16-all")
    assert entry.target == "protoad_edge.runtime.backends.openvino:OpenVinoBackend"
    assert "torch" not in entry.target and not entry.needs_torch


def test_devices() -> None:
    from protoad_edge.runtime.backends.openvino import resolve_device

    assert resolve_device(["CPU"], "auto") == "CPU"
    assert resolve_device(["CPU", "GPU.0", "GPU.1"], "auto") == "GPU.0"  # an Intel GPU where one exists
    assert resolve_device(["CPU", "GPU.0"], "cpu") == "CPU"
    assert resolve_device(["CPU", "GPU.0", "GPU.1"], "gpu.1") == "GPU.1"
    with pytest.raises(ProtoADError, match="--device cuda: OpenVINO runs on Intel CPUs and GPUs"):
        resolve_device(["CPU"], "cuda")
    with pytest.raises(ProtoADError, match="--device npu: OpenVINO has CPU here"):
        resolve_device(["CPU"], "npu")


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return to_batch(normal_crops(3, 64, seed=11))


@needs_openvino
def test_fp32_maps_equal_onnxruntime(tiny_model: Path, batch: np.ndarray) -> None:
    options = BackendOptions(device="cpu", threads=2)
    with (
        open_backend(tiny_model, "ort", options=options) as ort,
        open_backend(tiny_model, "openvino", options=options) as ov,
    ):
        assert ov.name == "openvino" and ov.info == ort.info
        ort_maps, ort_scores = ort.infer(batch)
        ov_maps, ov_scores = ov.infer(batch)
        facts = ov.describe()
    assert ov_maps.shape == ort_maps.shape and ov_maps.dtype == np.float32
    assert np.abs(ov_maps - ort_maps).max() < 1e-5
    assert np.abs(ov_scores - ort_scores).max() < 1e-5
    assert (facts.precision, facts.device, facts.details["inference_precision"]) == ("fp32", "cpu", "fp32")
    assert facts.details["threads"] == 2 and "note" not in facts.details
    assert set(facts.details["compute_layers_by_precision"]) == {"f32"}
    assert (tiny_model.parent / ".ov_cache").is_dir()  # compiled models cached beside the model


@needs_openvino
def test_precision_is_read_back_from_the_compiled_model(tiny_model: Path, batch: np.ndarray) -> None:
    options = BackendOptions(device="cpu", precision="bf16-all")
    if not has("BF16"):  # the CPU has no BF16: refused, not silently run in FP32
        with pytest.raises(ProtoADError, match="openvino:bf16-all: CPU .* has no BF16 units"):
            open_backend(tiny_model, "openvino", options=options)
        return
    with open_backend(tiny_model, "openvino", options=options) as backend:
        facts = backend.describe()
        maps = backend.infer(batch)[0]
    assert facts.details["precision_asked"] == "bf16-all" and facts.details["inference_precision"] == "bf16-all"
    compute = facts.details["compute_layers_by_precision"]
    assert compute.get("bf16") and compute.get("f32")  # OpenVINO keeps the prototype stage's products in FP32 itself
    total = sum(compute.values())
    assert (
        facts.precision == f"bf16 (whole network; {compute['f32']} of {total} compute layers fp32, OpenVINO's choice)"
    )
    assert facts.details["fp32_scope_not_fp32"]  # the whole network: the cosine stage too, and the read back sees it
    assert np.isfinite(maps).all()
    with pytest.raises(ProtoADError, match="openvino: unknown precision 'int4'"):
        open_backend(tiny_model, "openvino", options=BackendOptions(precision="int4"))
    with pytest.raises(ProtoADError, match="--device cuda"):
        open_backend(tiny_model, "openvino", options=BackendOptions(device="cuda"))


@needs_openvino
def test_the_registry_picks_the_named_onnx(tiny_model: Path) -> None:
    bundle = Bundle.of(tiny_model)
    assert choose(bundle, tiny_model, "openvino") == (REGISTRY["openvino"], tiny_model)
    assert choose(bundle, bundle.sidecar, "openvino") == (REGISTRY["openvino"], tiny_model)


@needs_openvino
def test_protoad_run_with_backend_openvino(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, rgb in enumerate(normal_crops(2, 72, seed=4)):
        Image.fromarray(rgb).save(folder / f"{i}.png")
    out = tmp_path / "run.jsonl"
    result = CliRunner().invoke(
        run_main, [str(folder), "--model", str(tiny_model), "--backend", "openvino", "--jsonl", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["verdict"] in ("ok", "anomaly") for r in records)
    assert "openvino" in result.output


# --- mixed precision: the backbone in BF16, from the L2 norm's input to the score in FP32 (issue 29) -------------


def has(capability: str) -> bool:
    """Whether this machine's CPU has ``capability`` among OpenVINO's OPTIMIZATION_CAPABILITIES."""
    import openvino as ov

    return capability in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_a_device_without_the_units_is_refused_in_one_line() -> None:
    from protoad_edge.runtime.backends.openvino_precision import check_capability

    for precision in ("fp32", "bf16", "bf16-all"):
        check_capability(precision, "CPU", "Xeon", ["FP32", "BF16", "INT8"])
    check_capability("fp16", "GPU.0", "Arc A770", ["FP32", "FP16", "INT8"])
    with pytest.raises(
        ProtoADError,
        match=r"^openvino:bf16: CPU \(Core i7\) has no BF16 units \(its optimization "
        r"capabilities: FP32, INT8\); run --backend openvino \(FP32\), or BF16 on "
        r"a CPU with AVX512-BF16 or AMX$",
    ):
        check_capability("bf16", "CPU", "Core i7", ["FP32", "INT8"])
    with pytest.raises(ProtoADError, match=r"^openvino:bf16-all: CPU \(Core i7\) has no BF16 units"):
        check_capability("bf16-all", "CPU", "Core i7", ["FP32", "INT8"])
    with pytest.raises(ProtoADError, match=r"^openvino:fp16: CPU \(EPYC\) has no FP16 units .*\(FP32\)$"):
        check_capability("fp16", "CPU", "EPYC", ["FP32", "BF16", "INT8"])
    with pytest.raises(ProtoADError, match=r"^openvino:bf16: GPU.0 \(Arc A770\) has no BF16 units"):
        check_capability("bf16", "GPU.0", "Arc A770", ["FP32", "FP16"])


@needs_openvino
def test_protoad_run_refuses_a_precision_this_cpu_lacks_in_one_line(tiny_model: Path, tmp_path: Path) -> None:
    lacking = next((p for p, unit in (("fp16", "FP16"), ("bf16", "BF16")) if not has(unit)), None)
    if lacking is None:  # a CPU with both (Sapphire Rapids and later): nothing to refuse here
        return
    Image.fromarray(normal_crops(1, 72)[0]).save(tmp_path / "0.png")
    result = CliRunner().invoke(
        run_main, [str(tmp_path / "0.png"), "--model", str(tiny_model), "--backend", f"openvino:{lacking}"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: openvino:{lacking}: CPU ({result.output.split('(')[1].split(')')[0]}) has no {lacking.upper()} units"
        + result.output.split("units", 1)[1].rstrip()
    ]


def test_every_cli_takes_a_backend_precision() -> None:
    from protoad_edge.cli.bench import main as bench_main
    from protoad_edge.cli.eval import main as eval_main
    from protoad_edge.cli.serve import main as serve_main

    for main in (run_main, eval_main, bench_main, serve_main):
        option = next(p for p in main.params if p.name == "backend")
        assert {"openvino", "openvino:bf16", "openvino:fp16", "openvino:bf16-all"} <= set(option.type.choices)
        assert "ort:bf16" not in option.type.choices and "openvino:fp32" not in option.type.choices


def projected_onnx(out: Path, dims: int = 12) -> Path:
    """A tiny bundle of the projected network (``--project-dims``): its projection is inside the L2 norm's scope."""
    import torch

    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.network import L2Norm, ProtoADNet
    from protoad_edge.builder.projection import fit_projection
    from protoad_edge.constants import BACKBONE
    from protoad_edge.export.onnx import export_onnx
    from protoad_edge.metadata import ModelInfo

    features = PatchFeatures(build_backbone("none", 0)[0], 64, "bilinear").eval()
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(normal_crops(6, 64)))))
    vectors = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()
    prototypes = vectors[np.random.default_rng(0).choice(len(vectors), 48, replace=False)]
    fit = fit_projection(prototypes, dims, fitted_on="prototypes")
    net = ProtoADNet(features, torch.from_numpy(prototypes), 64, projection=fit.module()).eval()
    info = ModelInfo(
        category="proj",
        resize=72,
        crop=64,
        backbone=BACKBONE,
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=48,
        image_threshold=0.0,
        pixel_threshold=0.0,
        projection=fit.record,
    )
    out.mkdir(parents=True, exist_ok=True)
    return export_onnx(net, info, out / "proj.onnx")


@pytest.fixture(scope="module")
def networks(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> dict[str, Path]:
    return {"paper": tiny_model, "projected": projected_onnx(tmp_path_factory.mktemp("projected"))}


def tail_of_the_graph(onnx_path: Path) -> set[str]:
    """Names of the ONNX nodes from the L2 norm's input tensors (the TensorRT FP16 build's scope entries) to the
    outputs, and of the tensors they write (OpenVINO names a node feeding an output after it), found from the graph
    itself, independently of the backend."""
    import onnx

    from protoad_edge.export.fp16 import read_scope_boundary

    tensors = set(read_scope_boundary(onnx_path)[0])
    names = set()
    for node in onnx.load(str(onnx_path)).graph.node:  # topological order
        if node.op_type != "Constant" and tensors & set(node.input):
            names |= {node.name, *node.output}
            tensors |= set(node.output)
    return names


@needs_openvino
@pytest.mark.parametrize("network", ["paper", "projected"])
def test_the_fp32_scope_is_what_stays_fp32_in_the_compiled_model(
    network: str, networks: dict[str, Path], batch: np.ndarray
) -> None:
    model = networks[network]
    options = BackendOptions(device="cpu", threads=2, precision="bf16")
    if not has("BF16"):
        with pytest.raises(ProtoADError, match="openvino:bf16: CPU .* has no BF16 units"):
            open_backend(model, "openvino", options=options)
        return
    tail = tail_of_the_graph(model)
    assert any("/l2norm/" in n for n in tail) and any("/prototypes/" in n for n in tail) and "score" in tail
    with (
        open_backend(model, "openvino", options=options) as mixed,
        open_backend(model, "ort", options=BackendOptions(device="cpu", threads=2)) as ort,
    ):
        runtime = [op.get_rt_info() for op in mixed.compiled.get_runtime_model().get_ordered_ops()]
        facts = mixed.describe()
        scores, reference = mixed.infer(batch)[1], ort.infer(batch)[1]
    read = [
        (
            rt["layerType"].astype(str),
            rt["runtimePrecision"].astype(str),
            rt["outputPrecisions"].astype(str),
            set(rt["originalLayersNames"].astype(str).split(",")),
        )
        for rt in runtime
    ]
    scope = [(kind, runs, writes) for kind, runs, writes, names in read if names & tail and kind != "Const"]
    # The input's scaling ahead of the stem stays FP32 too: the image is rounded to BF16 once, at the first conv.
    head = [(kind, runs, writes) for kind, runs, writes, names in read if names & {"/features/Mul", "/features/Add"}]
    assert head and all(runs == "f32" and "bf16" not in writes for _, runs, writes in head), head
    assert len(scope) >= 10 and {kind for kind, _, _ in scope} >= {"Eltwise", "Reduce", "MatMul", "Convolution"}
    assert all(runs not in ("bf16", "f16") and "bf16" not in writes for _, runs, writes in scope), scope
    backbone = [
        runs
        for kind, runs, _, names in read
        if kind == "Convolution" and all(n.startswith("/features/backbone/") for n in names)
    ]
    assert len(backbone) >= 40 and set(backbone) == {"bf16"}  # WRN50 layer1-3: the lowered part
    assert facts.precision == "bf16 backbone + fp32 scope" and facts.details["precision_asked"] == "bf16"
    assert facts.details["fp32_scope_nodes"] == len(scope) + len(head) and facts.details["fp32_scope_not_fp32"] == []
    assert np.abs(scores - reference).max() < 2e-3  # BF16 noise of the backbone only (the whole network: ~3e-3)


def write_graded(root: Path) -> Path:
    """MVTec layout, category 'tiny': 8 normal test images and 8 with a scratch of graded strength (5-30 grey
    levels), so the image scores spread evenly and a reduced precision that moves them reorders them. The random
    weights detect nothing here; the gate judges agreement with FP32, which these images measure."""
    folder = root / "tiny"
    normal = normal_crops(16, 72, seed=3)
    for sub in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (folder / sub).mkdir(parents=True)
    Image.fromarray(normal[0]).save(folder / "train/good/000.png")
    for i, strength in enumerate(np.linspace(5, 30, 8)):
        Image.fromarray(normal[i]).save(folder / "test/good" / f"{i:03d}.png")
        bad, mask = normal[8 + i].astype(float), np.zeros((72, 72), np.uint8)
        bad[30:36, 10:60] += strength
        mask[30:36, 10:60] = 255
        Image.fromarray(np.clip(bad, 0, 255).astype(np.uint8)).save(folder / "test/scratch" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@needs_openvino
def test_the_gate_passes_the_mixed_model_and_refuses_it_with_the_scope_broken(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from protoad_edge.cli.eval import main as eval_main
    from protoad_edge.runtime.backends import openvino_precision

    data = write_graded(tmp_path / "data")
    report = tmp_path / "gate.json"
    args = [
        "--model",
        str(tiny_model),
        "--category",
        "tiny",
        "--data-root",
        str(data),
        "--device",
        "cpu",
        "--threads",
        "2",
        "--compare",
        "openvino,openvino:bf16",
        "--json",
        str(report),
    ]
    result = CliRunner().invoke(eval_main, args)
    if not has("BF16"):
        assert result.exit_code == 2 and "has no BF16 units" in result.output
        return
    assert result.exit_code == 0, result.output
    gate = json.loads(report.read_text())["comparisons"]["tiny"]["backends"]["openvino:bf16"]["accuracy_gate"]
    assert gate["passed"] and gate["images"] == 16 and gate["spearman"] >= 0.99
    # Broken on purpose: the L2 norm alone kept in FP32 (as TensorRT's FP16 build does), the cosine and 1 - x in BF16.
    monkeypatch.setattr(
        openvino_precision,
        "scope_names",
        lambda model: {
            op.get_friendly_name() for op in model.get_ordered_ops() if "/l2norm/" in op.get_friendly_name()
        },
    )
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 2
    assert "error: openvino:bf16 fails the accuracy gate on 16 labelled images against FP32" in result.output
    gate = json.loads(report.read_text())["comparisons"]["tiny"]["backends"]["openvino:bf16"]["accuracy_gate"]
    assert not gate["passed"] and gate["spearman"] < 0.99


@needs_openvino
def test_protoad_run_and_eval_with_backend_openvino_bf16(tiny_model: Path, tmp_path: Path) -> None:
    if not has("BF16"):
        return  # refused in one line: test_protoad_run_refuses_a_precision_this_cpu_lacks_in_one_line
    from protoad_edge.evaluation.evaluate import evaluate_category

    Image.fromarray(normal_crops(1, 72)[0]).save(tmp_path / "0.png")
    result = CliRunner().invoke(
        run_main, [str(tmp_path / "0.png"), "--model", str(tiny_model), "--backend", "openvino:bf16", "--threads", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "backend openvino (cpu, bf16 backbone + fp32 scope)" in result.output
    evaluated = evaluate_category(
        tiny_model,
        "tiny",
        write_graded(tmp_path / "data"),
        backend="openvino:bf16",
        options=BackendOptions(device="cpu", threads=2),
    )
    assert evaluated.backend == "openvino (cpu, bf16 backbone + fp32 scope)" and len(evaluated.maps) == 16


@needs_openvino
def test_an_int8_model_is_refused_in_the_mixed_form_in_one_line() -> None:
    import openvino as ov
    import openvino.opset13 as ops

    from protoad_edge.runtime.backends.openvino_precision import check_not_quantized

    x = ops.parameter([1, 4], np.float32, name="x")
    bounds = [ops.constant(np.float32(v)) for v in (0, 1, 0, 1)]
    plain = ov.Model([ops.relu(x)], [x])
    quantized = ov.Model([ops.fake_quantize(x, *bounds, levels=256)], [x])
    check_not_quantized(plain, "bf16", "m.onnx")
    with pytest.raises(
        ProtoADError,
        match=r"^openvino:bf16 on m.int8.onnx: an INT8 model's other layers cannot be "
        r"lowered without losing its INT8 layers in OpenVINO; run it with --backend "
        r"openvino \(INT8 \+ FP32\), or the FP32 model with openvino:bf16$",
    ):
        check_not_quantized(quantized, "bf16", "m.int8.onnx")


@needs_openvino
def test_a_compiled_model_that_lowers_the_scope_is_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read back is the guarantee: were OpenVINO to lower the scope after all (here: the model lowered and the
    BF16 hint on top, under which the plugin lowers the rest too), the backend refuses to run it."""
    if not has("BF16"):
        return  # refused before compiling: test_protoad_run_refuses_a_precision_this_cpu_lacks_in_one_line
    from protoad_edge.runtime.backends import openvino as openvino_backend

    monkeypatch.setattr(openvino_backend, "mode", lambda precision: ("bf16", "bf16"))
    with pytest.raises(
        ProtoADError,
        match=r"^openvino:bf16: OpenVINO .* on CPU runs \d+ node\(s\) kept in FP32 \(the input scaling, the scope\) "
        r"in a reduced precision \(/features/Mul, /l2norm/.*\): run --backend openvino \(FP32\)$",
    ):
        open_backend(tiny_model, "openvino", options=BackendOptions(device="cpu", precision="bf16"))


@needs_openvino
def test_the_lowered_weights_are_rounded_to_nearest_not_truncated() -> None:
    """OpenVINO folds a Convert to BF16 by truncating (1.005 -> 1.0); lower_outside rounds the constants first, to
    nearest with ties to even, as torch does: 1.005 -> 1.0078125, 1 + 2^-8 (a tie) -> 1.0."""
    import openvino as ov
    import openvino.opset13 as ops
    import torch

    from protoad_edge.runtime.backends.openvino_precision import lower_outside, round_to_bf16

    values = np.float32([1.005, -1.005, 1 + 2**-8, 1 + 3 * 2**-8, 0.30001, 3.14159])
    nearest = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert nearest[0] == np.float32(1.0078125) and nearest[2] == 1.0 and nearest[3] == np.float32(1.015625)
    many = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * np.float32(2.0) ** np.arange(-20, 20)[
        np.random.default_rng(1).integers(0, 40, 100_000)
    ].astype(np.float32)
    assert np.array_equal(round_to_bf16(many), torch.from_numpy(many).to(torch.bfloat16).float().numpy())

    image = ops.parameter([6], ov.Type.f32, name="image")
    model = ov.Model([ops.multiply(image, ops.constant(values))], [image])
    lower_outside(model, "bf16", scope=set())
    folded = [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
    assert len(folded) == 1 and folded[0].dtype != np.float32  # the weight was lowered to BF16
    request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    np.testing.assert_array_equal(request.infer({0: np.ones(6, np.float32)})[0], nearest)
