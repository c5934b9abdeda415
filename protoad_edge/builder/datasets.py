"""Dataset readers: which images train, which test, which are anomalous, where their masks are.

Torch-free (paths only; pixels are loaded later with ``preprocess.load_rgb`` / ``load_mask``).
ROOT is ``data_root``, else ``$PROTOAD_DATA``, else ``./data``; CAT is the category. Every list
is sorted by file name, so runs are repeatable. Images are files ending in one of
``preprocess.IMAGE_SUFFIXES``; names starting with a dot are ignored. A mask belongs to the
image whose stem it has, optionally followed by ``_mask`` (``007.png`` <- ``007_mask.png``),
whatever either's suffix.

``mvtec`` (MVTec AD)::

    ROOT/CAT/train/good/*             normal training images
    ROOT/CAT/test/good/*              normal test images
    ROOT/CAT/test/<defect>/*          anomalous test images, one folder per defect type
    ROOT/CAT/ground_truth/<defect>/*  a mask for every anomalous test image (required)

``btad`` (BTAD)::

    ROOT/CAT/train/ok/*               normal training images
    ROOT/CAT/test/ok/*, test/ko/*     normal and anomalous test images
    ROOT/CAT/ground_truth/ko/*        masks (an anomalous image without one is allowed)

``folder`` (your own images)::

    ROOT/CAT/good/*  or  ROOT/CAT/*   normal images (one or the other, not both)
    ROOT/CAT/abnormal/* or defect/*   optional anomalous images
    ROOT/CAT/masks/*                  optional masks for them

  Without an anomalous folder every normal image trains and there is no test set. With one,
  every fifth normal image (in name order) is held out as a normal test image, so the test
  set has both classes and can be scored.

Category ``demo`` is built in: it is generated into ROOT/demo on first use (see ``demo.py``)
and always read as ``mvtec``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..constants import DATASET_KINDS
from ..errors import ProtoADError
from ..preprocess import IMAGE_SUFFIXES, Preprocess, load_mask, load_rgb
from ..progress import progress_bar
from .demo import generate_demo

DEMO = "demo"
NORMAL = "good"  # the defect name of every normal sample, whatever the layout calls it
HOLDOUT = 5  # folder layout: every HOLDOUT-th normal image becomes a test image


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask_path: Path | None = None


@dataclass
class Dataset:
    category: str
    kind: str
    root: Path  # the data root; the category's images are under root / category
    train: list[Sample]
    test: list[Sample]

    @property
    def has_labels(self) -> bool:
        """The test set has both normal and anomalous images, so image-level metrics exist."""
        return {s.label for s in self.test} == {0, 1}


def resolve_data_root(path: str | os.PathLike | None = None) -> Path:
    """The data root: ``path``, else ``$PROTOAD_DATA``, else ``./data``."""
    if path is None or str(path) == "":
        path = os.environ.get("PROTOAD_DATA") or "data"
    return Path(path).expanduser()


def open_dataset(category: str, data_root: str | os.PathLike | None = None, kind: str = "mvtec") -> Dataset:
    """Read one category; any problem with the files is a ProtoADError naming the culprit."""
    _check_kind(kind)
    root = resolve_data_root(data_root)
    if category == DEMO:
        generate_demo(root)
        kind = "mvtec"
    directory = _existing(root) / category
    if not directory.is_dir():
        found = ", ".join(list_categories(root, kind)) or "none"
        raise ProtoADError(
            root_mistake(root, kind)
            or f"category {category!r} not found in {root} (categories there in {kind} layout: {found})"
        )
    train, test = _READERS[kind](directory)
    return Dataset(category, kind, root, train, test)


def list_categories(data_root: str | os.PathLike | None = None, kind: str = "mvtec") -> list[str]:
    """Names of the folders under the data root that hold a category in ``kind``'s layout."""
    _check_kind(kind)
    return [d.name for d in _subdirs(_existing(resolve_data_root(data_root))) if _category_sign(d, kind)]


def root_mistake(root: Path, kind: str) -> str | None:
    """If ``root`` is itself a category folder (``--data-root .../mvtec/bottle``), the message that says to pass
    the folder above it; else None."""
    sign = _category_sign(root, kind) if root.is_dir() else None
    if sign is None:
        return None
    plain = root.name not in ("", ".", "..") and root.parent != Path(".")
    above = root.parent if plain else root.resolve().parent
    return (
        f"--data-root {root} is itself a category folder ({root.resolve().name!r} in {kind} layout: it has "
        f"{sign}), not a data root: pass the folder above it, --data-root {above}"
    )


def _category_sign(directory: Path, kind: str) -> str | None:
    """What makes ``directory`` one category in ``kind``'s layout (``train/good/`` ...), or None: it is not one."""
    if kind == "folder":
        if (directory / NORMAL).is_dir():
            return f"{NORMAL}/"
        image = next((p for p in directory.iterdir() if _is_image(p)), None)
        return None if image is None else f"images such as {image.name}"
    sign = {"mvtec": "train/good", "btad": "train/ok"}[kind]
    return f"{sign}/" if (directory / sign).is_dir() else None


def _check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise ProtoADError(f"unknown dataset kind {kind!r}: choose one of {', '.join(DATASET_KINDS)}")


def _existing(root: Path) -> Path:
    if not root.is_dir():
        raise ProtoADError(f"data root not found: {root} (pass --data-root or set PROTOAD_DATA)")
    return root


