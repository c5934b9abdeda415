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
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..decision import capped_pixel_threshold, defect_regions, is_anomalous
from ..errors import ProtoADError
from ..metadata import OVERRIDE, ModelInfo, rule_name
from ..preprocess import Geometry, Preprocess, to_batch
from .backends.base import Backend
from .outputs.overlay import render
from .outputs.sinks import JsonlSink, MaskSink, Sink, VideoSink, WindowSink
from .result import FrameResult, Region, RunContext
from .sources.capture import STOP_POLL_S, Capture, Frame, Reconnect
from .sources.source import Source, SourceSpec, open_source

if TYPE_CHECKING:
    from .reload import ModelWatch

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
    sinks: list[Sink] = field(
        default_factory=list
    )  # the caller's own (e.g. MQTT), after the others; the run closes them
    watch: ModelWatch | None = None  # hands over a new version of the bundle, taken between two batches
    # the caller's own sinks of the i-th source (e.g. the station's), after its others; the run closes them
    lane_sinks: Callable[[int, Source], list[Sink]] | None = None


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
    error: str = ""  # why the source failed, if it did
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


def open_sinks(options: RunOptions, src: Source, title: str) -> list[Sink]:
    """The sinks ``options`` ask for, then the caller's own. On failure every one of them is closed, the
    caller's too."""
    sinks: list[Sink] = []
    try:
        if options.save_masks is not None:
            sinks.append(MaskSink(options.save_masks, src.name))
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
    """Frames in, FrameResults out: preprocessing, one batched inference, verdicts, regions in frame pixels."""

    def __init__(self, backend: Backend, pre: Preprocess, context: RunContext) -> None:
        self.backend, self.pre, self.context = backend, pre, context
        self.geometries: dict[tuple[int, int], Geometry] = {}

    @classmethod
    def of(cls, backend: Backend, options: RunOptions) -> Judge:
        """The judge of ``backend``'s model with the run's ``--threshold`` and ``--roi``, if given."""
        info = backend.info
        threshold, pixel_threshold = thresholds_in_force(info, options.threshold)
        pre = info.preprocess if options.roi is None else dataclasses.replace(info.preprocess, roi=tuple(options.roi))
        rule = rule_name(info.threshold_rule) if options.threshold is None else OVERRIDE
        return cls(
            backend,
            pre,
            RunContext(backend.describe().model, info.category, threshold, rule, pixel_threshold, info.version),
        )

    def geometry(self, width: int, height: int, source_name: str) -> Geometry:
        if (width, height) not in self.geometries:
            try:
                self.geometries[width, height] = self.pre.geometry(width, height)
            except ProtoADError as exc:
                raise ProtoADError(f"{source_name}: {exc}") from None
        return self.geometries[width, height]

    def __call__(self, frames: list[tuple[Frame, str]]) -> list[FrameResult]:
        """``frames``: (frame, source name) pairs, judged in one backend call."""
        geometries = [self.geometry(f.rgb.shape[1], f.rgb.shape[0], name) for f, name in frames]
        t0 = time.perf_counter()
        crops = [self.pre(f.rgb) for f, _ in frames]
        maps, scores = self.backend.infer(to_batch(crops))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if len(maps) != len(frames) or len(scores) != len(frames):  # a frame must never go unjudged in silence
            raise RuntimeError(f"{self.context.model}: {len(scores)} scores for a batch of {len(frames)} frames")
        results = []
        for (frame, _), crop, amap, score, geometry in zip(frames, crops, maps, scores, geometries):
            anomalous = bool(is_anomalous(float(score), self.context.threshold))
            regions = (
                [
                    Region(geometry.box_to_frame(*box), round(count * geometry.scale[0] * geometry.scale[1]), peak)
                    for box, count, peak in defect_regions(amap, self.context.pixel_threshold, MAX_REGIONS)
                ]
                if anomalous
                else []
            )
            results.append(
                FrameResult(
                    frame.index,
                    frame.timestamp,
                    frame.label,
                    float(score),
                    anomalous,
                    latency_ms,
                    frame.rgb,
                    crop,
                    amap,
                    geometry,
                    self.context,
                    regions,
                    frame.pos_ms,
                )
            )
        return results


def status_line(lanes: list[Lane]) -> str:
    """The periodic sign of life of a headless run (stderr, so stdout keeps only data)."""

    def one(lane: Lane) -> str:
        summary, capture = lane.summary, lane.capture
        notes = "".join(f", {note}" for sink in lane.sinks if (note := sink.status()))
        return (
            f"{summary.frames:,} frames in {summary.seconds:,.0f} s ({summary.fps:.1f} FPS), "
            f"{summary.anomalies:,} anomalies, {capture.dropped:,} dropped, {capture.reconnects:,} reconnects" + notes
        )

    if len(lanes) == 1:
        return "status: " + one(lanes[0])
    total = sum(lane.summary.frames for lane in lanes)
    seconds = max(lane.summary.seconds for lane in lanes)
    parts = [f"{lane.summary.source}: " + one(lane) for lane in lanes]
    return f"status: {total:,} frames ({total / seconds if seconds else 0.0:.1f} FPS in all); " + "; ".join(parts)


@dataclass
class Lane:
    """One source of a run: its capture, its own outputs and its summary."""

    source: Source
    capture: Capture
    sinks: list[Sink]
    summary: RunSummary
    writes: list[Sink] = field(default_factory=list)  # its sinks and the shared ones, in the order a frame goes to them
    fps: float = 0.0
    last: float = 0.0
    error: str = ""

    @property
    def active(self) -> bool:
        return not self.summary.stopped

    @property
    def needs_view(self) -> bool:
        """Whether any of its sinks shows the overlay (rendering it costs milliseconds a frame)."""
        return any(sink.needs_view for sink in self.writes)


def per_source(path: str | Path | None, index: int, count: int) -> str | Path | None:
    """``line3.mp4`` -> ``line3.0.mp4`` and ``defects/`` -> ``defects/0``: one output per source when several."""
    if path is None or count == 1:
        return path
    path = Path(path)
    return path.with_name(f"{path.stem}.{index}{path.suffix}") if path.suffix else path / str(index)


def run(source: str | SourceSpec | Source, backend: Backend, options: RunOptions | None = None) -> RunSummary:
    """Judge every frame of ``source`` (a SOURCE string, a parsed one, or an opened Source) with ``backend``.

    Outputs are finalised however the run ends (a stop request, Ctrl-C) once a frame was processed.
    A source error before the first frame raises ProtoADError; after it, RunAborted carrying the summary.
    """
    summary = run_many([source], backend, options)[0]
    if summary.error:
        raise RunAborted(summary.error, summary)
    return summary


def run_many(
    sources: list[str | SourceSpec | Source], backend: Backend, options: RunOptions | None = None
) -> list[RunSummary]:
    """Judge the frames of several sources with one backend: one capture thread per source, the frames
    waiting across sources judged in one backend call (up to ``backend.max_batch``), every result routed to
    its source's outputs (``per_source`` names them) and to the shared JSON log and caller's sinks.

    A source that ends or fails does not stop the others (its summary says so; ``error`` holds the
    failure); the run ends when every source has ended or reached ``max_frames``. A source that cannot be
    opened, or fails before any frame was judged, raises ProtoADError before the run starts.
    """
    options = options or RunOptions()
    info = backend.info
    judge = Judge.of(backend, options)
    threshold = judge.context.threshold
    arrived = threading.Event()
    opened = [s if isinstance(s, Source) else open_source(s) for s in sources]
    count = len(opened)
    lanes = [
        Lane(
            src,
            Capture(src, options.queue_size, options.reconnect, log=options.log, arrived=arrived),
            [],
            RunSummary(source=src.name, model=info.category, threshold=threshold),
        )
        for src in opened
    ]
    shared: list[Sink] = []
    try:
        shared = open_sinks(
            RunOptions(jsonl=options.jsonl, sinks=options.sinks, log=options.log),
            opened[0],
            f"protoad-run: {info.category}",
        )
        for i, lane in enumerate(lanes):
            lane_options = dataclasses.replace(
                options,
                jsonl=None,
                save=per_source(options.save, i, count),
                sinks=options.lane_sinks(i, lane.source) if options.lane_sinks else [],
                save_masks=per_source(options.save_masks, i, count),
            )
            title = f"protoad-run: {info.category}" + (f" ({lane.source.name})" if count > 1 else "")
            lane.sinks = open_sinks(lane_options, lane.source, title)
        for lane in lanes:  # the order a frame's sinks are written in: masks before the records that name them
            lane.writes = sorted(lane.sinks + shared, key=lambda sink: not sink.names_files)
        # Warm-up: lazy allocations and engine builds happen here, not in the first frame's latency.
        backend.infer(to_batch(np.zeros((info.crop, info.crop, 3), np.uint8)))
        for lane in lanes:
            lane.capture.start()
        _judge_until_done(lanes, judge, options)
    except KeyboardInterrupt:
        for lane in lanes:
            lane.summary.stopped = lane.summary.stopped or "interrupted"
    except ProtoADError as exc:  # an output failed: every source ends with it
        if not any(lane.summary.frames for lane in lanes):
            raise
        for lane in lanes:
            if lane.active:
                _end(lane, "failed", str(exc))
    finally:
        if judge.backend is not backend:  # a version switched to: the run opened it, the caller has its own
            judge.backend.close()
        for lane in lanes:
            lane.capture.stop()
            s = lane.summary
            s.dropped, s.reconnects, s.longest_gap = (
                lane.capture.dropped,
                lane.capture.reconnects,
                lane.capture.longest_gap,
            )
            s.written = close_sinks(lane.sinks, keep=s.frames > 0)
        written = close_sinks(shared, keep=any(lane.summary.frames for lane in lanes))
        lanes[0].summary.written[:0] = written
    failed = [lane.summary.error for lane in lanes if lane.summary.error]
    if failed and not any(lane.summary.frames for lane in lanes):
        raise ProtoADError(failed[0])  # nothing was judged: a plain error, as before a run starts
    return [lane.summary for lane in lanes]


