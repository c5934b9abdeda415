"""A bundle belongs together by content: the sidecar records each file's sha256, every command that runs a
file checks it (protoad-run, -eval, -bench, -serve all open through ``backends.open_file``), an ONNX of another
build with the same K copied over the bundle is refused in one line naming both files and the fix, and
``protoad-export --from-onnx NAME.onnx --reseal`` records a file changed on purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import normal_crops
from onnx import numpy_helper

from protoad_edge.bundle import SEALED, Bundle, sha256
from protoad_edge.cli.bench import main as bench_main
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.export import main as export_main
from protoad_edge.cli.run import main as run_main
from protoad_edge.cli.serve import main as serve_main
from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.registry import open_backend

CPU = BackendOptions(device="cpu", threads=1)


def copy_bundle(tiny_model: Path, folder: Path, seal: bool = True) -> Bundle:
    """A private copy of the tiny bundle as ``folder/tiny.*``, sealed as a build seals it (or left without digests)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".json", ".prototypes.npy"):
        shutil.copy(tiny_model.with_name("tiny" + suffix), folder / ("tiny" + suffix))
    bundle = Bundle(folder / "tiny")
    info = ModelInfo.load_json(bundle.sidecar)
    (bundle.seal(info) if seal else dataclasses.replace(info, digests=None)).save_json(bundle.sidecar)
    return bundle


def other_build(onnx_path: Path, out: Path) -> Path:
    """The ONNX of another build with the same K and the same metadata (say, other training images): only its
    prototypes differ, so the sidecar's identity check (``Bundle.in_force``) accepts it."""
    model = onnx.load(str(onnx_path))
    [tensor] = [t for t in model.graph.initializer if t.name.startswith("prototypes")]
    values = numpy_helper.to_array(tensor)
    others = values[np.arange(len(values)) // 2]  # K rows still, half of them the same as before
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(others), tensor.name))
    onnx.save(model, str(out))
    return out


def one_line_refusal(message: str, file: Path, bundle: Bundle) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert f"{file} does not match {bundle.sidecar}" in message
    assert message.endswith(f"run protoad-export --from-onnx {bundle.onnx} --reseal")


def test_an_onnx_of_another_build_with_the_same_k_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_model, tmp_path / "line3")
    built = ModelInfo.load_json(bundle.sidecar)
    assert built.digests == {"onnx": sha256(bundle.onnx), "prototypes": sha256(bundle.prototypes)}
    with open_backend(bundle.onnx, options=CPU) as opened:  # the bundle as written runs
        ours = opened.infer(to_batch(normal_crops(2, 64, seed=5)))[1]
    shutil.copy(other_build(tiny_model, tmp_path / "other.onnx"), bundle.onnx)
    with pytest.raises(ProtoADError) as refused:
        open_backend(bundle.onnx, options=CPU)
    message = str(refused.value)
    one_line_refusal(message, bundle.onnx, bundle)
    assert f"records sha256 {sha256(tiny_model)[:12]}..., the file has {sha256(bundle.onnx)[:12]}..." in message
    for named, category in ((bundle.sidecar, None), (bundle.stem.parent, "tiny")):  # the bundle named otherwise
        with pytest.raises(ProtoADError, match="does not match"):
            open_backend(named, "ort", category=category, options=CPU)
    # The identity fields agree: without digests it would have run, with other scores, under these thresholds.
    bundle.sidecar.write_text(json.dumps({**built.to_dict(), "digests": None}))
    with open_backend(bundle.onnx, options=CPU) as opened:
        theirs = opened.infer(to_batch(normal_crops(2, 64, seed=5)))[1]
    assert not np.allclose(ours, theirs)


