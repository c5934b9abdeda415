"""Bundle versions (``versions.py``): a new version's files first and its sidecar last, the version it replaced kept
by hard links, one writer at a time, rollback bit for bit, the kept versions pruned to the newest."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from protoad_edge import versions
from protoad_edge.bundle import Bundle, sha256
from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import ModelInfo


def make(folder: Path, sealed: bool = True) -> Bundle:
    """A bundle of stand-in files (versions never reads their insides) with a sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(folder / "part")
    bundle.onnx.write_bytes(b"graph 1")
    bundle.prototypes.write_bytes(b"prototypes 1")
    bundle.plan.write_bytes(b"plan 1")
    info = ModelInfo(
        category="part",
        resize=72,
        crop=64,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=10,
        image_threshold=0.5,
        pixel_threshold=0.4,
    )
    (bundle.seal(info) if sealed else info).save_json(bundle.sidecar)
    return bundle


def teach_once(bundle: Bundle, graph: bytes, keep: int = versions.KEEP, drop_plan: bool = False) -> ModelInfo:
    with versions.writing(bundle) as new:
        new.stage("onnx").write_bytes(graph)
        if drop_plan:
            new.drop("plan")
        info = new.info(dataclasses.replace(new.before, num_prototypes=new.before.num_prototypes + 1), "teach")
        return new.commit(info, keep)


def test_a_new_version_keeps_the_one_it_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make(tmp_path)
    old_inode = bundle.onnx.stat().st_ino
    renamed: list[str] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike, dst: str | os.PathLike) -> None:  # the real rename, and its order
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    info = teach_once(bundle, b"graph 2", drop_plan=True)
    assert renamed == ["v1", "part.onnx", "part.json"]  # kept, the model files, the sidecar once and last
    assert (info.version, info.changes[-1]["from"], info.changes[-1]["what"]) == (2, 1, "teach")
    assert bundle.onnx.read_bytes() == b"graph 2" and not bundle.plan.exists()
    kept = versions.kept(bundle)[1]
    assert (kept / "part.onnx").read_bytes() == b"graph 1" and (kept / "part.onnx").stat().st_ino == old_inode
    assert (kept / "part.plan").read_bytes() == b"plan 1" and (kept / "part.json").is_file()
    assert info.digests == {"onnx": sha256(bundle.onnx), "prototypes": sha256(bundle.prototypes)}  # resealed
    assert Bundle.of(bundle.onnx).info() == info


def test_an_unsealed_sidecar_stays_unsealed(tmp_path: Path) -> None:
    bundle = make(tmp_path, sealed=False)
    assert teach_once(bundle, b"graph 2").digests is None  # sealing a stranger's files would vouch for them


def test_a_failed_version_changes_nothing(tmp_path: Path) -> None:
    bundle = make(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RuntimeError), versions.writing(bundle) as new:
        new.stage("onnx").write_bytes(b"graph 2")
        raise RuntimeError("the teach failed after staging")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # staged file gone too


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    bundle = make(tmp_path)
    assert not versions.writing_now(bundle)
    with versions.writing(bundle):
        assert versions.writing_now(bundle)
        with pytest.raises(ProtoADError, match="in progress"), versions.writing(bundle):
            pass
    assert not versions.writing_now(bundle)


def test_rollback_and_forward_again(tmp_path: Path) -> None:
    bundle = make(tmp_path)
    built = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    teach_once(bundle, b"graph 2", drop_plan=True)
    second = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    teach_once(bundle, b"graph 3")
    done = versions.rollback(bundle)  # to the version version 3 was made from
    assert (done.old, done.new) == (3, 2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == second
    assert versions.rollback(bundle).new == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == built  # the plan is back
    with pytest.raises(ProtoADError, match=r"version 1 as built.*kept versions: 2, 3"):
        versions.rollback(bundle)
    with pytest.raises(ProtoADError, match=r"version 7 of .* is not kept .*kept: 2, 3"):
        versions.rollback(bundle, 7)
    with pytest.raises(ProtoADError, match="is version 1 already"):
        versions.rollback(bundle, 1)
    assert versions.rollback(bundle, 3).new == 3 and bundle.onnx.read_bytes() == b"graph 3"
    assert teach_once(bundle, b"graph 4").version == 4  # numbers are never reused


def test_a_kept_version_of_other_bytes_is_moved_aside(tmp_path: Path) -> None:
    """A version number kept once and found with other files later (the bundle was rebuilt) is not overwritten."""
    bundle = make(tmp_path)
    versions.archive(bundle, 1)
    (tmp_path / "rebuilt").write_bytes(b"graph 1, rebuilt")
    os.replace(tmp_path / "rebuilt", bundle.onnx)  # as every writer replaces a file
    versions.archive(bundle, 1)
    aside = [p for p in versions.folder(bundle).iterdir() if p.name.startswith("v1.replaced-")]
    assert len(aside) == 1 and (aside[0] / "part.onnx").read_bytes() == b"graph 1"
    assert (versions.kept(bundle)[1] / "part.onnx").read_bytes() == b"graph 1, rebuilt"
    versions.archive(bundle, 1)  # the same files again: nothing to do
    assert len([p for p in versions.folder(bundle).iterdir() if p.name.startswith("v1")]) == 2


def test_kept_versions_are_pruned_to_the_newest(tmp_path: Path) -> None:
    bundle = make(tmp_path)
    for n in range(2, 9):
        teach_once(bundle, f"graph {n}".encode(), keep=3)
    assert sorted(versions.kept(bundle)) == [5, 6, 7]
    assert [row[:2] for row in versions.history(bundle)] == [(8, True), (7, False), (6, False), (5, False)]


def test_stamp_sees_a_replaced_file(tmp_path: Path) -> None:
    bundle = make(tmp_path)
    before = versions.stamp(bundle.sidecar, bundle.onnx)
    assert versions.stamp(bundle.sidecar, bundle.onnx) == before
    teach_once(bundle, b"graph 2")
    after = versions.stamp(bundle.sidecar, bundle.onnx)
    assert after[0] != before[0] and after[1] != before[1]
    assert versions.stamp(tmp_path / "missing.json") == (None,)


def test_a_kept_file_overwritten_in_place_is_not_restored(tmp_path: Path) -> None:
    """``cp`` onto a bundle's file writes into the file a kept version shares: the rollback sees the digest its
    sidecar recorded no longer holds, and restores nothing."""
    bundle = make(tmp_path)
    teach_once(bundle, b"graph 2")  # version 1 kept; the prototypes are the same file in both versions
    with open(bundle.prototypes, "r+b") as f:  # what cp does to an existing file
        f.write(b"PROTOTYPES")
    with pytest.raises(ProtoADError, match="part.prototypes.npy .* no longer has the sha256 .* not restored"):
        versions.rollback(bundle)
    assert Bundle.of(bundle.onnx).info().version == 2 and bundle.onnx.read_bytes() == b"graph 2"
