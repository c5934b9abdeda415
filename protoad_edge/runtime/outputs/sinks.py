"""Where results go, behind one interface: a JSON-lines log, an overlay video, PNG defect masks, a live window.

The run loop hands every judged frame to every sink (``write``) and closes them all however the run
ends (``close(keep)``: keep what was written once a frame was processed, else leave nothing).
Files are never seen half-written: the log and the video grow in a temporary file beside their
target (same suffix, because OpenCV picks the container from it) and are renamed into place on
close; each mask is written atomically on its own.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, Callable

import cv2
import numpy as np

from ...atomic import PendingFile, write_atomic
from ...decision import defect_mask
from ...errors import ProtoADError
from ..result import FrameResult

# Container -> codec OpenCV's bundled FFmpeg writes everywhere without extra libraries.
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


class Sink(ABC):
    """Receives every judged frame; ``view`` is the rendered overlay (BGR) when ``needs_view`` is set."""

    needs_view = False
    names_files = False  # it sets a file name on the result that the records report: it writes first

    @abstractmethod
    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        """Take one frame; False asks the run to stop (the user closed the window)."""

    @abstractmethod
    def close(self, keep: bool) -> str | None:
        """Finish; with ``keep`` commit what was written. Returns what was written, for the summary."""

    def status(self) -> str | None:
        """A few words for the run's periodic status line (None: nothing to say)."""
        return None


class JsonlSink(Sink):
    """One JSON object per line; ``-`` streams to stdout (flushed per line, for pipes)."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.pending: PendingFile | None = None
        self.file: IO[str]
        if str(target) == "-":
            self.file = sys.stdout
        else:
            self.pending = PendingFile(target)
            self.file = open(self.pending.tmp, "w", encoding="utf-8")

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        self.file.write(json.dumps(result.record()) + "\n")
        if self.pending is None:
            self.file.flush()
        return True

    def close(self, keep: bool) -> str | None:
        if self.pending is None:
            self.file.flush()
            return None
        self.file.close()
        if keep:
            return str(self.pending.commit())
        self.pending.discard()
        return None


class VideoSink(Sink):
    """The overlay video; opened on the first frame, when its size is known.

    For a live source each frame is repeated until the video is as long as the time since the first
    capture: a source judged slower than its frame rate still gives a video that plays in real time.
    """

    needs_view = True

    def __init__(self, path: str | os.PathLike, fps: float, live: bool) -> None:
        path = Path(path)
        codec = VIDEO_CODECS.get(path.suffix.lower())
        if codec is None:
            raise ProtoADError(f"cannot save video {path}: use one of {', '.join(VIDEO_CODECS)}")
        self.fourcc = cv2.VideoWriter_fourcc(*codec)
        self.fps = fps
        self.live = live
        self.pending = PendingFile(path)
        self.writer: Any = None
        self.frames = 0
        self.first_timestamp: float | None = None

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        assert view is not None
        if self.writer is None:
            h, w = view.shape[:2]
            self.writer = cv2.VideoWriter(str(self.pending.tmp), self.fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise ProtoADError(f"cannot write video {self.pending.path}: OpenCV could not open a writer for it")
            self.first_timestamp = result.timestamp
        repeat = 1
        if self.live and self.first_timestamp is not None:
            repeat = max(1, int((result.timestamp - self.first_timestamp) * self.fps) + 1 - self.frames)
        for _ in range(repeat):
            self.writer.write(view)
        self.frames += repeat
        return True

    def close(self, keep: bool) -> str | None:
        if self.writer is not None:
            self.writer.release()
        if keep and self.frames:
            return str(self.pending.commit())
        self.pending.discard()
        return None


class MaskSink(Sink):
    """PNG masks (255 = defect pixel) of anomalous frames at the frame's resolution (frame pixels, like the
    records' regions), named by frame index (and image name for folders); the record names the file. The pixel
    threshold is the one in force for the frame (its ``RunContext``: a new version of the bundle may change it)."""

    names_files = True

    def __init__(self, folder: str | os.PathLike, source_name: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.source_name = source_name
        self.written = 0

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        if not result.anomalous:
            return True
        label = result.label
        stem = f"{result.index:06d}" if label == self.source_name else f"{result.index:06d}_{Path(label).stem}"
        mask = result.geometry.to_frame(defect_mask(result.anomaly_map, result.context.pixel_threshold))
        ok, png = cv2.imencode(".png", mask)
        if not ok:
            raise ProtoADError(f"cannot encode mask {stem}.png")
        write_atomic(self.folder / f"{stem}.png", lambda f: f.write(png.tobytes()))
        result.mask_file = f"{stem}.png"
        self.written += 1
        return True

    def close(self, keep: bool) -> str | None:
        return f"{self.written} masks in {self.folder}" if self.written else None


def display_problem() -> str | None:
    """Why no window can be shown here (None: a window should work)."""
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return "this OpenCV is built without GUI support (opencv-python-headless?)"
    return None


class WindowSink(Sink):
    """A live view; ``write`` returns False once the user pressed q / Esc or closed the window."""

    needs_view = True

    def __init__(self, title: str) -> None:
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    @classmethod
    def open(cls, title: str, log: Callable[[str], None]) -> WindowSink | None:
        """The window, or None after telling the user why there is none (the run carries on)."""
        problem = display_problem()
        if problem is None:
            try:
                return cls(title)
            except cv2.error as exc:
                problem = str(exc).strip().splitlines()[-1]
        log(f"notice: --show ignored, {problem}; carrying on without a window")
        return None

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        cv2.imshow(self.title, view)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            return False
        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self, keep: bool) -> str | None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass
        return None
