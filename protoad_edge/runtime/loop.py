"""The inspection loop: frames in, verdicts out, every result handed to the sinks.

Per frame: the model's own preprocessing (``ModelInfo.preprocess``, the function the build stage
used, so scores match), one inference, the verdict (``decision.is_anomalous``), then every sink
the caller asked for. ``protoad-run`` is a thin wrapper around ``run``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..decision import capped_pixel_threshold, defect_regions, is_anomalous
from ..errors import ProtoADError
from ..metadata import ModelInfo
from ..preprocess import Geometry, Preprocess, to_batch
from .backend import Backend
from .capture import Capture, Frame, Reconnect
from .overlay import render
from .result import FrameResult, Region, RunContext
from .sinks import JsonlSink, MaskSink, Sink, VideoSink, WindowSink
from .sources import Source, SourceSpec, open_source

# Overlay video frame rate when the source reports none or an implausible one (streams often say
# 90000): slow enough to look at image by image for files, a usual camera rate for live sources.
FILE_VIDEO_FPS, LIVE_VIDEO_FPS, MAX_VIDEO_FPS = 5.0, 25.0, 120.0
FPS_SMOOTHING = 0.1  # weight of the newest frame in the displayed FPS
MAX_REGIONS = 10  # defect regions per record, largest first
STATUS_EVERY_S = 5.0  # a status line this often (0: none)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StopRequest(threading.Event):
    """Asks a run to end at the next frame boundary, so every output holds whole frames.

    ``protoad-run``'s SIGINT and SIGTERM handlers set it instead of raising where the signal happens
    to land (between a frame's JSON line and its mask, say). ``reason`` becomes the summary's ending.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.set()


@dataclass
class RunOptions:
    threshold: float | None = None  # image threshold; None: the model's own
    max_frames: int | None = None
    show: bool = False
    save: str | Path | None = None  # overlay video (.mp4 or .avi)
    save_masks: str | Path | None = None  # folder for PNG masks of anomalous frames, in frame pixels
    roi: tuple[int, int, int, int] | None = None  # overrides the model's region of interest
    view_width: int | None = None  # overlay width (None: the frame's)
    status_every: float = STATUS_EVERY_S  # seconds between status lines on the log (0: none)
    jsonl: str | Path | None = None  # per-frame log; "-" is stdout
    queue_size: int | None = None  # None: 2 for live sources, 8 for files
    reconnect: Reconnect = Reconnect()  # how a live source that stops delivering is retried
    log: Callable[[str], None] = _stderr  # notices for the user (never the JSON lines)
    on_frame: Callable[[FrameResult], None] | None = None  # e.g. to drive a reject gate
    stop: StopRequest | None = None  # set (by a signal handler) to end the run between two frames
    sinks: list[Sink] = field(default_factory=list)  # the caller's own (e.g. MQTT), after the others; the run closes them


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
    longest_gap: float = 0.0  # seconds without frames, the longest outage survived
    stopped: str = ""  # end of source | max frames | interrupted | terminated | window closed | failed
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
            gap = f" (longest gap {self.longest_gap:.1f} s)" if self.reconnects else ""
            out.append(f"live        {self.dropped:,} stale frames dropped, {self.reconnects} reconnects{gap}")
        if self.written:
            out.append(f"written     {', '.join(self.written)}")
        return out


class RunAborted(ProtoADError):
    """The run failed (usually its source) after some frames were judged; ``summary`` covers those."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


def thresholds_in_force(info: ModelInfo, override: float | None) -> tuple[float, float]:
    """(image, pixel) thresholds of a run: ``--threshold`` or the model's, and the capped pixel one."""
    threshold = info.image_threshold if override is None else float(override)
    if not math.isfinite(threshold):
        raise ProtoADError(f"model {info.category!r} has no image threshold: pass --threshold")
    return threshold, capped_pixel_threshold(info.pixel_threshold, threshold)


def open_sinks(options: RunOptions, src: Source, title: str, pixel_threshold: float) -> list[Sink]:
    """The sinks ``options`` ask for, in a fixed order (masks first, so the records can name the mask
    file), then the caller's own. On failure every one of them is closed, the caller's too."""
    sinks: list[Sink] = []
    try:
        if options.save_masks is not None:
            sinks.append(MaskSink(options.save_masks, src.name, pixel_threshold))
        if options.jsonl is not None:
            sinks.append(JsonlSink(options.jsonl))
        if options.save is not None:
            fallback = LIVE_VIDEO_FPS if src.live else FILE_VIDEO_FPS
            sinks.append(VideoSink(options.save, src.fps if 0 < src.fps <= MAX_VIDEO_FPS else fallback, src.live))
        window = WindowSink.open(title, options.log) if options.show else None
        if window is not None:
            sinks.append(window)
    except BaseException:
        close_sinks(sinks + list(options.sinks), keep=False)
        raise
    return sinks + list(options.sinks)


def close_sinks(sinks: list[Sink], keep: bool) -> list[str]:
    return [written for sink in sinks if (written := sink.close(keep)) is not None]


class Judge:
    """One frame in, one FrameResult out: preprocessing, inference, verdict, regions in frame pixels."""

    def __init__(self, backend: Backend, pre: Preprocess, context: RunContext, pixel_threshold: float,
                 source_name: str) -> None:
        self.backend, self.pre, self.context = backend, pre, context
        self.pixel_threshold = pixel_threshold
        self.source_name = source_name
        self.geometries: dict[tuple[int, int], Geometry] = {}

    def geometry(self, width: int, height: int) -> Geometry:
        if (width, height) not in self.geometries:
            try:
                self.geometries[width, height] = self.pre.geometry(width, height)
            except ProtoADError as exc:
                raise ProtoADError(f"{self.source_name}: {exc}") from None
        return self.geometries[width, height]

    def __call__(self, frame: Frame) -> FrameResult:
        geometry = self.geometry(frame.rgb.shape[1], frame.rgb.shape[0])
        t0 = time.perf_counter()
        crop = self.pre(frame.rgb)
        maps, scores = self.backend.infer(to_batch(crop))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        score = float(scores[0])
        anomalous = bool(is_anomalous(score, self.context.threshold))
        regions = [Region(geometry.box_to_frame(*box), round(count * geometry.scale[0] * geometry.scale[1]), peak)
                   for box, count, peak in defect_regions(maps[0], self.pixel_threshold, MAX_REGIONS)] if anomalous else []
        return FrameResult(frame.index, frame.timestamp, frame.label, score, anomalous, latency_ms, frame.rgb, crop,
                           maps[0], geometry, self.context, regions, frame.pos_ms)


def status_line(summary: RunSummary, capture: Capture) -> str:
    """The periodic sign of life of a headless run (stderr, so stdout keeps only data)."""
    return (f"status: {summary.frames:,} frames in {summary.seconds:,.0f} s ({summary.fps:.1f} FPS), "
            f"{summary.anomalies:,} anomalies, {capture.dropped:,} dropped, {capture.reconnects:,} reconnects")


def run(source: str | SourceSpec | Source, backend: Backend, options: RunOptions | None = None) -> RunSummary:
    """Judge every frame of ``source`` (a SOURCE string, a parsed one, or an opened Source) with ``backend``.

    Outputs are finalised however the run ends (a stop request, Ctrl-C) once a frame was processed.
    A source error before the first frame raises ProtoADError; after it, RunAborted carrying the summary.
    """
    options = options or RunOptions()
    info = backend.info
    threshold, pixel_threshold = thresholds_in_force(info, options.threshold)
    pre = info.preprocess if options.roi is None else dataclasses.replace(info.preprocess, roi=tuple(options.roi))
    rule = info.threshold_rule if options.threshold is None else "--threshold"
    context = RunContext(backend.describe().model, info.category, threshold, rule)

    src = source if isinstance(source, Source) else open_source(source)
    capture = Capture(src, options.queue_size, options.reconnect, log=options.log)
    summary = RunSummary(source=src.name, model=info.category, threshold=threshold)
    sinks: list[Sink] = []
    try:
        sinks = open_sinks(options, src, f"protoad-run: {info.category}", pixel_threshold)
        render_view = any(sink.needs_view for sink in sinks)
        # Warm-up: lazy allocations and engine builds happen here, not in the first frame's latency.
        backend.infer(to_batch(np.zeros((info.crop, info.crop, 3), np.uint8)))
        capture.start()
        judge = Judge(backend, pre, context, pixel_threshold, src.name)
        started = last = last_status = time.perf_counter()
        fps = 0.0
        summary.stopped = "max frames"
        stop = options.stop
        while options.max_frames is None or summary.frames < options.max_frames:
            frame = None if stop is not None and stop.is_set() else capture.get(stop)
            if frame is None:
                summary.stopped = stop.reason if stop is not None and stop.is_set() else "end of source"
                break
            result = judge(frame)
            now = time.perf_counter()
            summary.frames += 1
            summary.anomalies += result.anomalous
            summary.latencies_ms.append(result.latency_ms)
            summary.seconds = now - started
            rate = 1.0 / max(now - last, 1e-9)
            fps = rate if fps == 0.0 else (1 - FPS_SMOOTHING) * fps + FPS_SMOOTHING * rate
            last = now
            if options.status_every and now - last_status >= options.status_every:
                options.log(status_line(summary, capture))
                last_status = now
            view = render(frame.rgb, result.anomaly_map, result.geometry, score=result.score, anomalous=result.anomalous,
                          threshold=threshold, pixel_threshold=pixel_threshold, fps=fps,
                          view_width=options.view_width) if render_view else None
            if not all([sink.write(result, view) for sink in sinks]):
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
        summary.dropped, summary.reconnects, summary.longest_gap = capture.dropped, capture.reconnects, capture.longest_gap
        summary.written = close_sinks(sinks, keep=summary.frames > 0)
    return summary