def _end(lane: Lane, why: str, error: str = "") -> None:
    lane.summary.stopped, lane.summary.error = why, error


def switch(judge: Judge, backend: Backend, options: RunOptions, lanes: list[Lane], given: Backend) -> None:
    """Make ``judge`` judge with a new version of the bundle (``backend``, from ``options.watch``), between two
    batches; one line says what changed. A version this run cannot judge with is refused and closed. The backend
    switched from is closed unless it is ``given`` (the caller's)."""
    old = judge.context
    try:
        new = Judge.of(backend, options)
    except ProtoADError as exc:
        backend.close()
        options.log(
            f"model: version {backend.info.version} refused, still judging with version {old.model_version}: {exc}"
        )
        return
    options.log(
        f"model: version {old.model_version} -> {new.context.model_version} "
        f"({backend.info.num_prototypes:,} prototypes), threshold {old.threshold:.6g} -> "
        f"{new.context.threshold:.6g} ({new.context.threshold_rule or 'rule not recorded'})"
    )
    if judge.backend is not given:
        judge.backend.close()
    judge.backend, judge.pre, judge.context = new.backend, new.pre, new.context
    judge.geometries = {}
    for lane in lanes:
        lane.summary.threshold = new.context.threshold


def _judge_until_done(lanes: list[Lane], judge: Judge, options: RunOptions) -> None:
    """The loop: take the frames waiting across sources (one each, in turns), judge them in one call, hand
    each result to the shared outputs and its source's, until every source has ended; between two batches, a new
    version of the bundle (``options.watch``) takes over."""
    stop, limit, given = options.stop, options.max_frames, judge.backend
    started = last_status = time.perf_counter()
    for lane in lanes:
        lane.last = started
    turn = 0
    while any(lane.active for lane in lanes):
        if stop is not None and stop.is_set():
            for lane in lanes:
                if lane.active:
                    _end(lane, stop.reason)
            return
        if options.watch is not None and (fresh := options.watch.poll()) is not None:
            switch(judge, fresh, options, lanes, given)
        max_batch = judge.backend.max_batch or len(lanes)
        ready: list[tuple[Lane, Frame]] = []
        for lane in lanes[turn:] + lanes[:turn]:
            if not lane.active or len(ready) >= max_batch:
                continue
            try:
                frame = lane.capture.poll()
                if frame is not None:
                    judge.geometry(frame.rgb.shape[1], frame.rgb.shape[0], lane.source.name)  # an ROI that fits
                    ready.append((lane, frame))
                elif lane.capture.ended:
                    _end(lane, "end of source")
            except ProtoADError as exc:
                _end(lane, "failed", str(exc))
        turn = (turn + 1) % len(lanes)
        if not ready:
            lanes[0].capture.arrived.wait(STOP_POLL_S)
            lanes[0].capture.arrived.clear()
            continue
        results = judge([(frame, lane.source.name) for lane, frame in ready])
        now = time.perf_counter()
        for (lane, frame), result in zip(ready, results):
            s = lane.summary
            s.frames += 1
            s.anomalies += result.anomalous
            s.latencies_ms.append(result.latency_ms)
            s.seconds = now - started
            rate = 1.0 / max(now - lane.last, 1e-9)
            lane.fps = rate if lane.fps == 0.0 else (1 - FPS_SMOOTHING) * lane.fps + FPS_SMOOTHING * rate
            lane.last = now
            view = (
                render(
                    frame.rgb,
                    result.anomaly_map,
                    result.geometry,
                    score=result.score,
                    anomalous=result.anomalous,
                    threshold=result.context.threshold,
                    pixel_threshold=result.context.pixel_threshold,
                    fps=lane.fps,
                    view_width=options.view_width,
                )
                if lane.needs_view
                else None
            )
            if not all([sink.write(result, view) for sink in lane.writes]):
                _end(lane, "window closed")
            if options.on_frame is not None:
                options.on_frame(result)
            if lane.active and limit is not None and s.frames >= limit:
                _end(lane, "max frames")
        if options.status_every and now - last_status >= options.status_every:
            options.log(status_line(lanes))
            last_status = now
