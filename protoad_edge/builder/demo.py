"""A small synthetic dataset, so the whole pipeline runs without downloading MVTec AD.

The product is a turned steel flange (bore, six bolt holes, a raised hub) lying in a locating
nest on a dark rubber belt, seen from above under a fixed lamp. Normal images differ the way
captures at such an inspection station do: the part sits within a pixel and turned by a degree
or two, the lamp's brightness drifts a little, the fine detail of the turning marks, the belt's
grain and the sensor noise change. The variation is kept this tight on purpose: the offline
backbone (``--weights none``, random weights) has features that each see most of the image, so
a loosely placed part would move every feature further than a small defect does.
Test images carry one of four defects - a scratch, a stain, a crack or a chipped rim - each
with its MVTec-style mask (255 = defect) of the pixels the defect actually changed.

Edges are drawn anti-aliased (soft by the fraction of a pixel they cover), as a camera sees
them. Each image has its own random stream (seed, split, index), so the output is identical
byte for byte on every run and any single image can be redrawn on its own, which is how the
tests check the masks.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from ..errors import ProtoADError

SIZE = 256
# The part's outer radius in pixels: its rim stays ~20 px inside the default 224 centre crop.
RADIUS = 0.36 * SIZE

DEFECTS = ("scratch", "spot", "crack", "missing")
# Images per folder. Small on purpose: prototype clustering is quadratic in the training set.
SPLITS = {"train/good": 20, "test/good": 8, **{f"test/{d}": 4 for d in DEFECTS}}
# A defect's mask covers every pixel it changed by more than this (0-1 intensity)...
_MASK_LEVEL = 0.03
# ...grown by this many pixels, as a human annotator would draw it.
_MASK_MARGIN = 2


@dataclass(frozen=True)
class _Scene:
    """The layers one image is composed from; defects edit a copy of ``metal`` or ``alpha``."""

    background: np.ndarray  # SIZE x SIZE x 3, belt with the part's shadow
    metal: np.ndarray  # SIZE x SIZE x 3, the part's surface as if it filled the frame
    alpha: np.ndarray  # SIZE x SIZE, 1 where the part is
    centre: tuple[float, float]
    radius: float


def generate_demo(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the demo category to ``root/demo`` in MVTec AD layout and return that path.

    An existing ``root/demo`` is kept as it is. The images are written into a hidden temporary
    folder beside the target and renamed into place at the end, so an interrupted run leaves
    no half dataset (and two processes racing both end up with one complete copy).
    """
    root = Path(root)
    target = root / "demo"
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo.", suffix=".tmp", dir=root))
    except OSError as exc:
        raise ProtoADError(f"cannot create the demo dataset in {root}: {exc}") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        for split, count in SPLITS.items():
            defect = split.split("/")[1]
            for index in range(count):
                _, image, mask = demo_image(split, index, seed=seed)
                _write_png(tmp / split / f"{index:03d}.png", image[:, :, ::-1])
                if mask is not None:
                    _write_png(tmp / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race to another process: its copy is identical
                raise
    except OSError as exc:
        raise ProtoADError(f"cannot create the demo dataset in {target}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_image(split: str, index: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Draw one demo image: (defect-free image, image, mask or None), RGB uint8 / uint8 0|255.

    ``split`` is ``train/good``, ``test/good`` or ``test/<defect>``; for a good split the
    first two are the same image.
    """
    if split not in SPLITS:
        raise ProtoADError(f"unknown demo split {split!r}: choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
    scene = _draw_scene(rng, _lathe_profile(seed))
    clean = _compose(scene)
    defect = split.split("/")[1]
    if defect == "good":
        return clean, clean, None
    damaged = _compose(_DEFECT_DRAWERS[defect](scene, rng))
    changed = (np.abs(damaged.astype(np.int16) - clean).max(axis=2) > 255 * _MASK_LEVEL).astype(np.uint8)
    size = 2 * _MASK_MARGIN + 1
    mask = cv2.dilate(changed, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    return clean, damaged, mask * 255


# --- the normal part -------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, lathe: np.ndarray) -> _Scene:
    # Python floats: a NumPy float64 scalar would promote every float32 layer to float64.
    cx, cy = (float(v) for v in SIZE / 2 + rng.uniform(-0.7, 0.7, size=2))  # held by the nest
    radius = float(RADIUS * rng.uniform(0.997, 1.003))  # turning tolerance
    turn = float(rng.uniform(-0.03, 0.03))  # rotation of the bolt-hole pattern: the nest's play
    light = float(rng.uniform(-0.03, 0.03) - np.pi / 4)  # the lamp, upper left
    lx, ly = math.cos(light), math.sin(light)
    gain = float(rng.uniform(0.98, 1.02))

    y, x = _grid()
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    # cos(angle between the light and the outward radius): which way a ring edge faces.
    facing = (dx * lx + dy * ly) / np.maximum(r, 1)

    # Belt: matte dark rubber with a faint grain, lit unevenly.
    # One noise field serves the belt and the steel: they never show in the same pixel.
    noise = _normal(rng, (SIZE, SIZE))
    fine = _smooth(noise, 0.4)
    grain = (_smooth(noise, 1.0) + fine) * 0.01
    belt = (0.2 + grain) * (1 - 0.08 * ((x - SIZE / 2) * lx + (y - SIZE / 2) * ly) / SIZE)

    # Part outline: disc minus bore and bolt holes.
    bore = radius * float(rng.uniform(0.27, 0.29))
    alpha = _inside(radius - r) * _inside(r - bore)
    hole_r = radius * 0.075
    holes = [
        _window(cx + 0.7 * radius * math.cos(a), cy + 0.7 * radius * math.sin(a), hole_r + 3)
        for a in turn + np.arange(6) * np.pi / 3
    ]
    for win, hx, hy in holes:
        alpha[win] *= _inside(np.hypot(x[win] - hx, y[win] - hy) - hole_r)

    # Shadow on the belt, cast away from the light.
    shift = np.float32([[1, 0, -4.5 * lx], [0, 1, -4.5 * ly]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(alpha, shift, (SIZE, SIZE)), (0, 0), 4.5)
    background = (belt * (1 - 0.55 * shadow))[:, :, None] * np.float32([0.93, 0.97, 1.0])

    # Turned steel: concentric grooves and bands, and the two highlight lobes across the
    # grooves (brightest where the radius is perpendicular to the light). Every part comes
    # from the same lathe program, so it has the same grooves, up to the tool's chatter.
    chatter = cv2.GaussianBlur(_normal(rng, (lathe.size, 1)), (0, 0), 1.0)[:, 0] * 0.01
    ring = _lookup(lathe + chatter, 2 * r)
    lobes = np.square(np.square(1 - facing * facing))
    hub = radius * 0.47
    steel = 0.5 + 0.22 * lobes + ring + 0.06 * _inside(hub - r) + fine * 0.012
    # Chamfers and the hub's step catch or miss the light depending on which way they face.
    steel += 0.28 * facing * _band(r, radius - 2.5, 2.5)
    steel -= 0.2 * facing * _band(r, bore, 2.5)
    steel += 0.14 * facing * _band(r, hub, 1.25)
    for win, hx, hy in holes:
        hdx, hdy = x[win] - hx, y[win] - hy
        hr = np.hypot(hdx, hdy)
        steel[win] -= 0.22 * (hdx * lx + hdy * ly) / np.maximum(hr, 1) * _band(hr, hole_r, 2)
    tint = np.float32([0.96, 0.99, 1.03]) * (1 + rng.uniform(-0.02, 0.02, size=3)).astype(np.float32)
    metal = steel[:, :, None] * tint

    return _Scene(background * gain, metal * gain, alpha, (cx, cy), radius)


@functools.cache
def _lathe_profile(seed: int) -> np.ndarray:
    """Brightness of the turned face against 2 x radius: fine grooves over broad bands; read only.

    Two samples a pixel, so the grooves are finer than the pixels, as on the real part. Its own
    stream (the dataset seed alone), so it is the same on every part of one dataset.
    """
    rng = np.random.default_rng(seed)
    samples = 2 * int(RADIUS) + 8  # 2 x the largest radius, with room to spare
    profile = cv2.GaussianBlur(_normal(rng, (samples, 1)), (0, 0), 1.0)[:, 0] * 0.05
    profile += cv2.GaussianBlur(_normal(rng, (samples, 1)), (0, 0), 6)[:, 0] * 0.08
    profile.flags.writeable = False
    return profile


@functools.cache
def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) of the image; read only."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _window(cx: float, cy: float, half: float) -> tuple[tuple[slice, slice], float, float]:
    """The square of pixels within ``half`` of (cx, cy), as a slice pair, with the centre."""
    x0, y0 = int(cx - half), int(cy - half)
    x1, y1 = math.ceil(cx + half) + 1, math.ceil(cy + half) + 1
    return (slice(max(y0, 0), y1), slice(max(x0, 0), x1)), cx, cy


def _lookup(profile: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``profile`` sampled at fractional positions ``r`` (linear; what np.interp does, faster)."""
    floor = np.minimum(np.floor(r), profile.size - 2)
    w = r - floor
    i = floor.astype(np.int32)
    return profile[i] * (1 - w) + profile[i + 1] * w


def _inside(distance: np.ndarray) -> np.ndarray:
    """Coverage of each pixel by a shape, from the signed distance to its edge (> 0 inside)."""
    return np.clip(distance + 0.5, 0, 1)


def _band(r: np.ndarray, at: float, width: float) -> np.ndarray:
    """1 on the ring ``at <= r < at + width``, soft at the edges."""
    return _inside(np.minimum(r - at, at + width - r))


def _normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    """White noise blurred to grains of about ``sigma`` pixels, rescaled to unit variance."""
    grains = cv2.GaussianBlur(noise, (0, 0), sigma)
    return grains / max(float(grains.std()), 1e-6)


def _compose(scene: _Scene) -> np.ndarray:
    """The layers -> an RGB uint8 image."""
    a = scene.alpha[:, :, None]
    image = scene.background * (1 - a) + scene.metal * a
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


# --- defects: each returns an edited copy of the scene ---------------------------------------


def _point_on_metal(scene: _Scene, rng: np.random.Generator, rmin: float, rmax: float) -> tuple[float, float]:
    """A random point on the part's face, at rmin..rmax of its radius, clear of the holes."""
    cx, cy = scene.centre
    while True:  # most candidates are clear of the holes, so this ends after a few tries
        a = rng.uniform(0, 2 * np.pi)
        rr = scene.radius * rng.uniform(rmin, rmax)
        x, y = float(cx + rr * np.cos(a)), float(cy + rr * np.sin(a))
        if scene.alpha[int(y) - 6 : int(y) + 7, int(x) - 6 : int(x) + 7].min() > 0:
            return x, y


def _polyline(canvas: np.ndarray, points: list[np.ndarray], values: list[float], thickness: int) -> None:
    """Draw anti-aliased segments, segment i with intensity ``values[i]`` (so lines can taper)."""
    for p, q, v in zip(points[:-1], points[1:], values):
        a, b = (tuple(int(c) for c in np.round(pt * 16)) for pt in (p, q))
        cv2.line(canvas, a, b, float(v), thickness, cv2.LINE_AA, shift=4)


def _walk(
    start: np.ndarray, course: float, steps: int, step: float, wobble: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """A jittered path that keeps returning to ``course`` (radians), so it never curls back."""
    points, heading = [start], course
    for _ in range(steps):
        heading += rng.uniform(-wobble, wobble) - 0.4 * (heading - course)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return points


def _scratch(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """A thin, slightly curved scratch that tapers at both ends: a bright cut beside a dark burr."""
    start = np.array(_point_on_metal(scene, rng, 0.35, 0.85))
    points = _walk(start, rng.uniform(0, 2 * np.pi), 30, rng.uniform(1.25, 2.0), 0.05, rng)
    depth = np.sin(np.linspace(0.05, 0.95, 30) * np.pi) ** 0.6
    cut = np.zeros((SIZE, SIZE), np.float32)
    _polyline(cut, points, list(depth), 1)
    burr = np.roll(cut, (1, 1), axis=(0, 1))
    shade = 0.35 * cut - 0.18 * burr * (1 - cut)
    return replace(scene, metal=scene.metal + shade[:, :, None])


def _spot(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """An oil or rust stain: an irregular brownish blot with a darker rim."""
    cx, cy = _point_on_metal(scene, rng, 0.35, 0.85)
    size = float(rng.uniform(9, 13))
    y, x = _grid()
    d = np.hypot(x - cx, y - cy) / size + 0.3 * _smooth(_normal(rng, (SIZE, SIZE)), 2.0)
    blot = np.clip((1.0 - d) * 2, 0, 1)
    rim = np.clip(1 - np.abs(d - 0.85) * 8, 0, 1)
    darken = (0.3 * blot + 0.25 * rim)[:, :, None]
    brown = np.float32([0.8, 0.55, 0.32])
    return replace(scene, metal=scene.metal * (1 - darken * (1 - brown)) * (1 - 0.4 * darken))


def _crack(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """A jagged hairline crack running in from the rim, with a short branch."""
    cx, cy = scene.centre
    a = rng.uniform(0, 2 * np.pi)
    start = np.array([cx, cy]) + (scene.radius - 0.5) * np.array([np.cos(a), np.sin(a)])
    inward = a + np.pi + rng.uniform(-0.5, 0.5)
    points = _walk(start, inward, int(rng.integers(20, 30)), 1.25, 0.6, rng)
    crack = np.zeros((SIZE, SIZE), np.float32)
    _polyline(crack, points, [1.0] * len(points), 1)
    fork = len(points) // 3 + int(rng.integers(0, len(points) // 3))
    branch = _walk(points[fork], inward + rng.choice([-1.0, 1.0]) * 0.8, 6, 1.5, 0.7, rng)
    _polyline(crack, branch, list(np.linspace(0.6, 0.2, 6)), 1)
    return replace(scene, metal=scene.metal * (1 - 0.85 * np.minimum(crack, 1)[:, :, None]))


def _missing(scene: _Scene, rng: np.random.Generator) -> _Scene:
    """A chip broken out of the rim: the belt shows through, the fresh fracture glints."""
    cx, cy = scene.centre
    a = rng.uniform(0, 2 * np.pi)
    centre = np.array([cx, cy]) + (scene.radius + 1.5) * np.array([np.cos(a), np.sin(a)])
    size = rng.uniform(9, 14)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 11))
    radii = size * rng.uniform(0.6, 1.1, angles.size)
    poly = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    chip = np.zeros((SIZE, SIZE), np.float32)
    cv2.fillPoly(chip, [np.round(poly * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=4)
    edge = cv2.dilate(chip, np.ones((3, 3), np.uint8)) - chip
    metal = scene.metal + 0.15 * edge[:, :, None]
    return replace(scene, metal=metal, alpha=scene.alpha * (1 - chip))


_DEFECT_DRAWERS = {"scratch": _scratch, "spot": _spot, "crack": _crack, "missing": _missing}
