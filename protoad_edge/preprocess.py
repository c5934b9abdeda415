"""Host-side preprocessing shared by the build stage and the runtime (numpy + Pillow, no torch).

The network takes the centre crop as raw RGB pixels; everything else (scaling, ImageNet
normalisation) is inside the exported graph. Using this one function on both sides is what
makes a score at build time equal the score on the camera.

Resize follows the authors: torchvision ``Resize(resize)`` on a PIL image, i.e. the shorter
side to ``resize`` with PIL's antialiased bilinear filter, then ``CenterCrop(crop)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ProtoADError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize``, then centre-crop ``crop`` x ``crop``."""

    resize: int = 256
    crop: int = 224

    def __post_init__(self) -> None:
        if self.crop < 32 or self.resize < self.crop:
            raise ProtoADError(
                f"bad preprocessing: need resize >= crop >= 32, got resize={self.resize} crop={self.crop}"
            )

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB (any size) -> crop x crop x 3 uint8 RGB."""
        return self.pil(Image.fromarray(as_rgb(rgb)))

    def pil(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)
        if size != (w, h):
            image = image.resize(size, Image.BILINEAR)
        w, h = image.size
        top = int(round((h - self.crop) / 2.0))
        left = int(round((w - self.crop) / 2.0))
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground-truth masks follow the image geometry (nearest, so they stay binary)."""
        image = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)
        image = image.resize(size, Image.NEAREST)
        top = int(round((size[1] - self.crop) / 2.0))
        left = int(round((size[0] - self.crop) / 2.0))
        return np.asarray(image.crop((left, top, left + self.crop, top + self.crop))) > 127


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
