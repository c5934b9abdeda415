"""Health rules, one by one, on frames made to sit just inside and just outside each documented bound (real
FrameResults through a real HealthMonitor), and the window's majority rule."""

from __future__ import annotations

import time

import numpy as np

from protoad_edge.imagestats import image_stats
from protoad_edge.preprocess import Preprocess
from protoad_edge.runtime.health import Health, HealthMonitor, checks_known
from protoad_edge.runtime.result import FrameResult, RunContext

CROP = 64
PRE = Preprocess(resize=72, crop=CROP)


def texture(brightness: float = 120.0, contrast: float = 40.0, blur: float = 0, seed: int = 0) -> np.ndarray:
    """A crop with the given mean and spread; ``blur`` smooths it (less sharpness, same contrast roughly)."""
    import cv2

    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (CROP, CROP)).astype(np.float32)
    if blur:
        base = cv2.GaussianBlur(base, (0, 0), blur)
    base = (base - base.mean()) / base.std()
    grey = np.clip(brightness + contrast * base, 0, 255)
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def result(
    crop: np.ndarray, score: float = 0.3, frame_size: tuple[int, int] = (CROP, CROP), index: int = 0
) -> FrameResult:
    geometry = PRE.geometry(*frame_size)
    return FrameResult(
        index,
        time.time(),
        "cam",
        score,
        False,
        1.0,
        np.zeros((frame_size[1], frame_size[0], 3), np.uint8),
        crop,
        np.zeros((CROP, CROP), np.float32),
        geometry,
        RunContext("m", "c", 1.0, "manual"),
    )


def reference(
    crop: np.ndarray,
    scores: tuple[float, float, float] = (0.2, 0.3, 0.4),
    count: int = 40,
    region: tuple[int, int] = (CROP, CROP),
) -> dict:
    """A ``built_on`` whose ranges are exactly ``crop``'s statistics."""
    stats = image_stats(crop)
    return {
        "images": 50,
        "region": {"min": list(region), "max": list(region)},
        "brightness": [stats.brightness, stats.brightness],
        "contrast": [stats.contrast, stats.contrast],
        "sharpness": [stats.sharpness, stats.sharpness],
        "scores": {"images": "held-out", "count": count, "p05": scores[0], "p50": scores[1], "p95": scores[2]},
    }


def findings(monitor: HealthMonitor, crop: np.ndarray, **kwargs: object) -> set[str]:
    monitor._previous = None  # each probe is a first frame (no frozen finding)
    return set(monitor.findings(result(crop, **kwargs)))  # type: ignore[arg-type]


