"""Dataset readers on small trees of the three layouts, their errors, and the real MVTec bottle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import every_anomaly_has_a_mask
from PIL import Image

from protoad_edge.builder.datasets import Sample, list_categories, open_dataset, resolve_data_root
from protoad_edge.errors import ProtoADError

MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"


def _image(path: Path, value: int = 128) -> Path:
    """A tiny image file; the readers only look at names, never at pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _names(samples: list[Sample], root: Path) -> list[str]:
    return [str(s.path.relative_to(root)) for s in samples]


@pytest.fixture
def mvtec(tmp_path):
    """ROOT/widget in MVTec layout, files created out of order; plus a second category and clutter."""
    cat = tmp_path / "widget"
    for name in ("002", "000", "001"):
        _image(cat / "train" / "good" / f"{name}.png")
    for name in ("001", "000"):
        _image(cat / "test" / "good" / f"{name}.png")
        _image(cat / "test" / "crack" / f"{name}.png")
        _image(cat / "ground_truth" / "crack" / f"{name}_mask.png", 255)
    _image(cat / "test" / "hole" / "000.png")
    _image(cat / "ground_truth" / "hole" / "000_mask.png", 255)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    (cat / "readme.txt").write_text("not a folder")
    _image(tmp_path / "gadget" / "train" / "good" / "000.png")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".demo.x.tmp").mkdir()
    return tmp_path


