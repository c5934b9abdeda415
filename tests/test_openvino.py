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
from PIL import Image

from conftest import normal_crops
from protoad_edge.runtime.backends.registry import REGISTRY, choose, open_backend
from protoad_edge.bundle import Bundle
from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install 'protoad-edge[openvino]')")


def test_registry_row() -> None:
    entry = REGISTRY["openvino"]
    assert entry.files[0] == "onnx" and "int8_onnx" in entry.files
    assert (entry.needs, entry.install) == ("openvino", "pip install 'protoad-edge[openvino]'")
    assert entry.precisions == ("fp32", "bf16", "fp16")
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
    with open_backend(tiny_model, "ort", options=options) as ort, open_backend(tiny_model, "openvino", options=options) as ov:
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
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with open_backend(tiny_model, "openvino", options=BackendOptions(device="cpu", precision="bf16")) as backend:
        facts = backend.describe()
        maps = backend.infer(batch)[0]
    assert facts.details["precision_asked"] == "bf16"
    if has_bf16:
        assert facts.precision == "bf16" and facts.details["compute_layers_by_precision"].get("bf16")
    else:  # the CPU has no BF16: what ran is said, not what was asked
        assert facts.precision == "fp32" and facts.details["note"] == "bf16 asked, CPU runs fp32"
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
    result = CliRunner().invoke(run_main, [str(folder), "--model", str(tiny_model), "--backend", "openvino",
                                           "--jsonl", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["verdict"] in ("ok", "anomaly") for r in records)
    assert "openvino" in result.output