def scaled_brightness(crop: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(crop.astype(np.float64) * factor, 0, 255).astype(np.uint8)


def test_exposure_bounds() -> None:
    crop = texture(100, 20)
    monitor = HealthMonitor("cam", reference(crop))
    assert findings(monitor, crop) == set()
    assert findings(monitor, scaled_brightness(crop, 1.12)) == set()  # within 15 %
    assert "over-exposed" in findings(monitor, scaled_brightness(crop, 1.19))
    assert findings(monitor, scaled_brightness(crop, 0.88)) == set()
    assert "under-exposed" in findings(monitor, scaled_brightness(crop, 0.81))
    # a bright product: 15 % above it is past white, so halfway to white is the bound
    bright = texture(220, 10)
    monitor = HealthMonitor("cam", reference(bright))
    top = image_stats(bright).brightness
    assert (top + 255) / 2 < 1.15 * top
    assert "over-exposed" in findings(monitor, texture((top + 255) / 2 + 3, 10))
    assert "over-exposed" not in findings(monitor, texture((top + 255) / 2 - 3, 10))


def test_blur_bound() -> None:
    sharp = texture(120, 40)
    monitor = HealthMonitor("cam", reference(sharp))
    least = image_stats(sharp).sharpness
    soft = [texture(120, 40, blur=b) for b in (0.5, 0.65, 0.75, 1.0)]
    ratios = [image_stats(c).sharpness / least for c in soft]
    for crop, ratio in zip(soft, ratios):
        assert ("blurred" in findings(monitor, crop)) == (ratio < 0.5), ratio  # half the least sharp
    assert sum(r < 0.4 for r in ratios) and sum(0.5 < r for r in ratios)  # probes well on both sides of half
    # a dimmer lamp is no blur: same texture, less light
    assert "blurred" not in findings(monitor, scaled_brightness(sharp, 0.7))


def test_black_frames_are_named_and_not_judged_for_exposure_or_focus() -> None:
    crop = texture(120, 40)
    monitor = HealthMonitor("cam", reference(crop))
    assert findings(monitor, texture(10, 2)) == {"black"}  # not also under-exposed and blurred
    assert "black" not in findings(monitor, texture(20, 2))  # brightness 16 or more: dark, not black
    assert "black" not in findings(monitor, texture(10, 6))  # contrast 4 or more: a dark picture
    assert set(HealthMonitor("cam", None).findings(result(texture(10, 2)))) == {"black"}  # needs no record


def test_frozen_frames_are_named() -> None:
    crop = texture(120, 40)
    monitor = HealthMonitor("cam", None)
    assert "frozen" not in monitor.findings(result(crop))
    assert "frozen" in monitor.findings(result(crop.copy()))
    moved = crop.copy()
    moved[0, 0, 0] ^= 1
    assert "frozen" not in monitor.findings(result(moved))  # one grey level in one pixel is another picture


def test_size_bound() -> None:
    crop = texture()
    monitor = HealthMonitor("cam", reference(crop, region=(200, 100)))
    for size, flagged in [
        ((200, 100), False),
        ((219, 109), False),
        ((181, 91), False),
        ((221, 100), True),
        ((200, 89), True),
        ((400, 200), True),
    ]:
        assert ("size" in findings(monitor, crop, frame_size=size)) == flagged, size


def test_drift_both_ways_and_unknown_with_few_held_out_images() -> None:
    crop = texture()
    monitor = HealthMonitor("cam", reference(crop, scores=(0.2, 0.3, 0.4)))
    assert findings(monitor, crop, score=0.4) == set()  # at the 95th percentile: in
    assert findings(monitor, crop, score=0.41) == {"scores-high"}
    assert findings(monitor, crop, score=0.2) == set()
    assert findings(monitor, crop, score=0.19) == {"scores-low"}
    few = HealthMonitor("cam", reference(crop, count=9))
    assert "drift" in few.unknown and findings(few, crop, score=5.0) == set()
    assert "drift" in HealthMonitor("cam", reference(crop, count=10)).known  # at least 10 held-out scores


def test_an_old_bundle_checks_what_needs_no_record_and_says_what_it_cannot() -> None:
    known, unknown = checks_known(None)
    assert known == ["black", "frozen"] and list(unknown) == ["size", "exposure", "focus", "drift"]
    assert "older protoad-export" in unknown["size"]
    logs: list[str] = []
    Health(["cam"], None, 30, logs.append)
    assert logs == [
        "health: size, exposure, focus, drift not checked: the bundle does not record its normal "
        "images (built by an older protoad-export)"
    ]


def test_a_problem_is_in_force_while_more_than_half_of_the_window_has_it() -> None:
    crop = texture()
    changes: list[list[str]] = []
    monitor = HealthMonitor("cam", reference(crop), window=4, on_change=lambda m: changes.append(list(m.problems)))
    dark = scaled_brightness(crop, 0.5)
    pattern = [crop, dark, dark, crop, dark, crop, crop, dark, crop]
    states = []
    for i, frame in enumerate(pattern):
        shown = result(frame, index=i)
        monitor.write(shown, None)
        states.append(shown.health["problems"])  # type: ignore[index]
    # windows of 4: flagged counts 0,1,2,2,3,2,2,2,1 -> in force only at count 3 (more than half of 4)
    assert [bool(s) for s in states] == [False, False, False, False, True, False, False, False, False]
    assert changes == [["under-exposed"], []]
    last = result(dark, index=9)
    monitor.write(last, None)
    assert last.health == {"problems": [], "frame": ["under-exposed"]}  # this frame's own finding, not yet a problem
    assert last.record()["health"] == last.health
    assert monitor.status() == "health ok"


def test_messages_name_what_was_seen() -> None:
    crop = texture()
    monitor = HealthMonitor("cam", reference(crop, region=(200, 100)), window=1)
    frame = result(scaled_brightness(crop, 1.5), score=0.9, frame_size=(400, 200))
    monitor.write(frame, None)
    messages = {p.code: p.message for p in monitor.problems.values()}
    assert set(messages) == {"over-exposed", "size", "scores-high"}
    assert "the judged area is 400x200 px, the bundle was built on 200x100 px" in messages["size"]
    assert (
        "the median score of the last 1 frames is 0.9, 0.2 to 0.4 for 90 % of the held-out" in messages["scores-high"]
    )
    assert monitor.status() == "health: over-exposed, scores-high, size"
    state = monitor.state()
    assert state["state"] == "attention" and [p["code"] for p in state["problems"]] == [
        "over-exposed",
        "scores-high",
        "size",
    ]


def test_schema_3_metadata_reads_with_nothing_recorded_of_its_normal_images() -> None:
    from protoad_edge.metadata import SCHEMA, ModelInfo, migrate

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
        built_on={"images": 5},
    )
    old = {k: v for k, v in info.to_dict().items() if k != "built_on"} | {"schema": 3}
    assert SCHEMA == 4 and migrate(old)["schema"] == 4
    assert ModelInfo.from_dict(old).built_on is None
    assert ModelInfo.from_dict(info.to_dict()).built_on == {"images": 5}
