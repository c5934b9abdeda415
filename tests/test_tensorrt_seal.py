"""The TensorRT step records the digests of the files it writes (the plan, and NAME.fp16.onnx where it built from
it) beside the build's, so protoad-run --backend trt runs that plan and refuses another. Built through the same
stand-in TensorRT as test_tensorrt (no TensorRT here; a GPU run checks the real one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_tensorrt import copy_bundle, fake_trt  # noqa: F401  (the stand-in TensorRT fixture)

from protoad_edge.bundle import Bundle, sha256
from protoad_edge.errors import ProtoADError
from protoad_edge.export.tensorrt import build_engine
from protoad_edge.metadata import ModelInfo


def sealed_copy(tiny_model: Path, folder: Path) -> Bundle:
    bundle = Bundle.of(copy_bundle(tiny_model, folder))
    bundle.seal(ModelInfo.load_json(bundle.sidecar)).save_json(bundle.sidecar)
    return bundle


def test_the_plan_and_the_fp16_onnx_it_came_from_are_recorded(
    fake_trt: Any,
    tiny_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    fake_trt("11.0.0")  # FP16 from NAME.fp16.onnx
    bundle = sealed_copy(tiny_model, tmp_path)
    built = build_engine(bundle.onnx, log=lambda _: None)
    digests = ModelInfo.load_json(bundle.sidecar).digests
    assert digests == {"onnx": sha256(bundle.onnx), "plan": sha256(built.plan), "fp16_onnx": sha256(bundle.fp16_onnx)}
    assert bundle.timing_cache.is_file() and "timing_cache" not in digests
    bundle.check(built.plan)
    bundle.check(bundle.fp16_onnx)
    built.plan.write_bytes(b"an engine from another line")
    rebuild = f"To run it, rebuild the plan with protoad-export --from-onnx {bundle.onnx};"
    with pytest.raises(ProtoADError, match=rebuild):
        bundle.check(built.plan)


def test_a_build_from_the_onnx_records_only_the_plan(
    fake_trt: Any,
    tiny_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    fake_trt("10.3.0")
    bundle = sealed_copy(tiny_model, tmp_path)
    bundle.fp16_onnx.write_bytes(b"left by an earlier build")  # not this step's: not vouched for
    build_engine(bundle.onnx, precision="fp32", log=lambda _: None)
    assert set(ModelInfo.load_json(bundle.sidecar).digests) == {"onnx", "plan"}


def test_an_unsealed_sidecar_stays_unsealed_and_a_new_one_is_sealed(
    fake_trt: Any,
    tiny_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Sealing only the plan beside an older sidecar would vouch for it alone and refuse the ONNX: it stays
    unsealed (with its warning) until re-sealed. Without a sidecar, the one the step writes records every file."""
    fake_trt("10.3.0")
    old = Bundle.of(copy_bundle(tiny_model, tmp_path / "old"))
    dataclasses.replace(ModelInfo.load_json(old.sidecar), digests=None).save_json(old.sidecar)
    build_engine(old.onnx, precision="fp32", log=lambda _: None)
    assert ModelInfo.load_json(old.sidecar).digests is None
    new = Bundle.of(copy_bundle(tiny_model, tmp_path / "new"))
    new.sidecar.unlink()
    build_engine(new.onnx, precision="fp32", log=lambda _: None)
    assert ModelInfo.load_json(new.sidecar).digests == {"onnx": sha256(new.onnx), "plan": sha256(new.plan)}
