"""Versioned bundle metadata: a schema 1 or 2 bundle is upgraded on read, a newer one refused with both
versions and the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import onnx
import pytest

from protoad_edge import __version__
from protoad_edge.builder.thresholds import DETAIL
from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import FORMAT, RULE_NAMES, SCHEMA, ModelInfo, migrate, rule_name
from protoad_edge.runtime.backends.ort import OrtBackend


def v1(data: dict) -> dict:
    """What protoad-edge wrote before schema 2: one format string, the engine's precision as ``precision``."""
    old = {k: v for k, v in data.items() if k not in ("schema", "tensorrt_precision")}
    old.update(format="protoad-edge/1", precision=data["tensorrt_precision"])
    return old


def test_schema_1_is_migrated() -> None:
    info = ModelInfo(
        category="cable",
        resize=256,
        crop=224,
        backbone="wide_resnet50_2",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=10,
        image_threshold=0.3,
        pixel_threshold=0.2,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        tensorrt_precision="fp16",
    )
    old = v1(info.to_dict())
    assert "schema" not in old and old["precision"] == "fp16"
    new = migrate(old)
    assert new["format"] == FORMAT and new["schema"] == SCHEMA == 4 and new["tensorrt_precision"] == "fp16"
    assert "precision" not in new and old["format"] == "protoad-edge/1"  # the input is left as it was
    assert ModelInfo.from_dict(old) == info
    assert migrate(info.to_dict()) == info.to_dict()  # the current schema passes unchanged


def v2(data: dict) -> dict:
    """What protoad-edge wrote before schema 3: no digests, and the threshold rule as a sentence."""
    old = {k: v for k, v in data.items() if k not in ("digests", "threshold_detail")}
    old["schema"] = 2
    return old


# Schema 2 rules as the build and --set-threshold wrote them -> schema 3's short name.
V2_RULES = {
    "image: max(max, mean + 3 std) of held-out normal image scores; pixel: 99.9th percentile of held-out normal "
    "pixel scores, capped at the image threshold in force": "held-out",
    "image: max(max, mean + 3 std) of held-out normal image scores; pixel: ... (no held-out images: set on training "
    "images, optimistic)": "training-images",
    "image: f1 (--set-threshold) on the mvtec test split of 'cable' in /home/ci/data/mvtec: flags 5/6 anomalous and "
    "1/4 normal images; pixel: unchanged": "f1@test-split",
    "image: normal-max (--set-threshold) on the btad test split of '01' in /srv/d: flags": "normal-max@test-split",
    "image: fpr=0.01 (--set-threshold) on the folder test split of 'x' in /srv/d: flags": "fpr=0.01@test-split",
    "image: 0.25 (--set-threshold) on the mvtec test split of 'cable' in /srv/d: flags": "manual",
    "my own threshold, see /home/qa/notes.txt": "custom",
    "": "",
}


@pytest.mark.parametrize("sentence", list(V2_RULES))
def test_schema_2_rule_sentences_become_short_names(sentence: str) -> None:
    info = ModelInfo(
        category="cable",
        resize=256,
        crop=224,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=10,
        image_threshold=0.3,
        pixel_threshold=0.2,
        threshold_rule=sentence,
        threshold_history=[{"image_threshold": 0.2, "threshold_rule": sentence, "replaced": "x"}],
        digests={"onnx": "0" * 64},
    )
    new = ModelInfo.from_dict(v2(info.to_dict()))
    name = V2_RULES[sentence]
    assert (new.schema, new.threshold_rule, new.threshold_detail, new.digests) == (SCHEMA, name, sentence, None)
    assert new.threshold_history == [
        {"image_threshold": 0.2, "threshold_rule": name, "threshold_detail": sentence, "replaced": "x"}
    ]
    assert "/" not in new.threshold_rule and (not name or RULE_NAMES.fullmatch(name))


def test_records_name_only_rules_protoad_edge_writes() -> None:
    """A record goes to every line's log and broker: a hand-edited rule (a path, a sentence) is never copied."""
    for name in (
        "held-out",
        "training-images",
        "manual",
        "f1@test-split",
        "fpr=0.05@test-split",
        "fpr=1e-05@test-split",
        "normal-max@test-split",
    ):
        assert rule_name(name) == name
    for text, name in (
        ("", "unrecorded"),
        ("/home/qa/rule.txt", "custom"),
        ("f1@/data/test", "custom"),
        ("0.5@test-split", "custom"),
        ("held-out ", "custom"),
    ):
        assert rule_name(text) == name


def test_the_onnx_metadata_leaves_the_digests_to_the_sidecar() -> None:
    info = ModelInfo(
        category="cable",
        resize=256,
        crop=224,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=10,
        image_threshold=0.3,
        pixel_threshold=0.2,
        digests={"onnx": "0" * 64},
    )
    assert "digests" not in info.to_props() and info.to_dict()["digests"] == {"onnx": "0" * 64}
    assert ModelInfo.from_props(info.to_props()).digests is None


def test_a_newer_schema_is_refused_with_both_versions_and_the_rebuild_command() -> None:
    data = ModelInfo(
        category="cable",
        resize=256,
        crop=224,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=10,
        image_threshold=0.3,
        pixel_threshold=0.2,
    ).to_dict()
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
    old["threshold_rule"] = DETAIL  # the build's rule, as schemas 1 and 2 wrote it
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in old.items()})
    onnx.save(model, str(onnx_path))
    (tmp_path / "old.json").write_text(json.dumps(old))
    shutil.copy(tiny_model.with_name("tiny.prototypes.npy"), tmp_path / "old.prototypes.npy")
    backend = OrtBackend(onnx_path, providers=["CPUExecutionProvider"])  # also checks sidecar == ONNX metadata
    assert backend.info.schema == SCHEMA and backend.info.format == FORMAT
    built = ModelInfo.load_json(tiny_model.with_suffix(".json"))
    assert backend.info == dataclasses.replace(built, threshold_rule="held-out", threshold_detail=DETAIL)
