"""protoad-export end to end on generated data: the bundle, its metadata, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import normal_crops

from protoad_edge.builder.demo import generate_demo
from protoad_edge.cli.export import main as export_main
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.ort import OrtBackend

SMALL = ["--weights", "none", "--resize", "128", "--crop", "112", "--max-prototypes", "1500"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_demo(root)
    return root


@pytest.fixture(scope="module")
def demo_export(demo_root: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("models")
    result = CliRunner().invoke(
        export_main, ["--category", "demo", "--data-root", str(demo_root), "--out", str(out), *SMALL]
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_writes_the_three_files_and_nothing_else(demo_export: tuple[Path, str]) -> None:
    out, _ = demo_export
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.onnx", "demo.prototypes.npy"]


def test_summary_reports_every_stage(demo_export: tuple[Path, str]) -> None:
    _, output = demo_export
    for needle in (
        "images",
        "train 18, held out 2, test 24",
        "warning       thresholds set on 2 held-out images: with so few, the rule is expected to flag about 16 %",
        "patch vectors 14,112",
        "FINCH levels",
        "K = ",
        "time ",
        "features",
        "finch",
        "ONNX parity",
        "image AUROC",
        "pixel AUROC",
        "demo.onnx",
    ):
        assert needle in output, needle
    assert "Traceback" not in output


def test_onnx_is_valid_with_metadata_and_dynamic_batch(demo_export: tuple[Path, str]) -> None:
    out, _ = demo_export
    model = onnx.load(str(out / "demo.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in model.metadata_props}
    info = ModelInfo.from_props(props)
    side = ModelInfo.load_json(out / "demo.json")
    assert info == dataclasses.replace(side, digests=None)  # all but the digests of the files, itself among them
    assert (info.category, info.crop, info.resize, info.weights, info.feature_upsample) == (
        "demo",
        112,
        128,
        "none",
        "bilinear",
    )
    assert np.isfinite(info.image_threshold) and 0 < info.pixel_threshold <= info.image_threshold
    assert info.build["onnx_parity_max_abs"] <= 1e-4
    assert info.build["test"]["image_auroc"] > 0.65  # 0.82 measured at this small size with random weights
    # No layer4 in the graph: the backbone stops at layer3.
    assert not any("layer4" in n.name for n in model.graph.node)


def test_prototypes_are_the_kernels(demo_export: tuple[Path, str]) -> None:
    out, _ = demo_export
    info = ModelInfo.load_json(out / "demo.json")
    protos = np.load(out / "demo.prototypes.npy")
    assert protos.shape == (info.num_prototypes, 1792) and info.num_prototypes < 1500
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-5)
    model = onnx.load(str(out / "demo.onnx"))
    # The prototypes are the only weights with 1792 input channels (one tensor, or blocks of it in order).
    blocks = [t for t in model.graph.initializer if len(t.dims) >= 2 and t.dims[1] == 1792]
    blocks.sort(key=lambda t: [int(part) if part.isdigit() else part for part in t.name.split(".")])
    kernels = np.concatenate([onnx.numpy_helper.to_array(t).reshape(-1, 1792) for t in blocks])
    assert np.array_equal(kernels, protos)


def test_any_batch_size_runs(demo_export: tuple[Path, str]) -> None:
    out, _ = demo_export
    backend = OrtBackend(out / "demo.onnx", providers=["CPUExecutionProvider"])
    crops = np.transpose(normal_crops(3, 112), (0, 3, 1, 2)).astype(np.float32)
    maps3, scores3 = backend.infer(crops)
    maps1, scores1 = backend.infer(crops[1:2])
    assert maps3.shape == (3, 112, 112) and scores3.shape == (3,)
    assert np.abs(maps3[1] - maps1[0]).max() < 1e-5
    np.testing.assert_allclose(scores3, maps3.reshape(3, -1).max(axis=1), atol=1e-6)


def _tiny_mvtec(root: Path, demo_root: Path) -> Path:
    """A 4-train, 2-test MVTec-layout copy of a few demo images."""
    src, cat = demo_root / "demo", root / "part"
    for rel in (
        "train/good/000.png",
        "train/good/001.png",
        "train/good/002.png",
        "train/good/003.png",
        "test/good/000.png",
        "test/crack/000.png",
        "ground_truth/crack/000_mask.png",
    ):
        (cat / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, cat / rel)
    return cat


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(export_main, args)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing root", "nowhere"),
        ("missing category", "nothing"),
        ("empty folder", "empty"),
        ("corrupt image", "001.png"),
        ("mask without image", "005_mask.png"),
        ("bad val split", "--val-split"),
        ("bad upsample", "--feature-upsample"),
        ("bad weights path", "no-such-weights.pth"),
        ("cuda without gpu", "--device cuda"),
        ("no category", "--category"),
        ("bad memory limit", "--memory-limit 'banana'"),
        ("memory limit too small", "--memory-limit 1.0 GB is too small to build"),
    ],
)
def test_bad_input_gives_one_clear_line(case: str, expected: str, tmp_path: Path, demo_root: Path) -> None:
    pytest.importorskip("torch").cuda.is_available() and case == "cuda without gpu" and pytest.skip("has a GPU")
    data, out = tmp_path / "data", tmp_path / "out"
    _tiny_mvtec(data, demo_root)
    args = [
        "--data-root",
        str(data),
        "--category",
        "part",
        "--out",
        str(out),
        "--weights",
        "none",
        "--crop",
        "64",
        "--resize",
        "72",
    ]
    if case == "missing root":
        args[1] = str(tmp_path / "nowhere")
    elif case == "missing category":
        args[3] = "nothing"
    elif case == "empty folder":
        (data / "empty").mkdir()
        args[3] = "empty"
        args += ["--dataset", "folder"]
    elif case == "corrupt image":
        (data / "part/train/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    elif case == "mask without image":
        shutil.copy(data / "part/ground_truth/crack/000_mask.png", data / "part/ground_truth/crack/005_mask.png")
    elif case == "bad val split":
        args += ["--val-split", "1.5"]
    elif case == "bad upsample":
        args += ["--feature-upsample", "bicubic"]
    elif case == "bad weights path":
        args[args.index("none")] = str(tmp_path / "no-such-weights.pth")
    elif case == "cuda without gpu":
        args += ["--device", "cuda"]
    elif case == "no category":
        args = args[:2] + args[4:]
    elif case == "bad memory limit":
        args += ["--memory-limit", "banana"]
    elif case == "memory limit too small":
        args += ["--memory-limit", "1G"]
    code, output = _run(args)
    assert code != 0
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1 and expected in errors[0], output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_late_failure_writes_nothing(
    tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: None
) -> None:
    """A build that fails at its last check (ONNX parity) leaves no model file, not even a temporary one."""
    import protoad_edge.builder.pipeline as build_module

    data, out = tmp_path / "data", tmp_path / "out"
    _tiny_mvtec(data, demo_root)
    monkeypatch.setattr(build_module, "PARITY_TOLERANCE", -1.0)
    code, output = _run(
        [
            "--data-root",
            str(data),
            "--category",
            "part",
            "--out",
            str(out),
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            "--max-prototypes",
            "50",
        ]
    )
    assert code != 0 and "ONNX parity check failed" in output and "Traceback" not in output
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_a_build_over_its_memory_budget_spills_says_so_and_writes_the_same_model(
    demo_export: tuple[Path, str], demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: None
) -> None:
    """With room for almost no array, FINCH's cluster sums go to disk; the build log says what, how big and where,
    and the prototypes are the in-memory build's, bit for bit."""
    import protoad_edge.builder.pipeline as build_module

    monkeypatch.setattr(build_module, "arrays_within", lambda limit: 100_000)
    code, output = _run(
        [
            "--category",
            "demo",
            "--data-root",
            str(demo_root),
            "--out",
            str(tmp_path / "out"),
            *SMALL,
            "--memory-limit",
            "3G",
        ]
    )
    assert code == 0, output
    assert "memory: limit 3.0 GB (--memory-limit)" in output
    assert re.search(r"memory: spilled FINCH level 0 cluster sums \([\d.]+ MB\) to a file in \S+", output), output
    out, _ = demo_export
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "demo.prototypes.npy"), np.load(out / "demo.prototypes.npy")
    )


# --- the build's decisions, checked from outside -----------------------------------------------


def test_thresholds_come_from_the_held_out_images(demo_export: tuple[Path, str], demo_root: Path) -> None:
    """The image threshold is the rule applied to the held-out normal images' maps, not the training images'."""
    from protoad_edge.builder.datasets import load_crops, open_dataset
    from protoad_edge.builder.pipeline import split_train
    from protoad_edge.decision import image_scores
    from protoad_edge.runtime.backends.base import run_maps

    out, _ = demo_export
    backend = OrtBackend(out / "demo.onnx", providers=["CPUExecutionProvider"])
    info = backend.info
    fit, val = split_train(open_dataset("demo", demo_root).train, 0.1, info.seed)
    assert len(val) == 2 and info.build["images"]["held_out"] == 2

    def rule(samples: list) -> float:
        scores = image_scores(run_maps(backend, load_crops(samples, info.preprocess), 8)).astype(np.float64)
        return max(float(scores.max()), float(scores.mean() + 3 * scores.std()))

    held_out, training = rule(val), rule(fit)
    assert info.image_threshold == pytest.approx(held_out, rel=1e-6, abs=0)
    assert abs(training - held_out) > 1e-3 * held_out  # so the comparison above can tell them apart


def test_the_sidecar_records_each_files_digest_and_names_the_rule(demo_export: tuple[Path, str]) -> None:
    out, _ = demo_export
    info = ModelInfo.load_json(out / "demo.json")
    assert info.digests == {
        kind: hashlib.sha256((out / name).read_bytes()).hexdigest()
        for kind, name in (("onnx", "demo.onnx"), ("prototypes", "demo.prototypes.npy"))
    }
    assert info.threshold_rule == "held-out" and info.threshold_detail.startswith("image: max(max, mean + 3 std)")
    assert "digests" not in {p.key for p in onnx.load(str(out / "demo.onnx")).metadata_props}


