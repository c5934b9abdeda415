"""Host preprocessing equals the authors' torchvision transforms; metadata and atomic writes round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoad_edge.atomic import write_text_atomic
from protoad_edge.bundle import Bundle
from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import Preprocess, load_rgb, to_batch


@pytest.mark.parametrize("size", [(900, 900), (640, 480), (300, 500), (256, 256)])
def test_matches_torchvision_resize_centercrop(size: tuple[int, int]) -> None:
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = np.asarray(T.Compose([T.Resize(256, Image.BILINEAR), T.CenterCrop(224)])(image))
    assert np.array_equal(Preprocess(256, 224).pil(image), ref)
    assert np.array_equal(Preprocess(256, 224)(np.asarray(image)), ref)


def test_mask_follows_geometry_and_stays_binary() -> None:
    mask = np.zeros((900, 900), dtype=bool)
    mask[450:, :] = True
    out = Preprocess(256, 224).mask(mask)
    assert out.shape == (224, 224) and out.dtype == bool
    assert out[:100].sum() == 0 and out[-100:].all()


def test_grey_and_rgba_inputs() -> None:
    pre = Preprocess(72, 64)
    grey = np.full((80, 80), 77, dtype=np.uint8)
    assert pre(grey).shape == (64, 64, 3) and (pre(grey) == 77).all()
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)
    assert pre(rgba).shape == (64, 64, 3)
    with pytest.raises(ProtoADError, match="8-bit"):
        pre(np.zeros((80, 80, 3), dtype=np.float32))


def test_to_batch_layout() -> None:
    crops = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    crops[..., 0] = 200  # red
    batch = to_batch(crops)
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    assert (batch[:, 0] == 200).all() and (batch[:, 1:] == 0).all()


def test_bad_geometry() -> None:
    with pytest.raises(ProtoADError, match="resize >= crop"):
        Preprocess(100, 224)


def test_corrupt_and_missing_images(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ProtoADError, match="broken.png"):
        load_rgb(bad)
    with pytest.raises(ProtoADError, match="not found.*nope.png"):
        load_rgb(tmp_path / "nope.png")


def test_metadata_round_trip(tmp_path: Path) -> None:
    info = ModelInfo(
        category="cable",
        resize=256,
        crop=224,
        backbone="wide_resnet50_2",
        weights="none",
        feature_upsample="nearest",
        num_prototypes=3680,
        image_threshold=0.31,
        pixel_threshold=0.25,
        build={"finch_levels": [1000, 100]},
    )
    assert ModelInfo.from_props(info.to_props()) == info
    info.save_json(tmp_path / "cable.json")
    assert ModelInfo.load_json(tmp_path / "cable.json") == info
    (tmp_path / "foreign.json").write_text('{"format": "something-else"}')
    with pytest.raises(ProtoADError, match="foreign.json.*not a protoad-edge model"):
        ModelInfo.load_json(tmp_path / "foreign.json")
    assert Bundle.of("models/cable.fp16.onnx").sidecar == Path("models/cable.json")
    assert Bundle.of("models/cable.plan").sidecar == Path("models/cable.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    from protoad_edge.atomic import write_atomic

    target = tmp_path / "out.bin"
    write_text_atomic(target, "old")

    def boom(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# --- the region of interest and how it becomes the input ---------------------------------------


def frame(width: int = 640, height: int = 360, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_roi_crop_is_the_old_path_on_the_region_cut_out_by_hand() -> None:
    rgb = frame()
    roi = (200, 40, 300, 260)
    cut = rgb[40:300, 200:500]
    np.testing.assert_array_equal(Preprocess(256, 224, roi)(rgb), Preprocess(256, 224)(cut))
    mask = np.zeros(rgb.shape[:2], bool)
    mask[100:150, 300:340] = True
    np.testing.assert_array_equal(
        Preprocess(256, 224, roi).mask(mask), Preprocess(256, 224).mask(mask[40:300, 200:500])
    )


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_whole_region_fits(fit: str) -> None:
    rgb = np.zeros((360, 640, 3), np.uint8)
    rgb[100:300, 100:500] = 200  # the region: 400 x 200, bright
    out = Preprocess(256, 224, (100, 100, 400, 200), fit)(rgb)
    assert out.shape == (224, 224, 3)
    if fit == "resize":
        assert (out == 200).all()  # every input pixel shows the region
    else:
        bright = np.argwhere(out[..., 0] == 200)  # 224 x 112, centred, black above and below
        assert (
            bright[:, 0].min() == 56 and bright[:, 0].max() == 167 and (out[:56] == 0).all() and (out[168:] == 0).all()
        )


@pytest.mark.parametrize("fit", ["crop", "resize", "pad"])
def test_geometry_maps_input_pixels_back_to_the_frame(fit: str) -> None:
    """A bright square placed in the frame comes back, through the input and the geometry, where it was."""
    pre = Preprocess(256, 224, (320, 90, 960, 720), fit)
    rgb = np.zeros((1080, 1920, 3), np.uint8)
    rgb[400:480, 700:820] = 255
    geometry = pre.geometry(1920, 1080)
    bright = (pre(rgb)[..., 0] > 127).astype(np.uint8)
    ys, xs = np.nonzero(bright)
    x, y, w, h = geometry.box_to_frame(
        int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    )
    assert abs(x - 700) <= 6 and abs(y - 400) <= 6 and abs(x + w - 820) <= 6 and abs(y + h - 480) <= 6
    back = geometry.to_frame(bright)
    assert back.shape == (1080, 1920) and abs(int(back.sum()) - 80 * 120) < 0.15 * 80 * 120
    jx, jy, jw, jh = geometry.judged
    assert 320 <= jx and jx + jw <= 1280 and 90 <= jy and jy + jh <= 810  # inside the region
    if fit == "crop":  # the paper's crop judges 224/256 of the short side, in the middle: 630 x 630 of 960 x 720
        assert abs(jw - 630) <= 1 and abs(jh - 630) <= 1 and abs(jx - (320 + 165)) <= 3 and abs(jy - (90 + 45)) <= 3
    else:
        assert (jx, jy, jw, jh) == (320, 90, 960, 720)


@pytest.mark.parametrize("fit", ["crop", "resize", "pad"])
def test_roi_may_end_at_the_last_pixel_and_not_one_past_it(fit: str) -> None:
    """A 100 x 80 frame: a region ending at x 100 or y 80 is the frame's edge; at 101 or 81 it needs a pixel that
    is not there (PIL would fill it black and the model would judge it)."""
    frame = np.full((80, 100, 3), 200, np.uint8)
    for roi in ((20, 10, 80, 30), (20, 10, 30, 70), (0, 0, 100, 80)):
        crop = Preprocess(32, 32, roi, fit)(frame)
        assert crop.shape == (32, 32, 3) and (fit == "pad" or crop.min() == 200)
        assert Preprocess(32, 32, roi, fit).geometry(100, 80).roi == roi
    for roi, end in (
        ((20, 10, 81, 30), "x 101, y 40"),
        ((20, 10, 30, 71), "x 50, y 81"),
        ((0, 0, 101, 81), "x 101, y 81"),
    ):
        with pytest.raises(ProtoADError, match=f"reaches past the 100x80 image: the region ends at {end}"):
            Preprocess(32, 32, roi, fit)(frame)
        with pytest.raises(ProtoADError, match="reaches past"):
            Preprocess(32, 32, roi, fit).geometry(100, 80)


def test_roi_outside_the_image_names_the_sizes() -> None:
    with pytest.raises(
        ProtoADError, match=r"--roi 1800,900,300,300 reaches past the 1920x1080 image: .*x 2100, y 1200"
    ):
        Preprocess(256, 224, (1800, 900, 300, 300))(np.zeros((1080, 1920, 3), np.uint8))
    with pytest.raises(ProtoADError, match="--fit"):
        Preprocess(fit="stretch")
    with pytest.raises(ProtoADError, match="--roi"):
        Preprocess(roi=(0, 0, 0, 10))
