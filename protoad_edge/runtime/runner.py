"""The inspection loop: frames in, verdicts out.

Per frame: the model's own preprocessing (``ModelInfo.preprocess``, the function the build stage
used, so scores match), one inference, the verdict ``score > threshold`` (the image threshold is
the highest held-out normal score or above, so a score equal to it is still normal), then the
outputs the caller asked for. ``protoad-run`` is a thin wrapper around ``run``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ProtoADError
from ..preprocess import to_batch
from .backend import Backend
from .capture import DEFAULT_BACKOFF, Capture
from .outputs import JsonlLog, MaskFolder, VideoOutput, Window
from .overlay import defect_mask, render
from .sources import Source, SourceSpec, open_source

# Overlay video frame rate when the source reports none or an implausible one (streams often say
# 90000): slow enough to look at image by image for files, a usual camera rate for live sources.
FILE_VIDEO_FPS, LIVE_VIDEO_FPS, MAX_VIDEO_FPS = 5.0, 25.0, 120.0
FPS_SMOOTHING = 0.1  # weight of the newest frame in the displayed FPS


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RunOptions:
    threshold: float | None = None  # image threshold; None: the model's own
    max_frames: int | None = None
    show: bool = False
    save: str | Path | None = None  # overlay video (.mp4 or .avi)
    save_masks: str | Path | None = None  # folder for PNG masks of anomalous frames
    jsonl: str | Path | None = None  # per-frame log; "-" is stdout
    queue_size: int | None = None  # None: 2 for live sources, 8 for files
    backoff: tuple[float, ...] = DEFAULT_BACKOFF  # pauses before reconnecting a live source
    log: Callable[[str], None] = _stderr  # notices for the user (never the JSON lines)
    on_frame: Callable[["FrameResult"], None] | None = None  # e.g. to drive a reject gate


@dataclass
class FrameResult:
    index: int
    timestamp: float
    label: str  # image path, or the source's name
    score: float
    anomalous: bool
    latency_ms: float  # preprocessing + inference
    crop: np.ndarray  # what the model saw: SxSx3 uint8 RGB
    anomaly_map: np.ndarray  # SxS float32

    def record(self) -> dict[str, Any]:
        """The JSON line."""
        return {
            "frame": self.index,
            "timestamp": round(self.timestamp, 6),
            "source": self.label,
            "score": self.score,
            "verdict": "anomaly" if self.anomalous else "ok",
            "latency_ms": round(self.latency_ms, 3),
        }


@dataclass
class RunSummary:
    source: str
    model: str
    threshold: float
    frames: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    dropped: int = 0
    reconnects: int = 0
    stopped: str = ""  # end of source | max frames | interrupted | window closed | failed
    latencies_ms: list[float] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {}
        values = np.percentile(np.asarray(self.latencies_ms), [50, 90, 99])
        return {"p50": float(values[0]), "p90": float(values[1]), "p99": float(values[2])}

    def lines(self) -> list[str]:
        lat = ", ".join(f"{k} {v:.1f} ms" for k, v in self.percentiles().items()) or "-"
        out = [
            f"source      {self.source} ({self.stopped})",
            f"frames      {self.frames}, anomalies {self.anomalies} (score > {self.threshold:.5f})",
            f"speed       mean {self.fps:.1f} FPS; latency {lat}",
        ]
        if self.dropped or self.reconnects:
            out.append(f"live        {self.dropped} stale frames dropped, {self.reconnects} reconnects")
        if self.written:
            out.append(f"written     {', '.join(self.written)}")
        return out


class RunAborted(ProtoADError):
    """The run failed (usually its source) after some frames were judged; ``summary`` covers those."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


