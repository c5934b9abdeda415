"""The pictures the station keeps beside its database, within a bounded retention.

For an anomalous frame (and a sample of normal ones) the folder ``FILE.images/NAME/`` holds ``frame.png`` (the
frame as captured, lossless, so ``protoad-eval`` and ``protoad-teach`` score exactly what the line judged),
``mask.png`` (255 = defect pixel, frame pixels, as ``--save-masks`` writes it) and ``overlay.jpg`` (what
``--show`` draws, of the judged area and a margin, at most ``OVERLAY_WIDTH`` wide, for the gallery). A folder
appears whole or not at all (written under a temporary name, then renamed).

Retention: at most ``keep_count`` folders and ``keep_bytes`` bytes; beyond either the oldest folders are
removed first (the database's rows stay, without pictures). Folders no row names (left by a crash between the
pictures and the row's commit) are removed when the store opens.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import cv2

from ...decision import defect_mask
from ..result import FrameResult
from .view import around, jpeg, overlay

OVERLAY_WIDTH = 640
FILES = {"frame": "frame.png", "mask": "mask.png", "overlay": "overlay.jpg"}
PNG_LEVEL = 1  # zlib level: the frame is mostly written for a few anomalies a minute, but fast beats small


class ImageStore:
    """``folder``'s picture folders, oldest first, and their sizes; ``save`` adds one and applies the retention."""

    def __init__(self, folder: str | os.PathLike, keep_count: int, keep_bytes: int, named: Iterable[str]) -> None:
        self.folder = Path(folder)
        self.keep_count, self.keep_bytes = keep_count, keep_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        named = list(named)
        wanted = set(named)
        for entry in self.folder.iterdir():
            if entry.name not in wanted:
                _remove(entry)
        self.kept: OrderedDict[str, int] = OrderedDict(
            (name, _size(self.folder / name)) for name in named if (self.folder / name).is_dir()
        )
        self.bytes = sum(self.kept.values())

    def path(self, name: str, kind: str) -> Path:
        return self.folder / name / FILES[kind]

    def save(self, name: str, result: FrameResult) -> None:
        """Writes ``name``'s pictures of ``result``; an OSError (disk full, read-only) leaves nothing behind."""
        tmp = self.folder / f".{name}.tmp"
        try:
            tmp.mkdir(exist_ok=True)
            mask = defect_mask(result.anomaly_map, result.context.pixel_threshold)
            pictures = {
                "frame": _encode(
                    ".png", cv2.cvtColor(result.frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL]
                ),
                "mask": _encode(".png", result.geometry.to_frame(mask)),
                "overlay": jpeg(overlay(result, OVERLAY_WIDTH, box=around(result.geometry))),
            }
            for kind, data in pictures.items():
                (tmp / FILES[kind]).write_bytes(data)
            os.replace(tmp, self.folder / name)
        except BaseException:
            _remove(tmp)
            raise
        self.kept[name] = sum(len(data) for data in pictures.values())
        self.bytes += self.kept[name]

    def discard(self, name: str) -> None:
        """Removes ``name``'s pictures (their row could not be stored)."""
        self.bytes -= self.kept.pop(name, 0)
        _remove(self.folder / name)

    def trim(self) -> list[str]:
        """Removes the oldest folders while more than ``keep_count`` or ``keep_bytes`` are kept; returns their
        names."""
        removed = []
        while self.kept and (len(self.kept) > self.keep_count or self.bytes > self.keep_bytes):
            name, size = self.kept.popitem(last=False)
            self.bytes -= size
            _remove(self.folder / name)
            removed.append(name)
        return removed


def _encode(suffix: str, image: object, params: list[int] | None = None) -> bytes:
    ok, data = cv2.imencode(suffix, image, params or [])
    if not ok:
        raise OSError(f"OpenCV could not encode a {suffix} picture")
    return data.tobytes()


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
