"""Where frames come from: cameras, Jetson CSI cameras, streams, GStreamer pipelines, video files,
image files and folders of images, all behind one small ``Source`` interface that yields RGB frames.

Image files are decoded with Pillow (``preprocess.load_rgb``), exactly as the build stage reads them,
so a picture scores the same here as at build time; everything else goes through OpenCV.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from ...errors import ProtoADError
from ...preprocess import IMAGE_SUFFIXES, load_rgb
from ...redact import redact

SOURCE_HELP = (
    "camera0 (or 0), csi0, a video file, an image file, a folder of images, "
    "an rtsp:// or http(s):// stream, or a GStreamer pipeline ending in appsink"
)
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
# The Jetson CSI path: Argus delivers NV12 in NVMM memory, nvvidconv brings it to system memory as
# BGRx, videoconvert drops the x; appsink keeps only the newest buffer so we never read stale frames.
CSI_PIPELINE = (
    "nvarguscamerasrc sensor-id={sensor} ! "
    "video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1,format=NV12 ! "
    "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
    "appsink drop=true max-buffers=1"
)

# A function that opens an OpenCV capture: cv2.VideoCapture, or a fake in tests.
OpenCapture = Callable[[Any, int], Any]
OPENCV_SILENT = 0  # cv2.utils.logging.LOG_LEVEL_SILENT
# FFmpeg prefixes its messages with the component and its address: "[tcp @ 0x55d0c8a0] Connection refused".
FFMPEG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")


@dataclass(frozen=True)
class SourceSpec:
    """What a SOURCE argument means, decided without opening anything. ``target`` may hold a password (a stream's
    URL): only the capture opens it, and it stays out of the repr; everything else shows ``name``."""

    kind: str  # camera | csi | stream | gstreamer | video | image | folder
    target: Any = field(repr=False)  # device index, URL, pipeline, path or list of image paths
    name: str  # how records, logs, errors and the summary refer to it: a stream's URL with its secrets masked
    live: bool  # live sources drop stale frames and reconnect; files never drop


class Source(ABC):
    """Frames one at a time; ``read`` returns ``(rgb, label)`` or None when no frame came."""

    name: str = ""
    live: bool = False
    fps: float = 0.0  # frames per second the source reports (0: unknown)

    @abstractmethod
    def open(self) -> None:
        """(Re)open; raise ProtoADError naming the source if that fails."""

    @abstractmethod
    def read(self) -> tuple[np.ndarray, str] | None:
        """The next frame as HxWx3 uint8 RGB and a label (file path or source name); None: no frame."""

    def close(self) -> None:  # noqa: B027 - optional: a source may hold nothing to release
        """Release the device or file."""

    def position_ms(self) -> float | None:
        """Where the last frame read lies in a video file (None for other sources)."""
        return None


def parse_source(spec: str, *, csi_size: tuple[int, int] = (1920, 1080), csi_fps: int = 30) -> SourceSpec:
    """Classify SOURCE; a missing path or an empty folder is a ProtoADError naming it."""
    text = str(spec).strip()
    shown = redact(text)  # the source's name wherever it is shown; ``text`` goes only to the capture
    if m := re.fullmatch(r"(?:camera)?(\d+)", text):
        return SourceSpec("camera", int(m.group(1)), f"camera{m.group(1)}", live=True)
    if m := re.fullmatch(r"csi(\d+)", text):
        pipeline = CSI_PIPELINE.format(sensor=m.group(1), width=csi_size[0], height=csi_size[1], fps=csi_fps)
        return SourceSpec("csi", pipeline, text, live=True)
    if text.lower().startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text, shown, live=True)
    if "!" in text:
        return SourceSpec("gstreamer", text, "gstreamer pipeline", live=True)
    path = Path(text)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ProtoADError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}{_images_below(path)}")
        return SourceSpec("folder", images, str(path), live=False)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return SourceSpec("image", [path], str(path), live=False)
        return SourceSpec("video", str(path), str(path), live=False)
    if path.exists():
        raise ProtoADError(f"source {shown} is neither a file nor a folder")
    raise ProtoADError(f"source not found: {shown} (expected {SOURCE_HELP})")


def _images_below(folder: Path, shown: int = 3, depth: int = 3) -> str:
    """Where the images are when a folder holds them only in subfolders (a SOURCE is read one level deep);
    the search stops ``depth`` levels down, so a mistyped home folder is not walked whole."""
    found = []
    for parent, dirs, files in os.walk(folder):
        level = len(Path(parent).relative_to(folder).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
        if level and any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            found.append(Path(parent))
            if len(found) > shown:
                break
    if not found:
        return ""
    names = ", ".join(str(d) for d in found[:shown]) + (", ..." if len(found) > shown else "")
    return f", only in its subfolders ({names}): pass one of them"


def open_source(spec: str | SourceSpec, open_capture: OpenCapture | None = None) -> Source:
    """Parse and open SOURCE, so a camera that is absent or a file that is not a video fails now."""
    spec = parse_source(spec) if isinstance(spec, str) else spec
    source: Source
    if spec.kind in ("folder", "image"):
        source = ImageFiles(spec.target, spec.name)
    else:
        if spec.kind in ("csi", "gstreamer") and open_capture is None and not has_gstreamer():
            raise ProtoADError(
                f"{spec.name} needs OpenCV built with GStreamer (JetPack's OpenCV has it, "
                "the opencv-python wheel from PyPI does not)"
            )
        api = cv2.CAP_GSTREAMER if spec.kind in ("csi", "gstreamer") else cv2.CAP_ANY
        source = OpenCVSource(spec, api, open_capture or cv2.VideoCapture)
    source.open()
    return source


def has_gstreamer() -> bool:
    return bool(re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()))


class OpenCVSource(Source):
    """Anything cv2.VideoCapture opens: devices, streams, pipelines, video files."""

    def __init__(self, spec: SourceSpec, api: int, open_capture: OpenCapture) -> None:
        self.spec = spec
        self.name = spec.name
        self.live = spec.live
        self.api = api
        self.open_capture = open_capture
        self.capture: Any = None

    def open(self) -> None:
        self.close()
        with quiet_opencv() as said:
            capture = self.open_capture(self.spec.target, self.api)
            opened = capture.isOpened()
        if not opened:
            capture.release()
            kind, target = self.spec.kind, self.spec.target
            reason = {
                "camera": f"{self.name} (OpenCV camera index {target}): not connected, or in use by another program?",
                "csi": f"{self.name} (nvarguscamerasrc): is the camera connected and nvargus-daemon running?",
                "stream": f"stream {self.name}: unreachable, or a format OpenCV cannot decode?",
                "gstreamer": f"GStreamer pipeline {redact(str(target))}",
                "video": f"video {target}: not a video OpenCV can decode",
            }[kind]
            raise ProtoADError(f"cannot open {reason}{_what_it_said(said)}")
        self.capture = capture
        self.fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)

    def read(self) -> tuple[np.ndarray, str] | None:
        if self.capture is None:
            return None
        try:
            ok, frame = self.capture.read()
        except cv2.error:
            return None
        if not ok or frame is None:
            return None
        return bgr_to_rgb(frame), self.name

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None

    def position_ms(self) -> float | None:
        if self.spec.kind != "video" or self.capture is None:
            return None
        return float(self.capture.get(cv2.CAP_PROP_POS_MSEC))


@contextlib.contextmanager
def quiet_opencv() -> Iterator[list[str]]:
    """Silence OpenCV's log while a capture opens (an absent camera logs a dozen WARN and ERROR lines before our
    one error). FFmpeg, V4L2 and GStreamer write to fd 2 below that log, so in the main thread fd 2 goes to a
    file meanwhile and the yielded list gets its lines on exit, for the error message. Not in other threads:
    fd 2 is the process's, and a reconnect in the capture thread would swallow the main thread's status lines."""
    said: list[str] = []
    previous = _set_log_level(OPENCV_SILENT)
    try:
        if threading.current_thread() is threading.main_thread():
            with _fd2_into(said):
                yield said
        else:
            yield said
    finally:
        if previous is not None:
            _set_log_level(previous)


def _set_log_level(level: int) -> int | None:
    """Set OpenCV's log level; the previous one, or None where this OpenCV cannot set it."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is not None:
        previous = logging.getLogLevel()
        logging.setLogLevel(level)
        return int(previous)
    if hasattr(cv2, "setLogLevel"):
        return int(cv2.setLogLevel(level))
    return None


@contextlib.contextmanager
def _fd2_into(lines: list[str]) -> Iterator[None]:
    """What is written to fd 2 meanwhile (by C libraries too) goes into ``lines`` instead of the terminal."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _what_it_said(said: list[str], limit: int = 160) -> str:
    """The last thing the video libraries wrote while a capture failed to open, as a suffix of our error; a URL
    they quote is redacted before it is cut short (a cut could fall inside its password)."""
    lines = [redact(FFMPEG_PREFIX.sub("", line).strip()) for line in said]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    last = lines[-1] if len(lines[-1]) <= limit else lines[-1][: limit - 3] + "..."
    return f" (OpenCV's backend: {last})"


def bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV hands out BGR (or grey, or BGRA); the model and the build stage work in RGB."""
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class ImageFiles(Source):
    """Image files in order; an unreadable file is a ProtoADError naming it."""

    def __init__(self, paths: list[Path], name: str) -> None:
        self.paths = list(paths)
        self.name = name
        self.position = 0

    def open(self) -> None:
        self.position = 0

    def read(self) -> tuple[np.ndarray, str] | None:
        if self.position >= len(self.paths):
            return None
        path = self.paths[self.position]
        self.position += 1
        return np.asarray(load_rgb(path)), str(path)