# --- layouts ---------------------------------------------------------------------------------


def _read_mvtec(directory: Path) -> tuple[list[Sample], list[Sample]]:
    train = _normal(_images(directory / "train" / "good"))
    test: list[Sample] = []
    truth = directory / "ground_truth"
    tested = set()
    for folder in _subdirs(directory / "test"):
        images = _images(folder)
        if folder.name == NORMAL:
            test += _normal(images)
        else:
            test += _anomalous(images, folder.name, truth / folder.name, required=True)
            tested.add(folder.name)
    for folder in _subdirs(truth) if truth.is_dir() else []:
        if folder.name not in tested:
            _anomalous([], folder.name, folder, required=True)  # reports any mask found there
    return train, test


def _read_btad(directory: Path) -> tuple[list[Sample], list[Sample]]:
    train = _normal(_images(directory / "train" / "ok"))
    test = _normal(_images(directory / "test" / "ok"))
    anomalous = _images(directory / "test" / "ko")
    test += _anomalous(anomalous, "ko", directory / "ground_truth" / "ko", required=False)
    return train, test


def _read_folder(directory: Path) -> tuple[list[Sample], list[Sample]]:
    good = directory / NORMAL
    if good.is_dir():
        loose = [p for p in directory.iterdir() if _is_image(p)]
        if loose:
            raise ProtoADError(
                f"{directory} holds both a good/ folder and images such as {sorted(loose)[0].name}: "
                "put the normal images in one place"
            )
        normal = _images(good)
    else:
        normal = _images(directory)
    masks = directory / "masks"
    anomalous = [directory / name for name in ("abnormal", "defect") if (directory / name).is_dir()]
    if len(anomalous) > 1:
        raise ProtoADError(f"{directory} has both abnormal/ and defect/: put the anomalous images in one")
    if not anomalous:
        _anomalous([], "abnormal", masks, required=False)  # reports any mask found there
        return _normal(normal), []
    held_out = [p for i, p in enumerate(normal) if i % HOLDOUT == HOLDOUT - 1]
    train = [p for i, p in enumerate(normal) if i % HOLDOUT != HOLDOUT - 1]
    folder = anomalous[0]
    return _normal(train), _normal(held_out) + _anomalous(_images(folder), folder.name, masks, required=False)


_READERS: dict[str, Callable[[Path], tuple[list[Sample], list[Sample]]]] = {
    "mvtec": _read_mvtec,
    "btad": _read_btad,
    "folder": _read_folder,
}


# --- files -----------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ProtoADError(f"folder not found: {directory}")
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(directory: Path) -> list[Path]:
    """The images in ``directory``, sorted; a missing or empty folder is an error."""
    if not directory.is_dir():
        raise ProtoADError(f"folder not found: {directory}")
    images = sorted(p for p in directory.iterdir() if _is_image(p))
    if not images:
        raise ProtoADError(f"no images in {directory} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return images


def _normal(images: list[Path]) -> list[Sample]:
    return [Sample(path, 0, NORMAL) for path in images]


def _anomalous(images: list[Path], defect: str, mask_dir: Path, *, required: bool) -> list[Sample]:
    """Pair anomalous images with their masks in ``mask_dir`` by stem.

    A mask whose image is missing is always an error (a misnamed file would otherwise be
    silently ignored); an image without a mask is an error only when ``required``.
    """
    masks: dict[str, Path] = {}
    for mask in sorted(p for p in mask_dir.iterdir() if _is_image(p)) if mask_dir.is_dir() else []:
        stem = mask.stem.removesuffix("_mask")
        if stem in masks:
            raise ProtoADError(f"two masks for one image: {masks[stem]} and {mask}")
        masks[stem] = mask
    samples = []
    for path in images:
        mask = masks.get(path.stem)
        if mask is None and required:
            expected = mask_dir / f"{path.stem}_mask.png"
            raise ProtoADError(f"no ground-truth mask for {path} (expected {expected})")
        samples.append(Sample(path, 1, defect, mask))
    stems = {path.stem for path in images}
    for stem, mask in masks.items():
        if stem not in stems:
            raise ProtoADError(f"mask {mask} has no image: expected {stem}.* among the {defect} test images")
    return samples


def load_crops(samples: list[Sample], pre: Preprocess, label: str = "", progress: bool = False) -> np.ndarray:
    """uint8 [N,S,S,3] RGB crops of ``samples``; a bad file raises ProtoADError naming it."""
    crops = np.empty((len(samples), pre.crop, pre.crop, 3), dtype=np.uint8)
    for i, s in enumerate(progress_bar(samples, label, progress, unit="images")):
        crops[i] = _in_file(s.path, pre.pil, load_rgb(s.path))
    return crops


def _in_file(path: Path, step: Callable[[Any], np.ndarray], pixels: Any) -> np.ndarray:
    """``step(pixels)``, naming ``path`` in its error (an ROI that does not fit this image)."""
    try:
        return step(pixels)
    except ProtoADError as exc:
        raise ProtoADError(f"{path}: {exc}") from None


def load_masks(samples: list[Sample], pre: Preprocess) -> np.ndarray:
    """bool [N,S,S] ground truth; normal images (and anomalies without a mask file) are all False."""
    masks = np.zeros((len(samples), pre.crop, pre.crop), dtype=bool)
    for i, s in enumerate(samples):
        if s.mask_path is not None:
            masks[i] = _in_file(s.mask_path, pre.mask, load_mask(s.mask_path))
    return masks