@pytest.mark.slow
def test_a_rebuild_without_held_out_images_disowns_an_old_plan(
    tmp_path: Path, demo_root: Path, torch_threads: None
) -> None:
    """A plan left by an earlier build of the name is not recorded by the new sidecar: refused, not run with the
    new thresholds. With no image held out the rule says so."""
    from protoad_edge.bundle import Bundle
    from protoad_edge.errors import ProtoADError

    data = tmp_path / "data"
    _tiny_mvtec(data, demo_root)
    bundle = Bundle(tmp_path / "models" / "part")
    bundle.plan.parent.mkdir()
    bundle.plan.write_bytes(b"an engine of the earlier build")
    code, output = _run(
        [
            "--data-root",
            str(data),
            "--category",
            "part",
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            "--max-prototypes",
            "50",
            "--val-split",
            "0",
            "--tensorrt",
            "no",
            "--out",
            str(bundle.stem.parent),
        ]
    )
    assert code == 0, output
    info = ModelInfo.load_json(bundle.sidecar)
    assert info.threshold_rule == "training-images"
    assert info.threshold_detail.endswith("(no held-out images: set on training images, optimistic)")
    assert set(info.digests) == {"onnx", "prototypes"}
    bundle.check(bundle.onnx)
    with pytest.raises(ProtoADError, match=r"part.plan does not match .*part.json, which records no digest for it"):
        bundle.check(bundle.plan)


