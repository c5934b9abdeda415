"""The built-in demo dataset: promised layout, byte-identical reruns, masks where the defects are."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import every_anomaly_has_a_mask

from protoad_edge.builder import demo
from protoad_edge.builder.datasets import open_dataset
from protoad_edge.builder.demo import SIZE, SPLITS, demo_image, generate_demo
from protoad_edge.errors import ProtoADError
from protoad_edge.preprocess import load_mask, load_rgb


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo generated once, the way users get it: by asking for category "demo"."""
    root = tmp_path_factory.mktemp("data")
    return open_dataset("demo", root)


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_demo_has_the_promised_layout(demo_data):
    assert demo_data.kind == "mvtec" and demo_data.category == "demo"
    assert len(demo_data.train) == SPLITS["train/good"] == 20
    assert all(s.path.parent == demo_data.root / "demo" / "train" / "good" for s in demo_data.train)
    by_defect: dict[str, int] = {}
    for s in demo_data.test:
        by_defect[s.defect] = by_defect.get(s.defect, 0) + 1
        assert s.label == (s.defect != "good")
        assert (s.mask_path is not None) == (s.label == 1)
    assert by_defect == {"good": 8, "scratch": 4, "spot": 4, "crack": 4, "missing": 4}
    assert demo_data.has_labels and every_anomaly_has_a_mask(demo_data)
    for s in demo_data.train[:2] + demo_data.test:
        assert load_rgb(s.path).size == (SIZE, SIZE) and load_rgb(s.path).mode == "RGB"


def test_demo_is_byte_identical_on_every_run(demo_data, tmp_path):
    again = generate_demo(tmp_path / "again")
    first = _digests(demo_data.root / "demo")
    assert len(first) == 20 + 8 + 16 + 16  # images and masks
    assert _digests(again) == first
    # The temporary folder it was written in is gone.
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["demo"]
    assert [p.name for p in demo_data.root.iterdir()] == ["demo"]


def test_seed_changes_the_images():
    assert not np.array_equal(demo_image("train/good", 0, seed=0)[1], demo_image("train/good", 0, seed=1)[1])


def test_normal_images_vary(demo_data):
    images = [np.asarray(load_rgb(s.path), dtype=np.int16) for s in demo_data.train[:5]]
    for a, b in zip(images[:-1], images[1:]):
        assert np.abs(a - b).mean() > 5  # different captures, not copies
    # ...but they show the same part: a mid-grey flange on a dark belt.
    for image in images:
        assert 60 < image.mean() < 160
        assert image[:8, :8].mean() < 90  # belt in the corner
        # The part lies well inside the default centre crop (224 of 256 cuts 16 px a side):
        # the outer 24 px are belt only, no bright steel.
        border = np.ones(image.shape[:2], bool)
        border[24:-24, 24:-24] = False
        assert image[border].max() < 100


def test_masks_mark_where_the_defect_changed_the_image(demo_data):
    level = int(np.ceil(255 * demo._MASK_LEVEL))
    for s in demo_data.test:
        if s.label == 0:
            continue
        index = int(s.path.stem)
        clean, image, mask = demo_image(f"test/{s.defect}", index)
        saved = np.asarray(load_rgb(s.path))
        assert np.array_equal(saved, image), s.path
        truth = load_mask(s.mask_path)
        assert np.array_equal(truth, mask > 0), s.mask_path
        diff = np.abs(saved.astype(np.int16) - clean).max(axis=2)
        # Small (a fraction of a percent to a few percent of the image) but clearly visible.
        assert 0.001 < truth.mean() < 0.03, s.mask_path
        assert diff[truth].max() >= 40, s.path
        # The mask hugs the change: no blob of it without a changed pixel, little margin.
        count, blobs = cv2.connectedComponents(truth.astype(np.uint8))
        for blob in range(1, count):
            assert diff[blobs == blob].max() > level, s.mask_path
        assert (diff[truth] > level).mean() > 0.1, s.mask_path
        # Outside the mask the image is the defect-free part, up to the masking threshold.
        assert diff[~truth].max() <= level, s.path


def test_existing_demo_is_kept(demo_data):
    target = demo_data.root / "demo"
    before = _digests(target)
    assert generate_demo(demo_data.root) == target
    assert _digests(target) == before


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    written = []

    def fail_after_three(path, pixels):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(path)

    monkeypatch.setattr(demo, "_write_png", fail_after_three)
    with pytest.raises(ProtoADError, match="disk full") as err:
        generate_demo(tmp_path)
    assert str(tmp_path / "demo") in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_split_is_an_error():
    with pytest.raises(ProtoADError, match="test/dent"):
        demo_image("test/dent", 0)