def run(source: str | SourceSpec | Source, backend: Backend, options: RunOptions | None = None) -> RunSummary:
    """Judge every frame of ``source`` (a SOURCE string, a parsed one, or an opened Source) with ``backend``.

    Outputs are finalised however the run ends (Ctrl-C included) once a frame was processed. A source
    error before the first frame raises ProtoADError; after it, RunAborted carrying the summary.
    """
    options = options or RunOptions()
    info = backend.info
    threshold = info.image_threshold if options.threshold is None else float(options.threshold)
    if not math.isfinite(threshold):
        raise ProtoADError(f"model {info.category!r} has no image threshold: pass --threshold")
    # As at build time, the outline threshold never exceeds the verdict threshold.
    pixel_threshold = min(info.pixel_threshold, threshold) if math.isfinite(info.pixel_threshold) else threshold
    pre = info.preprocess

    src = source if isinstance(source, Source) else open_source(source)
    capture = Capture(src, options.queue_size, options.backoff, log=options.log)
    summary = RunSummary(source=src.name, model=info.category, threshold=threshold)
    outputs: list[JsonlLog | VideoOutput] = []
    jsonl: JsonlLog | None = None
    video: VideoOutput | None = None
    masks: MaskFolder | None = None
    window: Window | None = None
    try:
        if options.jsonl is not None:
            jsonl = JsonlLog(options.jsonl)
            outputs.append(jsonl)
        if options.save is not None:
            fallback = LIVE_VIDEO_FPS if src.live else FILE_VIDEO_FPS
            video = VideoOutput(options.save, src.fps if 0 < src.fps <= MAX_VIDEO_FPS else fallback)
            outputs.append(video)
        if options.save_masks is not None:
            masks = MaskFolder(options.save_masks)
        if options.show:
            window = Window.open(f"protoad-run: {info.category}", options.log)
        # Warm-up: lazy allocations and engine builds happen here, not in the first frame's latency.
        backend.infer(to_batch(np.zeros((info.crop, info.crop, 3), np.uint8)))
        capture.start()
        started = last = time.perf_counter()
        first_capture: float | None = None
        fps = 0.0
        summary.stopped = "max frames"
        while options.max_frames is None or summary.frames < options.max_frames:
            frame = capture.get()
            if frame is None:
                summary.stopped = "end of source"
                break
            if first_capture is None:
                first_capture = frame.timestamp
            t0 = time.perf_counter()
            crop = pre(frame.rgb)
            maps, scores = backend.infer(to_batch(crop))
            t1 = time.perf_counter()
            score = float(scores[0])
            result = FrameResult(frame.index, frame.timestamp, frame.label, score, score > threshold,
                                 (t1 - t0) * 1000.0, crop, maps[0])
            summary.frames += 1
            summary.anomalies += result.anomalous
            summary.latencies_ms.append(result.latency_ms)
            summary.seconds = t1 - started
            rate = 1.0 / max(t1 - last, 1e-9)
            fps = rate if fps == 0.0 else (1 - FPS_SMOOTHING) * fps + FPS_SMOOTHING * rate
            last = t1
            if jsonl is not None:
                jsonl.write(result.record())
            if masks is not None and result.anomalous:
                masks.write(result.index, result.label, src.name, defect_mask(result.anomaly_map, pixel_threshold))
            if video is not None or window is not None:
                view = render(crop, result.anomaly_map, score=score, anomalous=result.anomalous,
                              threshold=threshold, pixel_threshold=pixel_threshold, fps=fps)
                if video is not None:
                    video.write(view, until=frame.timestamp - first_capture if src.live else None)
                if window is not None and not window.show(view):
                    summary.stopped = "window closed"
                    break
            if options.on_frame is not None:
                options.on_frame(result)
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
    except ProtoADError as exc:
        if summary.frames == 0:
            raise
        summary.stopped = "failed"
        raise RunAborted(str(exc), summary) from None
    finally:
        capture.stop()
        summary.dropped, summary.reconnects = capture.dropped, capture.reconnects
        if window is not None:
            window.close()
        keep = summary.frames > 0
        for output in outputs:
            path = output.close(keep)
            if path is not None:
                summary.written.append(str(path))
        if masks is not None and masks.written:
            summary.written.append(f"{masks.written} masks in {masks.folder}")
    return summary