def test_every_command_refuses_the_file(tiny_model: Path, tmp_path: Path) -> None:
    """protoad-run, -eval, -bench and -serve: one line naming both files and the fix, exit code 2, before any work
    (no image, data root or server is needed to get there)."""
    bundle = copy_bundle(tiny_model, tmp_path / "line3")
    shutil.copy(other_build(tiny_model, tmp_path / "other.onnx"), bundle.onnx)
    image = tmp_path / "part.png"
    from PIL import Image

    Image.fromarray(normal_crops(1, 64)[0]).save(image)
    commands = {
        "protoad-run": (run_main, [str(image), "--model", str(bundle.onnx)]),
        "protoad-eval": (
            eval_main,
            ["--model", str(bundle.onnx), "--category", "tiny", "--data-root", str(tmp_path / "no-data")],
        ),
        "protoad-bench": (bench_main, ["--model", str(bundle.onnx), "--iterations", "1", "--warmup", "0"]),
        "protoad-serve": (serve_main, ["--model", str(bundle.onnx)]),
    }
    for name, (command, args) in commands.items():
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
        one_line_refusal(lines[0][len("error: ") :], bundle.onnx, bundle)


def test_reseal_records_a_file_changed_on_purpose(tiny_model: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny_model, tmp_path / "line3")
    before = ModelInfo.load_json(bundle.sidecar)
    shutil.copy(other_build(tiny_model, tmp_path / "other.onnx"), bundle.onnx)
    result = CliRunner().invoke(export_main, ["--from-onnx", str(bundle.onnx), "--reseal"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"  sealed        {bundle.onnx} sha256 {sha256(bundle.onnx)[:12]}... (was {before.digests['onnx'][:12]}...)",
        f"  sealed        {bundle.prototypes} sha256 {before.digests['prototypes'][:12]}... (unchanged)",
    ]
    after = ModelInfo.load_json(bundle.sidecar)
    assert after.digests == {
        "onnx": hashlib.sha256(bundle.onnx.read_bytes()).hexdigest(),
        "prototypes": before.digests["prototypes"],
    }
    assert {k: v for k, v in after.to_dict().items() if k != "digests"} == {
        k: v for k, v in before.to_dict().items() if k != "digests"
    }  # nothing else changes
    with open_backend(bundle.onnx, options=CPU) as opened:
        opened.infer(to_batch(normal_crops(1, 64)))
    bundle.prototypes.unlink()  # a file gone is dropped from the record
    result = CliRunner().invoke(export_main, ["--from-onnx", str(bundle.onnx), "--reseal"])
    assert f"{bundle.prototypes} (dropped: no such file)" in result.output
    assert set(ModelInfo.load_json(bundle.sidecar).digests) == {"onnx"}
    for args, needle in (
        (["--reseal"], "give --from-onnx NAME.onnx"),
        (["--reseal", "--from-onnx", str(tmp_path / "none.onnx")], "none.onnx: no such file"),
    ):
        result = CliRunner().invoke(export_main, args)
        assert result.exit_code == 2 and needle in result.output and len(result.output.splitlines()) == 1
    bundle.sidecar.unlink()
    with pytest.raises(ProtoADError, match=r"tiny.json not found: only a sidecar records digests"):
        bundle.reseal()


def test_a_plan_or_prototypes_not_written_with_the_bundle(tiny_model: Path, tmp_path: Path) -> None:
    """The plan (trt) and the prototypes (torch, which runs the sidecar) are checked like the ONNX; a file the
    sidecar records nothing for is a stranger, and a plan's fix is to rebuild it."""
    bundle = copy_bundle(tiny_model, tmp_path / "line3")
    bundle.plan.write_bytes(b"a plan from another line")
    with pytest.raises(ProtoADError) as refused:
        open_backend(bundle.plan, "trt", options=CPU)  # refused before TensorRT is needed
    message = str(refused.value)
    one_line_refusal(message, bundle.plan, bundle)
    assert "which records no digest for it" in message
    assert f"To run it, rebuild the plan with protoad-export --from-onnx {bundle.onnx};" in message
    prototypes = np.load(bundle.prototypes)
    np.save(bundle.prototypes, prototypes[::-1])
    with pytest.raises(ProtoADError) as refused:
        bundle.check(bundle.sidecar)  # what open_file does before the torch backend
    one_line_refusal(str(refused.value), bundle.prototypes, bundle)
    bundle.check(bundle.onnx)  # each file answers for itself
    bundle.check(tmp_path / "notes.txt")  # not a bundle file: nothing to check


def test_the_export_steps_refuse_to_build_on_a_stranger(tiny_model: Path, tmp_path: Path) -> None:
    """The TensorRT plan, the INT8 model and a Triton repository are made from the bundle's ONNX and sealed into it
    (or served with its thresholds): from another build's ONNX each is refused before any work."""
    from protoad_edge.evaluation.int8_export import export_int8
    from protoad_edge.export.tensorrt import build_engine
    from protoad_edge.export.triton_repo import write_repository

    bundle = copy_bundle(tiny_model, tmp_path / "line3")
    shutil.copy(other_build(tiny_model, tmp_path / "other.onnx"), bundle.onnx)
    for step in (
        lambda: build_engine(bundle.onnx, precision="fp32", log=lambda _: None),
        lambda: export_int8(bundle.onnx, "tiny", tmp_path / "no-data", log=lambda _: None),
        lambda: write_repository(bundle.onnx, tmp_path / "repo"),
    ):
        with pytest.raises(ProtoADError) as refused:
            step()
        one_line_refusal(str(refused.value), bundle.onnx, bundle)
    assert not (tmp_path / "repo").exists() and not bundle.plan.exists()


def test_a_sidecar_without_digests_runs_with_one_warning(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = copy_bundle(tiny_model, tmp_path / "old", seal=False)
    assert ModelInfo.load_json(bundle.sidecar).digests is None
    for _ in range(2):
        with open_backend(bundle.onnx, options=CPU) as opened:
            opened.infer(to_batch(normal_crops(1, 64)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        (
            f"warning: {bundle.sidecar} records no file digests (written before protoad-edge checked "
            f"them), so nothing shows that {bundle.onnx} belongs to it; record them with "
            f"protoad-export --from-onnx {bundle.onnx} --reseal"
        )
    ]
    bundle.check(bundle.onnx)  # the same sidecar again: said once is enough
    assert capsys.readouterr().err == ""


def test_seal_starts_afresh_and_a_writer_adds_only_its_files(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path / "cable")
    for kind, data in (("onnx", b"graph"), ("prototypes", b"rows"), ("plan", b"engine"), ("timing_cache", b"t")):
        bundle.file(kind).write_bytes(data)
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
    )
    digest = {
        kind: hashlib.sha256(bundle.file(kind).read_bytes()).hexdigest()
        for kind in SEALED
        if bundle.file(kind).is_file()
    }
    assert set(digest) == {"onnx", "prototypes", "plan"}  # the timing cache decides nothing: not sealed
    assert bundle.seal(info, ("plan",)).digests is None  # an unsealed sidecar is not half sealed by a writer
    sealed = bundle.seal(info)
    assert sealed.digests == digest and info.digests is None
    bundle.plan.write_bytes(b"a new engine")
    bundle.fp16_onnx.write_bytes(b"fp16 graph")
    bundle.onnx.write_bytes(b"a stranger")  # not the writer's file: its old digest stays, and refuses it
    added = bundle.seal(sealed, ("plan", "fp16_onnx"))
    assert added.digests == {**digest, "plan": sha256(bundle.plan), "fp16_onnx": sha256(bundle.fp16_onnx)}
    bundle.prototypes.unlink()
    assert set(bundle.seal(added).digests) == {"onnx", "plan", "fp16_onnx"}


def test_sha256_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import protoad_edge.bundle as bundle_module

    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "x.onnx").write_bytes(data)
    monkeypatch.setattr(bundle_module, "HASH_CHUNK", 4096)  # a partial last chunk, and several whole ones
    assert sha256(tmp_path / "x.onnx") == hashlib.sha256(data).hexdigest()