@pytest.mark.slow
def test_a_second_export_reuses_the_feature_cache(tmp_path: Path, demo_root: Path, torch_threads: None) -> None:
    data = tmp_path / "data"
    _tiny_mvtec(data, demo_root)
    args = [
        "--data-root",
        str(data),
        "--category",
        "part",
        "--weights",
        "none",
        "--crop",
        "64",
        "--resize",
        "72",
        "--max-prototypes",
        "50",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, first = _run([*args, "--out", str(tmp_path / "a")])
    assert code == 0, first
    assert "features: cached at" in first and "from the feature cache" not in first
    code, second = _run([*args, "--out", str(tmp_path / "b")])
    assert code == 0, second
    assert "features: cache hit" in second and "(from the feature cache)" in second
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    a, b = (np.load(tmp_path / d / "part.prototypes.npy") for d in ("a", "b"))
    assert np.array_equal(a, b)  # the same features give the same prototypes


@pytest.mark.slow
def test_a_build_can_write_its_triton_repository(tmp_path: Path, demo_root: Path, torch_threads: None) -> None:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from protoad_edge.metadata import ModelInfo
    from protoad_edge.runtime.serving.triton import info_from_config

    data = tmp_path / "data"
    _tiny_mvtec(data, demo_root)
    code, output = _run(
        [
            "--data-root",
            str(data),
            "--category",
            "part",
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            "--max-prototypes",
            "50",
            "--out",
            str(tmp_path / "models"),
            "--triton-repo",
            str(tmp_path / "repo"),
        ]
    )
    assert code == 0, output
    assert "triton        part (onnxruntime_onnx)" in output
    config = text_format.Parse((tmp_path / "repo/part/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    served = info_from_config(json_format.MessageToDict(config, preserving_proto_field_name=True), "repo/part")
    assert served == ModelInfo.load_json(tmp_path / "models/part.json")  # the thresholds the build just set
    assert (tmp_path / "repo/part/1/model.onnx").read_bytes() == (tmp_path / "models/part.onnx").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("exact", [False, True])
def test_exact_neighbours_flag_reaches_the_search(
    exact: bool, tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: None
) -> None:
    """768 training vectors take the approximate search once it starts at 100 rows, unless --exact-neighbours."""
    from protoad_edge.builder import neighbours

    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 100)
    data = tmp_path / "data"
    _tiny_mvtec(data, demo_root)
    code, output = _run(
        [
            "--data-root",
            str(data),
            "--category",
            "part",
            "--out",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            "--max-prototypes",
            "50",
            "--no-cache",
            *(["--exact-neighbours"] if exact else []),
        ]
    )
    assert code == 0, output
    assert "patch vectors 768 x 1792" in output
    assert ("first neighbours: approximate" in output) is not exact


def test_parity_gate_refuses_a_graph_that_differs(tiny_model: Path, torch_threads: None) -> None:
    """The gate runs the exported graph and the network: another network's graph fails it, its own passes."""
    import torch

    from protoad_edge.builder.torch_backend import load_torch_network
    from protoad_edge.errors import ProtoADError
    from protoad_edge.export.onnx import PARITY_TOLERANCE, onnx_parity, parity_gate

    net, info = load_torch_network(tiny_model)
    batch = to_batch(normal_crops(2, info.crop, seed=5))
    assert parity_gate(tiny_model, net, batch) <= PARITY_TOLERANCE
    with torch.no_grad():
        block = net.prototypes.blocks[0]
        block.copy_(torch.roll(block, 1, dims=1))  # the same prototypes, channels shifted: another network
    assert onnx_parity(tiny_model, net, batch) > 100 * PARITY_TOLERANCE
    with pytest.raises(ProtoADError, match="ONNX parity check failed"):
        parity_gate(tiny_model, net, batch)


def test_numbers_in_the_log_and_summary_carry_units_and_separators(demo_export: tuple[Path, str]) -> None:
    _, output = demo_export
    for pattern in (
        r"^data: mvtec demo at .*: 18 training, 2 held-out, 24 test images$",
        r"^features: 14,112 patch vectors x 1792 channels \(",
        r"^FINCH level 0: \d{1,3}(,\d{3})* clusters of 14,112 vectors \(\d+\.\d s\)$",
        r"^FINCH chose level \d+: \d{1,3}(,\d{3})* prototypes$",
        r"^  FINCH levels  [\d,]+( -> [\d,]+)* clusters  \(K = [\d,]+ prototypes\)$",
        r"^  time          load \d+\.\d s, features \d+\.\d s, finch \d+\.\d s",
        r"^  test          image AUROC \d+\.\d %, pixel AUROC \d+\.\d %; ",
    ):
        assert re.search(pattern, output, re.MULTILINE), pattern
