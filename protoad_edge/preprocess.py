"""Host-side preprocessing shared by the build stage and the runtime (numpy + Pillow, no torch).

The network takes the centre crop as raw RGB pixels; everything else (scaling, ImageNet
normalisation) is inside the exported graph. Using this one function on both sides is what
makes a score at build time equal the score on the camera.

Resize follows the authors: torchvision ``Resize(resize)`` on a PIL image, i.e. the shorter
side to ``resize`` with PIL's antialiased bilinear filter, then ``CenterCrop(crop)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ProtoADError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


FITS = ("crop", "resize", "pad")
FIT_HELP = (
    "how the region becomes the square input: crop = the paper's (shorter side to --resize, centre "
    "crop; the region's edges are not judged when it is not square), resize = the whole region "
    "squashed to the input, pad = the whole region scaled to fit, the rest black"
)


@dataclass(frozen=True)
class Geometry:
    """Where the network's square input lies in one frame size, to report and draw results in frame pixels.

    ``input_box`` (u0, v0, u1, v1) is the part of the input that shows the frame (all of it but the
    padding); ``frame_box`` (x, y, w, h, fractional) is where that part lies in the frame.
    """

    frame: tuple[int, int]  # width, height
    roi: tuple[int, int, int, int]
    input_box: tuple[int, int, int, int]
    frame_box: tuple[float, float, float, float]

    @property
    def judged(self) -> tuple[int, int, int, int]:
        """The frame pixels the network judges, as an integer x, y, w, h."""
        x, y, w, h = self.frame_box
        x0, y0 = int(math.floor(x + 1e-9)), int(math.floor(y + 1e-9))
        return x0, y0, int(math.ceil(x + w - 1e-9)) - x0, int(math.ceil(y + h - 1e-9)) - y0

    @property
    def scale(self) -> tuple[float, float]:
        """Frame pixels per input pixel, across and down."""
        u0, v0, u1, v1 = self.input_box
        return self.frame_box[2] / (u1 - u0), self.frame_box[3] / (v1 - v0)

    def box_to_frame(self, u: int, v: int, w: int, h: int) -> list[int]:
        """An input-pixel box as [x, y, w, h] in frame pixels (rounded outwards)."""
        sx, sy = self.scale
        x0 = self.frame_box[0] + (u - self.input_box[0]) * sx
        y0 = self.frame_box[1] + (v - self.input_box[1]) * sy
        x1, y1 = x0 + w * sx, y0 + h * sy
        left, top = int(math.floor(x0 + 1e-9)), int(math.floor(y0 + 1e-9))
        return [left, top, int(math.ceil(x1 - 1e-9)) - left, int(math.ceil(y1 - 1e-9)) - top]

    def to_frame(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """An input-sized map or mask resampled onto the frame (``fill`` outside the judged area)."""
        import cv2

        u0, v0, u1, v1 = self.input_box
        x, y, w, h = self.judged
        part = np.ascontiguousarray(values[v0:v1, u0:u1])
        nearest = values.dtype in (np.uint8, np.bool_)
        out = np.full((self.frame[1], self.frame[0]), fill, dtype=np.uint8 if nearest else np.float32)
        if nearest:
            part = part.astype(np.uint8)
        scaled = cv2.resize(
            part if nearest else part.astype(np.float32),
            (w, h),
            interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
        )
        x1, y1 = min(x + w, self.frame[0]), min(y + h, self.frame[1])
        out[y:y1, x:x1] = scaled[: y1 - y, : x1 - x]
        return out


@dataclass(frozen=True)
class Preprocess:
    """Cut the region of interest (the whole image without one), then make it the square input:
    ``fit`` crop (the paper's: shorter side to ``resize``, centre crop ``crop``), resize or pad."""

    resize: int = 256
    crop: int = 224
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in source-image pixels
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.crop < 32 or self.resize < self.crop:
            raise ProtoADError(
                f"bad preprocessing: need resize >= crop >= 32, got resize={self.resize} crop={self.crop}"
            )
        if self.fit not in FITS:
            raise ProtoADError(f"bad --fit {self.fit!r}: choose one of {', '.join(FITS)}")
        if self.roi is not None and (len(self.roi) != 4 or min(self.roi[:2]) < 0 or min(self.roi[2:]) < 1):
            raise ProtoADError(f"bad --roi {self.roi}: need x,y >= 0 and w,h >= 1")

    def region(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The region judged in a ``width`` x ``height`` image: the ROI, which must lie inside it."""
        if self.roi is None:
            return 0, 0, width, height
        x, y, w, h = self.roi
        if x + w > width or y + h > height:
            raise ProtoADError(
                f"--roi {x},{y},{w},{h} reaches past the {width}x{height} image: the region ends at "
                f"x {x + w}, y {y + h}"
            )
        return x, y, w, h

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB (any size) -> crop x crop x 3 uint8 RGB."""
        return self.pil(Image.fromarray(as_rgb(rgb)))

    def pil(self, image: Image.Image) -> np.ndarray:
        return np.asarray(self._fit(self._cut(image), Image.BILINEAR), dtype=np.uint8)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground-truth masks follow the image geometry (nearest, so they stay binary)."""
        image = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        return np.asarray(self._fit(self._cut(image), Image.NEAREST)) > 127

    def geometry(self, width: int, height: int) -> Geometry:
        """Where the input lies in a ``width`` x ``height`` frame."""
        x, y, w, h = self.region(width, height)
        if self.fit == "resize":
            return Geometry((width, height), (x, y, w, h), (0, 0, self.crop, self.crop), (x, y, w, h))
        if self.fit == "pad":
            (nw, nh), (px, py) = self._padded_size(w, h)
            return Geometry((width, height), (x, y, w, h), (px, py, px + nw, py + nh), (x, y, w, h))
        (nw, nh), (left, top) = self._resized_size(w, h), self._crop_origin(*self._resized_size(w, h))
        sx, sy = w / nw, h / nh
        return Geometry(
            (width, height),
            (x, y, w, h),
            (0, 0, self.crop, self.crop),
            (x + left * sx, y + top * sy, self.crop * sx, self.crop * sy),
        )

    def _cut(self, image: Image.Image) -> Image.Image:
        if self.roi is None:
            return image
        x, y, w, h = self.region(*image.size)
        return image.crop((x, y, x + w, y + h))

    def _fit(self, image: Image.Image, resample: int) -> Image.Image:
        if self.fit == "resize":
            return image.resize((self.crop, self.crop), resample) if image.size != (self.crop, self.crop) else image
        if self.fit == "pad":
            (nw, nh), (px, py) = self._padded_size(*image.size)
            canvas = Image.new(image.mode, (self.crop, self.crop))
            canvas.paste(image.resize((nw, nh), resample) if image.size != (nw, nh) else image, (px, py))
            return canvas
        size = self._resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, resample)
        left, top = self._crop_origin(*image.size)
        return image.crop((left, top, left + self.crop, top + self.crop))

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        """torchvision's Resize(int): the shorter side to ``resize``, the longer in proportion (truncated)."""
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if w <= h else (new_long, self.resize)

    def _crop_origin(self, w: int, h: int) -> tuple[int, int]:
        return int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))

    def _padded_size(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The region scaled so its longer side is ``crop``, and where it sits in the square input."""
        scale = self.crop / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        return (nw, nh), ((self.crop - nw) // 2, (self.crop - nh) // 2)


def parse_roi(text: str, flag: str = "--roi") -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (pixels of the source image) -> (x, y, w, h)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or int(parts[2]) < 1 or int(parts[3]) < 1:
        raise ProtoADError(
            f"bad {flag} {text!r}: expected x,y,w,h in pixels (e.g. 640,200,800,800), w and h at least 1"
        )
    x, y, w, h = (int(p) for p in parts)
    return x, y, w, h


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """Accept HxW grey, HxWx3 RGB or HxWx4 RGBA uint8; return HxWx3 uint8 RGB."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ProtoADError(f"expected 8-bit pixels, got dtype {pixels.dtype}")
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return np.ascontiguousarray(pixels[:, :, :3])
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    raise ProtoADError(f"expected an HxW or HxWx3 image, got shape {pixels.shape}")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; a missing, unreadable or corrupt file is a ProtoADError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ProtoADError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ProtoADError(f"cannot read image {path}: {exc}") from None


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as a boolean HxW array (any non-zero pixel is a defect)."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L")) > 0
    except FileNotFoundError:
        raise ProtoADError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ProtoADError(f"cannot read mask {path}: {exc}") from None


def to_batch(crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """N crops (HxWx3 uint8 RGB) -> the network input: float32 NCHW, RGB, values 0-255."""
    batch = np.asarray(crops)
    if batch.ndim == 3:
        batch = batch[None]
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
