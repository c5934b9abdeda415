"""The feature cache: keyed by everything features depend on, filled batch by batch, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CROP, normal_crops

from protoad_edge.builder.feature_cache import cached_features, default_cache_dir, features_key


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / "train" / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"image %d" % i)
        paths.append(p)
    return paths


def key_parts(images: list[Path]) -> dict:
    return dict(
        dataset="mvtec",
        category="bottle",
        images=images,
        weights="none (seeded random initialisation, seed 0)",
        resize=72,
        crop=64,
        feature_upsample="bilinear",
        version="0.1.0",
    )


def test_key_changes_with_each_part(images: list[Path], tmp_path: Path) -> None:
    base = key_parts(images)
    key = features_key(**base)
    assert features_key(**base) == key  # deterministic
    changed = {
        "dataset": "btad",
        "category": "cable",
        "images": images[:2],
        "weights": "imagenet (torchvision IMAGENET1K_V1)",
        "resize": 256,
        "crop": 224,
        "feature_upsample": "nearest",
        "version": "0.2.0",
    }
    keys = {features_key(**{**base, name: value}) for name, value in changed.items()}
    keys.add(features_key(**{**base, "images": images[::-1]}))  # row order is part of the content
    moved = tmp_path / "elsewhere.png"
    moved.write_bytes(images[0].read_bytes())
    keys.add(features_key(**{**base, "images": [moved, *images[1:]]}))
    assert key not in keys and len(keys) == len(changed) + 2

    st = images[1].stat()
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer mtime
    touched = features_key(**base)
    images[1].write_bytes(b"image 1, edited")  # another size
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len({key, touched, features_key(**base)}) == 3


def test_default_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROTOAD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PROTOAD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "protoad-edge" / "features"


@pytest.fixture(scope="module")
def tiny_features():
    """Random-weight patch features (the network's own) and the extraction that made them."""
    torch = pytest.importorskip("torch")
    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.pipeline import extract_vectors
    from protoad_edge.constants import FEATURE_CHANNELS

    torch.set_num_threads(2)
    features = PatchFeatures(build_backbone("none", 0)[0], TINY_CROP, "bilinear")
    crops = normal_crops(3, TINY_CROP)
    shape = (len(crops) * features.size**2, FEATURE_CHANNELS)

    def extract(out: np.ndarray) -> None:
        extract_vectors(features, crops, torch.device("cpu"), 2, False, out)  # batches 2 + 1

    expected = np.empty(shape, np.float32)
    extract(expected)
    return shape, extract, expected


@pytest.mark.slow
def test_second_call_is_a_cache_hit_with_identical_data(tmp_path: Path, tiny_features) -> None:
    shape, extract, expected = tiny_features
    calls, lines = [], []

    def fill(out: np.ndarray) -> None:
        calls.append(1)
        extract(out)

    first, hit = cached_features(tmp_path, "k1", shape, fill, log=lines.append)
    assert not hit
    assert isinstance(first, np.memmap) and first.dtype == np.float16 and first.shape == shape
    np.testing.assert_array_equal(first, expected.astype(np.float16))  # every batch landed in its rows
    assert lines == [f"features: cached at {tmp_path / 'k1.npy'}"]
    second, hit = cached_features(tmp_path, "k1", shape, fill, log=lines.append)
    assert hit and len(calls) == 1 and lines[-1] == f"features: cache hit {tmp_path / 'k1.npy'}"
    np.testing.assert_array_equal(second, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.npy"]


def test_interrupted_write_leaves_no_entry(tmp_path: Path, tiny_features) -> None:
    shape, extract, expected = tiny_features

    def interrupted(out: np.ndarray) -> None:
        out[:10] = 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_features(tmp_path, "k2", shape, interrupted, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    again, hit = cached_features(tmp_path, "k2", shape, extract, log=lambda _: None)  # a miss: extracted afresh
    assert not hit
    np.testing.assert_array_equal(again, expected.astype(np.float16))


def test_entry_of_another_shape_is_rebuilt(tmp_path: Path) -> None:
    np.save(tmp_path / "k3.npy", np.zeros((4, 8), np.float16))
    lines: list[str] = []
    got, hit = cached_features(tmp_path, "k3", (5, 8), lambda out: out.fill(2), log=lines.append)
    assert not hit and got.shape == (5, 8) and (got == 2).all() and lines[-1].startswith("features: cached at")


def test_no_cache_keeps_nothing(tmp_path: Path) -> None:
    got, hit = cached_features(
        tmp_path / "scratch", "k4", (6, 4), lambda out: out.fill(3), keep=False, log=lambda _: None
    )
    assert not hit and got.shape == (6, 4) and (got == 3).all()
    assert list((tmp_path / "scratch").iterdir()) == []  # unlinked; the mapping keeps the data alive
    got_again, _ = cached_features(
        tmp_path / "scratch", "k4", (6, 4), lambda out: out.fill(4), keep=False, log=lambda _: None
    )
    assert (got_again == 4).all()
