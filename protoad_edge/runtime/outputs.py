"""Where results go: a JSON-lines log, an overlay video, PNG defect masks and a live window.

Files are never seen half-written: the log and the video grow in a temporary file beside their
target (same suffix, because OpenCV picks the container from it) and are renamed into place when
the run ends - normally, on Ctrl-C or when the source fails mid-run, as long as one frame was
processed. Each mask is written atomically on its own.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import IO, Any, Callable

import cv2
import numpy as np

from ..atomic import PendingFile, write_atomic
from ..errors import ProtoADError

# Container -> codec OpenCV's bundled FFmpeg writes everywhere without extra libraries.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


class JsonlLog:
    """One JSON object per line; ``-`` streams to stdout (flushed per line, for pipes)."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.pending: PendingFile | None = None
        self.file: IO[str]
        if str(target) == "-":
            self.file = sys.stdout
        else:
            self.pending = PendingFile(target)
            self.file = open(self.pending.tmp, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.pending is None:
            self.file.flush()

    def close(self, keep: bool) -> Path | None:
        if self.pending is None:
            self.file.flush()
            return None
        self.file.close()
        if keep:
            return self.pending.commit()
        self.pending.discard()
        return None


class VideoOutput:
    """The overlay video; opened on the first frame, when its size is known.

    ``write(frame, until=t)`` repeats the frame until the video is ``t`` seconds long: a live source
    judged slower than its frame rate still gives a video that plays in real time.
    """

    def __init__(self, path: str | os.PathLike, fps: float) -> None:
        path = Path(path)
        codec = VIDEO_CODECS.get(path.suffix.lower())
        if codec is None:
            raise ProtoADError(f"cannot save video {path}: use one of {', '.join(VIDEO_CODECS)}")
        self.fourcc = cv2.VideoWriter_fourcc(*codec)
        self.fps = fps
        self.pending = PendingFile(path)
        self.writer: Any = None
        self.frames = 0

    def write(self, bgr: np.ndarray, until: float | None = None) -> None:
        if self.writer is None:
            h, w = bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self.pending.tmp), self.fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise ProtoADError(f"cannot write video {self.pending.path}: OpenCV could not open a writer for it")
        repeat = 1 if until is None else max(1, int(until * self.fps) + 1 - self.frames)
        for _ in range(repeat):
            self.writer.write(bgr)
        self.frames += repeat

    def close(self, keep: bool) -> Path | None:
        if self.writer is not None:
            self.writer.release()
        if keep and self.frames:
            return self.pending.commit()
        self.pending.discard()
        return None


class MaskFolder:
    """PNG masks (255 = defect pixel) of anomalous frames, named by frame index (and image name)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def write(self, index: int, label: str, source_name: str, mask: np.ndarray) -> Path:
        stem = f"{index:06d}" if label == source_name else f"{index:06d}_{Path(label).stem}"
        ok, png = cv2.imencode(".png", mask)
        if not ok:
            raise ProtoADError(f"cannot encode mask {stem}.png")
        path = write_atomic(self.folder / f"{stem}.png", lambda f: f.write(png.tobytes()))
        self.written += 1
        return path


def display_problem() -> str | None:
    """Why no window can be shown here (None: a window should work)."""
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return "this OpenCV is built without GUI support (opencv-python-headless?)"
    return None


class Window:
    """A live view; ``show`` returns False once the user pressed q / Esc or closed the window."""

    def __init__(self, title: str) -> None:
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    @classmethod
    def open(cls, title: str, log: Callable[[str], None]) -> "Window | None":
        """The window, or None after telling the user why there is none (the run carries on)."""
        problem = display_problem()
        if problem is None:
            try:
                return cls(title)
            except cv2.error as exc:
                problem = str(exc).strip().splitlines()[-1]
        log(f"notice: --show ignored, {problem}; carrying on without a window")
        return None

    def show(self, bgr: np.ndarray) -> bool:
        cv2.imshow(self.title, bgr)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            return False
        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass
