"""Versioned bundle metadata: a schema 1 bundle is upgraded on read, a newer one refused with both
versions and the command that rebuilds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from protoad_edge import __version__
from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import FORMAT, SCHEMA, ModelInfo, migrate
from protoad_edge.runtime.ort_backend import OrtBackend


def v1(data: dict) -> dict:
    """What protoad-edge wrote before schema 2: one format string, the engine's precision as ``precision``."""
    old = {k: v for k, v in data.items() if k not in ("schema", "tensorrt_precision")}
    old.update(format="protoad-edge/1", precision=data["tensorrt_precision"])
    return old


def test_schema_1_is_migrated() -> None:
    info = ModelInfo(category="cable", resize=256, crop=224, backbone="wide_resnet50_2", weights="none",
                     feature_upsample="bilinear", num_prototypes=10, image_threshold=0.3, pixel_threshold=0.2,
                     tensorrt_version="10.3.0", gpu_name="Orin", tensorrt_precision="fp16")
    old = v1(info.to_dict())
    assert "schema" not in old and old["precision"] == "fp16"
    new = migrate(old)
    assert new["format"] == FORMAT and new["schema"] == SCHEMA == 2 and new["tensorrt_precision"] == "fp16"
    assert "precision" not in new and old["format"] == "protoad-edge/1"  # the input is left as it was
    assert ModelInfo.from_dict(old) == info
    assert migrate(info.to_dict()) == info.to_dict()  # the current schema passes unchanged


def test_a_newer_schema_is_refused_with_both_versions_and_the_rebuild_command() -> None:
    data = ModelInfo(category="cable", resize=256, crop=224, backbone="b", weights="none", feature_upsample="bilinear",
                     num_prototypes=10, image_threshold=0.3, pixel_threshold=0.2).to_dict()
    data.update(schema=SCHEMA + 1, toolkit_version="9.0.0")
    with pytest.raises(ProtoADError) as caught:
        ModelInfo.from_dict(data, "models/cable.json")
    message = str(caught.value)
    assert f"schema {SCHEMA + 1}" in message and f"schemas 1 to {SCHEMA}" in message
    assert "9.0.0" in message and __version__ in message and "protoad-export --category cable" in message
    for bad in ({"format": "protoad-edge"}, {"format": "protoad-edge", "schema": "2"}, {"format": "onnx-zoo"}):
        with pytest.raises(ProtoADError):
            migrate(bad, "x.json")


def test_a_schema_1_bundle_runs(tiny_model: Path, tmp_path: Path) -> None:
    """A bundle exported before schema 2 (both its ONNX metadata and its sidecar) still opens and runs."""
    onnx_path = tmp_path / "old.onnx"
    model = onnx.load(str(tiny_model))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    old = v1(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in old.items()})
    onnx.save(model, str(onnx_path))
    (tmp_path / "old.json").write_text(json.dumps(old))
    shutil.copy(tiny_model.with_name("tiny.prototypes.npy"), tmp_path / "old.prototypes.npy")
    backend = OrtBackend(onnx_path, providers=["CPUExecutionProvider"])  # also checks sidecar == ONNX metadata
    assert backend.info.schema == SCHEMA and backend.info.format == FORMAT
    assert backend.info == ModelInfo.load_json(tiny_model.with_suffix(".json"))