def test_mvtec_layout(mvtec):
    ds = open_dataset("widget", mvtec)
    assert (ds.category, ds.kind, ds.root) == ("widget", "mvtec", mvtec)
    cat = mvtec / "widget"
    assert _names(ds.train, cat) == ["train/good/000.png", "train/good/001.png", "train/good/002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in ds.train)
    assert _names(ds.test, cat) == [
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/good/001.png",
        "test/hole/000.png",
    ]
    assert [s.label for s in ds.test] == [1, 1, 0, 0, 1]
    assert [s.defect for s in ds.test] == ["crack", "crack", "good", "good", "hole"]
    assert [s.mask_path and str(s.mask_path.relative_to(cat)) for s in ds.test] == [
        "ground_truth/crack/000_mask.png",
        "ground_truth/crack/001_mask.png",
        None,
        None,
        "ground_truth/hole/000_mask.png",
    ]
    assert ds.has_labels and every_anomaly_has_a_mask(ds)
    assert open_dataset("widget", str(mvtec)) == ds  # str or Path, same answer


def test_list_categories(mvtec):
    assert list_categories(mvtec) == ["gadget", "widget"]
    assert list_categories(mvtec, "btad") == []


def test_data_root_from_environment_then_cwd(mvtec, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PROTOAD_DATA", str(mvtec))
    assert resolve_data_root() == mvtec
    assert len(open_dataset("widget").train) == 3
    assert resolve_data_root("elsewhere") == Path("elsewhere")  # an explicit root wins
    monkeypatch.delenv("PROTOAD_DATA")
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    assert resolve_data_root() == Path("data")
    (cwd / "data").symlink_to(mvtec)
    assert list_categories() == ["gadget", "widget"]


def _error(category: str, root: Path, kind: str = "mvtec") -> str:
    with pytest.raises(ProtoADError) as err:
        open_dataset(category, root, kind)
    return str(err.value)


def test_missing_root(tmp_path):
    message = _error("widget", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "PROTOAD_DATA" in message
    with pytest.raises(ProtoADError, match="nowhere"):
        list_categories(tmp_path / "nowhere")


def test_missing_category_lists_the_ones_found(mvtec):
    message = _error("bottle", mvtec)
    assert "'bottle'" in message and str(mvtec) in message and "gadget, widget" in message


def test_unknown_kind(mvtec):
    assert "'coco'" in _error("widget", mvtec, "coco")
    with pytest.raises(ProtoADError, match="'coco'"):
        list_categories(mvtec, "coco")


def test_empty_training_folder(mvtec):
    for p in (mvtec / "widget" / "train" / "good").glob("*.png"):
        p.unlink()
    assert str(mvtec / "widget" / "train" / "good") in _error("widget", mvtec)


def test_gadget_without_test_folder(mvtec):
    assert str(mvtec / "gadget" / "test") in _error("gadget", mvtec)


def test_mvtec_defect_without_mask(mvtec):
    (mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    message = _error("widget", mvtec)
    assert str(mvtec / "widget" / "test" / "crack" / "001.png") in message
    assert "001_mask.png" in message


def test_mask_without_image(mvtec):
    (mvtec / "widget" / "test" / "crack" / "001.png").unlink()
    assert str(mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png") in _error("widget", mvtec)


def test_masks_for_a_defect_with_no_test_folder(mvtec):
    stray = _image(mvtec / "widget" / "ground_truth" / "dent" / "000_mask.png")
    assert str(stray) in _error("widget", mvtec)


def test_two_masks_for_one_image(mvtec):
    extra = _image(mvtec / "widget" / "ground_truth" / "hole" / "000_mask.bmp")
    assert str(extra) in _error("widget", mvtec)


@pytest.fixture
def btad(tmp_path):
    """BTAD: .bmp images, .png masks with the image's stem, one defective image without a mask."""
    cat = tmp_path / "01"
    for name in ("0002", "0000", "0001"):
        _image(cat / "train" / "ok" / f"{name}.bmp")
    _image(cat / "test" / "ok" / "0000.bmp")
    for name in ("0000", "0001", "0002"):
        _image(cat / "test" / "ko" / f"{name}.bmp")
    for name in ("0000", "0002"):
        _image(cat / "ground_truth" / "ko" / f"{name}.png", 255)
    return tmp_path


def test_btad_layout(btad):
    ds = open_dataset("01", btad, "btad")
    cat = btad / "01"
    assert _names(ds.train, cat) == ["train/ok/0000.bmp", "train/ok/0001.bmp", "train/ok/0002.bmp"]
    assert _names(ds.test, cat) == [
        "test/ok/0000.bmp",
        "test/ko/0000.bmp",
        "test/ko/0001.bmp",
        "test/ko/0002.bmp",
    ]
    assert [s.label for s in ds.test] == [0, 1, 1, 1]
    assert [s.defect for s in ds.test] == ["good", "ko", "ko", "ko"]
    masks = [s.mask_path and s.mask_path.name for s in ds.test]
    assert masks == [None, "0000.png", None, "0002.png"]
    assert ds.has_labels and not every_anomaly_has_a_mask(ds)  # one anomalous image lacks a mask
    assert list_categories(btad, "btad") == ["01"]


def test_btad_mask_without_image(btad):
    stray = _image(btad / "01" / "ground_truth" / "ko" / "0007.png")
    assert str(stray) in _error("01", btad, "btad")


def test_folder_of_loose_normal_images(tmp_path):
    for i in range(7):
        _image(tmp_path / "parts" / f"img{i}.jpg")
    ds = open_dataset("parts", tmp_path, "folder")
    assert _names(ds.train, tmp_path / "parts") == [f"img{i}.jpg" for i in range(7)]
    assert ds.test == [] and not ds.has_labels and not every_anomaly_has_a_mask(ds)
    assert list_categories(tmp_path, "folder") == ["parts"]


def test_folder_with_good_abnormal_and_masks(tmp_path):
    cat = tmp_path / "parts"
    for i in range(7):
        _image(cat / "good" / f"{i:02d}.png")
    _image(cat / "abnormal" / "b.png")
    _image(cat / "abnormal" / "a.png")
    _image(cat / "masks" / "a_mask.png", 255)  # either naming works
    _image(cat / "masks" / "b.png", 255)
    ds = open_dataset("parts", tmp_path, "folder")
    # Every fifth normal image is held out, so the test set has both classes.
    assert _names(ds.train, cat) == [f"good/{i:02d}.png" for i in (0, 1, 2, 3, 5, 6)]
    assert _names(ds.test, cat) == ["good/04.png", "abnormal/a.png", "abnormal/b.png"]
    assert [s.label for s in ds.test] == [0, 1, 1]
    assert [s.defect for s in ds.test] == ["good", "abnormal", "abnormal"]
    assert [s.mask_path and s.mask_path.name for s in ds.test] == [None, "a_mask.png", "b.png"]
    assert ds.has_labels and every_anomaly_has_a_mask(ds)


def test_folder_defect_alias_without_masks(tmp_path):
    cat = tmp_path / "parts"
    for i in range(5):
        _image(cat / f"{i}.png")
    _image(cat / "defect" / "x.png")
    ds = open_dataset("parts", tmp_path, "folder")
    assert len(ds.train) == 4
    assert [(s.label, s.defect, s.mask_path) for s in ds.test] == [(0, "good", None), (1, "defect", None)]
    assert ds.has_labels and not every_anomaly_has_a_mask(ds)


def test_folder_errors(tmp_path):
    cat = tmp_path / "parts"
    cat.mkdir()
    assert str(cat) in _error("parts", tmp_path, "folder")  # no images at all
    _image(cat / "good" / "0.png")
    _image(cat / "1.png")
    assert str(cat) in _error("parts", tmp_path, "folder")  # good/ and loose images
    (cat / "1.png").unlink()
    stray = _image(cat / "masks" / "0.png")
    assert str(stray) in _error("parts", tmp_path, "folder")  # a mask but no anomalous images
    _image(cat / "abnormal" / "9.png")
    _image(cat / "defect" / "8.png")
    assert str(cat) in _error("parts", tmp_path, "folder")  # both anomalous folders


def test_demo_is_generated_on_first_use(tmp_path, monkeypatch):
    """Category demo needs no data: it appears under the data root (here from PROTOAD_DATA)."""
    monkeypatch.setenv("PROTOAD_DATA", str(tmp_path / "fresh"))
    ds = open_dataset("demo", kind="folder")  # the demo is MVTec layout whatever the kind
    assert ds.kind == "mvtec" and ds.root == tmp_path / "fresh"
    assert len(ds.train) == 20 and len(ds.test) == 24 and every_anomaly_has_a_mask(ds)
    assert list_categories() == ["demo"]


@pytest.mark.skipif(not (MVTEC / "bottle").is_dir(), reason="MVTec AD bottle not present")
def test_real_mvtec_bottle():
    ds = open_dataset("bottle", MVTEC)
    assert len(ds.train) == 209
    assert len(ds.test) == 83
    assert sum(s.label == 0 for s in ds.test) == 20
    anomalous = [s for s in ds.test if s.label == 1]
    assert len(anomalous) == 63
    assert {s.defect for s in anomalous} == {"broken_large", "broken_small", "contamination"}
    for s in anomalous:
        assert s.mask_path.name == f"{s.path.stem}_mask.png"
        assert s.mask_path.parent.name == s.defect and s.mask_path.is_file()
    assert ds.has_labels and every_anomaly_has_a_mask(ds)
    assert ds.train == sorted(ds.train, key=lambda s: s.path)


def test_a_category_folder_given_as_the_data_root_names_its_parent(mvtec, btad, tmp_path_factory, monkeypatch):
    """--data-root .../mvtec/bottle once answered "categories there: none": the parent is the root to pass."""
    from protoad_edge.builder.datasets import root_mistake

    for category, root, kind, sign in (("widget", mvtec, "mvtec", "train/good/"), ("01", btad, "btad", "train/ok/")):
        for asked in (category, "other"):
            message = _error(asked, root / category, kind)
            assert message.startswith(
                f"--data-root {root / category} is itself a category folder ('{category}' in "
                f"{kind} layout: it has {sign})"
            )
            assert message.endswith(f"pass the folder above it, --data-root {root}")
    folder = tmp_path_factory.mktemp("own")
    _image(folder / "parts" / "a.png")
    assert _error("parts", folder / "parts", "folder").endswith(f"--data-root {folder}")
    monkeypatch.chdir(mvtec / "widget")  # --data-root . from inside the category
    assert _error("widget", Path("."), "mvtec").endswith(f"--data-root {mvtec.resolve()}")
    assert root_mistake(mvtec, "mvtec") is None and root_mistake(mvtec / "widget", "btad") is None
    assert "gadget, widget" in _error("bottle", mvtec)  # a real root still lists its categories
