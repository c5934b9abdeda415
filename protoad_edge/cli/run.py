"""``protoad-run``: inspect a camera, stream, video, image or folder of images with an exported model."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import click
import cv2

from ..atomic import write_atomic
from ..bundle import locate
from ..errors import ProtoADError
from ..preprocess import Preprocess, parse_roi
from ..runtime import reload
from ..runtime.backends.base import Backend, BackendOptions
from ..runtime.backends.registry import HELP, SPECS
from ..runtime.loop import STATUS_EVERY_S, RunOptions, RunSummary, StopRequest, run_many
from ..runtime.outputs.mqtt import EXIT_UNDELIVERED, PASSWORD_ENV, BrokerAccess, MqttSink, parse_mqtt_url
from ..runtime.outputs.spool import default_folder
from ..runtime.serving.triton import parse_server_url
from ..runtime.sources.capture import Reconnect
from .common import EXIT_INTERRUPTED, EXIT_TERMINATED, cpu_threads, threads_option, user_errors
from .station_options import LineServices, station_config, station_options

ENDINGS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
EXIT_CODES = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (systemd, docker stop) ask the run to stop at the next frame boundary,
    so every output holds whole frames; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(ENDINGS[signal.Signals(signum)])

    previous = {signum: signal.signal(signum, handler) for signum in ENDINGS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def save_preview(
    spec: object,
    model: Path | None,
    roi: tuple[int, int, int, int] | None,
    path: Path,
    served: Preprocess | None = None,
) -> Path:
    """The first frame of ``spec`` with the region drawn on it (the model's preprocessing where there is a model:
    ``served``, a --server's, else the bundle's)."""
    from ..runtime.outputs.overlay import preview
    from ..runtime.sources.source import open_source

    try:
        pre = served or locate(model)[0].info().preprocess
    except ProtoADError:
        if model is not None:
            raise
        pre = Preprocess()  # no model yet: the default input, to choose the region before the build
    if roi is not None:
        pre = dataclasses.replace(pre, roi=roi)
    source = open_source(spec)
    try:
        got = source.read()
    finally:
        source.close()
    if got is None:
        raise ProtoADError(f"no frame could be read from {source.name}")
    rgb = got[0]
    try:
        geometry = pre.geometry(rgb.shape[1], rgb.shape[0])
    except ProtoADError as exc:
        raise ProtoADError(f"{source.name}: {exc}") from None
    ok, png = cv2.imencode(".png", preview(rgb, geometry))
    if not ok:
        raise ProtoADError(f"cannot encode {path}")
    return write_atomic(path, lambda f: f.write(png.tobytes()))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("sources", metavar="SOURCE...", nargs=-1)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Any file of a model bundle (NAME.onnx, .plan or .json). Default: the single bundle in ./models.",
)
@click.option("--backend", type=click.Choice(SPECS), default="auto", show_default=True, help=HELP)
@threads_option("the local backend (onnxruntime intra-op, OpenVINO, torch)")
@click.option(
    "--server",
    default=None,
    metavar="grpc://HOST[:PORT]/NAME",
    help="Send the frames to model NAME on a Triton server (protoad-serve, or tritonserver on a "
    "protoad-export --triton-repo repository) instead of a local --model; preprocessing and thresholds "
    "come from the server. While the server is unreachable, restarting or still loading the model (also "
    "at start-up) each request is sent again (0.5 s pauses doubling to 2 s) for up to "
    "--reconnect-timeout; a request the server refuses fails at once. Needs pip install "
    "'protoad-edge[triton]'.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Image score above which a frame is anomalous. Default: the model's own.",
)
@click.option("--show", is_flag=True, help="Live window with the overlay (q or Esc quits).")
@click.option(
    "--save",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the overlay video to FILE (.mp4 or .avi); with several sources FILE.N.mp4 for the N-th.",
)
@click.option(
    "--save-masks",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Write a PNG defect mask (255 = defect) of every anomalous frame into DIR, at the frame's resolution "
    "(frame pixels, like the records' regions); the record names the file. With several sources, "
    "DIR/N for the N-th.",
)
@click.option(
    "--jsonl",
    type=str,
    default=None,
    metavar="FILE",
    help="One JSON record per frame (README: 'JSON records': score, verdict, threshold, defect regions in "
    "frame pixels, ...); - for stdout.",
)
@click.option(
    "--max-frames", type=click.IntRange(min=1), default=None, metavar="N", help="Stop after N frames (of each source)."
)
@click.option(
    "--roi",
    default=None,
    metavar="X,Y,W,H",
    help="Region of interest in frame pixels, instead of the model's (a camera mounted differently).",
)
@click.option(
    "--view-width",
    type=click.IntRange(min=64),
    default=None,
    metavar="PX",
    help="Width of the overlay (--show, --save); default: the frame's own size.",
)
@click.option(
    "--status-every",
    type=click.FloatRange(min=0.0),
    default=STATUS_EVERY_S,
    show_default=True,
    metavar="SECONDS",
    help="A status line on stderr this often (frames, FPS, anomalies, drops, reconnects); 0: none.",
)
@click.option(
    "--preview",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE.png",
    help="Only save the first frame of SOURCE with the region of interest and the judged area drawn on it, "
    "to choose --roi (also before a model exists), then stop.",
)
@click.option(
    "--reconnect-timeout",
    type=click.FloatRange(min=0.0),
    default=Reconnect().give_up_after,
    show_default=True,
    metavar="SECONDS",
    help="A camera or stream that stops delivering is reopened after growing pauses (0.5 s, doubling to "
    "2 s), and so is a --server that stops answering; after this long without a frame (an answer) the "
    "run ends with an error, every output finalised.",
)
@click.option(
    "--mqtt",
    default=None,
    metavar="mqtt[s]://HOST[:PORT]/TOPIC",
    help="Publish each frame's JSON record (QoS 1, at least once) to this broker topic (mqtts://: TLS, "
    "port 8883). An outage never stalls inspection: records queue (--mqtt-buffer), the client "
    "reconnects with backoff; what is unacknowledged at the end is spooled (--mqtt-spool) and the "
    "exit status is 75. The summary counts what was delivered, queued, spooled and dropped. Needs "
    "pip install 'protoad-edge[mqtt]'.",
)
@click.option("--mqtt-anomalies-only", is_flag=True, help="Publish only the records of anomalous frames.")
@click.option(
    "--mqtt-buffer",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    metavar="N",
    help="Records kept for the broker while it is unreachable; beyond that the oldest are dropped.",
)
@click.option(
    "--mqtt-drain-timeout",
    type=click.FloatRange(min=0.0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="At the end, wait this long for the broker to acknowledge every record "
    "before spooling the rest (and, with --mqtt-flush, for the spool).",
)
@click.option(
    "--mqtt-spool",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Folder of the spool of unacknowledged records, one file per broker and topic, sent first by the "
    "next run (at most --mqtt-buffer records and 64 MiB; beyond that the oldest are dropped). "
    "Default: $XDG_STATE_HOME/protoad-edge/mqtt-spool (~/.local/state/...).",
)
@click.option(
    "--mqtt-flush",
    is_flag=True,
    help="Send the spool of --mqtt URL and exit (no SOURCE): 0 once the broker acknowledged all, else 75.",
)
@click.option(
    "--mqtt-user",
    default=None,
    metavar="USER",
    help=f"Broker user name; the password comes from ${PASSWORD_ENV} or --mqtt-password-file, never the "
    f"command line (ps shows it).",
)
@click.option(
    "--mqtt-password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help=f"The broker password: the first line of FILE (instead of ${PASSWORD_ENV}).",
)
@click.option(
    "--mqtt-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="mqtts://: the CA certificate(s) (PEM) the broker's certificate must chain to. Default: the system's CAs.",
)
@click.option(
    "--mqtt-cert",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="mqtts://: a client certificate (PEM) for a broker that requires one (with its key, or --mqtt-key).",
)
@click.option(
    "--mqtt-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="mqtts://: the private key of --mqtt-cert.",
)
@click.option(
    "--mqtt-insecure",
    is_flag=True,
    help="mqtts:// without checking the broker's certificate (anyone on the path can read and change "
    "verdicts): for a first test only.",
)
@click.option(
    "--reload-every",
    type=click.FloatRange(min=0.0),
    default=reload.CHECK_EVERY_S,
    show_default=True,
    metavar="SECONDS",
    help="Look this often whether the bundle changed on disk (protoad-teach, its --rollback, protoad-eval "
    "--set-threshold), or with --server whether the served model did (a server restarted on a new "
    "version), and switch to the new version between two frames, without dropping or repeating one; a "
    "version that cannot be opened is refused with one line. 0: never.",
)
@station_options
@user_errors
def main(
    sources: tuple[str, ...],
    model: Path | None,
    backend: str,
    threads: int,
    server: str | None,
    threshold: float | None,
    show: bool,
    save: Path | None,
    save_masks: Path | None,
    jsonl: str | None,
    max_frames: int | None,
    roi: str | None,
    view_width: int | None,
    status_every: float,
    preview: Path | None,
    reconnect_timeout: float,
    mqtt: str | None,
    mqtt_anomalies_only: bool,
    mqtt_buffer: int,
    mqtt_drain_timeout: float,
    mqtt_spool: Path | None,
    mqtt_flush: bool,
    mqtt_user: str | None,
    mqtt_password_file: Path | None,
    mqtt_ca: Path | None,
    mqtt_cert: Path | None,
    mqtt_key: Path | None,
    mqtt_insecure: bool,
    reload_every: float,
    **station_flags: Any,
) -> None:
    """Judge every frame of SOURCE: camera0 (or 0), csi0 (Jetson CSI camera), a video file, an image
    file, a folder of images, an rtsp:// or http(s):// stream, or a GStreamer pipeline (with '!').

    Several SOURCEs (the cameras of one station) run together: one capture thread each, their waiting
    frames judged in one batch, every record naming its source; --save and --save-masks write one file or
    folder per source, numbered in the order given (line.mp4 -> line.0.mp4, line.1.mp4; defects/ ->
    defects/0/, defects/1/). A source that ends or fails does not stop the others.

    The overlay shows the whole frame: the judged area outlined, the rest dimmed, heat where a defect is.
    Ctrl-C (or SIGTERM) stops cleanly after the frame in hand: every output is finalised, the summary
    printed, and the exit status is 130 (143 for SIGTERM). A second Ctrl-C stops at once.
    """
    from ..runtime.sources.source import parse_source

    # Human-readable text goes to stderr when stdout carries the JSON lines.
    to_stderr = jsonl == "-"

    def log(message: str) -> None:
        click.echo(message, err=True)

    access = BrokerAccess.from_options(mqtt_user, mqtt_password_file, mqtt_ca, mqtt_cert, mqtt_key, mqtt_insecure)
    if mqtt is not None:
        access.tls_context(parse_mqtt_url(mqtt))  # a mistyped broker URL or TLS file fails before a model is loaded

    def mqtt_sink(url: str) -> MqttSink:
        return MqttSink(
            url,
            mqtt_anomalies_only,
            mqtt_buffer,
            log=log,
            drain_timeout=mqtt_drain_timeout,
            access=access,
            spool=mqtt_spool or default_folder(),
        )

    if mqtt_flush:
        if mqtt is None or sources:
            raise ProtoADError("--mqtt-flush sends the spool of --mqtt URL and exits: give --mqtt and no SOURCE")
        flushed = mqtt_sink(mqtt)
        click.echo(flushed.close(keep=True))
        if report_undelivered([flushed], log):
            sys.exit(EXIT_UNDELIVERED)
        return
    if not sources:
        raise click.UsageError("Missing argument 'SOURCE...'.")
    specs = [parse_source(source) for source in sources]  # a mistyped source fails before a model is loaded
    region = parse_roi(roi) if roi else None
    health_window = station_flags.pop("health_window")
    station_setup = station_config(**station_flags)
    reconnect = Reconnect(give_up_after=reconnect_timeout)
    if server is not None:
        parse_server_url(server)
        if model is not None or backend != "auto" or threads:
            raise ProtoADError(
                "--server judges with the server's model and threads (protoad-serve --threads): "
                "drop --model, --backend and --threads"
            )
    if preview is not None:
        if len(specs) > 1:
            raise ProtoADError("--preview draws one source's frame: give one SOURCE")
        served = None
        if server is not None:
            with open_model(None, backend, threads, server, reconnect, log) as remote:
                served = remote.info.preprocess
        click.echo(f"wrote {save_preview(specs[0], model, region, preview, served)}")
        return
    stop = StopRequest()
    with stop_on_signals(stop), open_model(model, backend, threads, server, reconnect, log) as opened:
        facts, info = opened.describe(), opened.info
        log(f"model {facts.model} ({info.category}, version {info.version}, crop {info.crop}), backend {facts.line()}")
        if threshold is None:
            log(f"threshold {info.image_threshold:.6g} (the model's; rule: {info.threshold_rule or 'not recorded'})")
        else:
            log(f"threshold {threshold:.6g} (--threshold; the model's is {info.image_threshold:.6g})")
        # before the broker's sink: a busy port fails first
        bundle = locate(model)[0] if server is None else None  # what the station's Apply and Teach change
        services = LineServices(
            station_setup, health_window, opened, bundle, [spec.name for spec in specs], threshold, log
        )
        watch = None
        try:
            sinks = [mqtt_sink(mqtt)] if mqtt is not None else []
            if reload_every > 0:
                watch = (
                    reload.served(opened, reload_every, log)
                    if server is not None  # type: ignore[arg-type]
                    else reload.local(opened, BackendOptions(threads=cpu_threads(threads)), reload_every, log)
                )
            options = RunOptions(
                threshold=threshold,
                max_frames=max_frames,
                show=show,
                save=save,
                save_masks=save_masks,
                jsonl=jsonl,
                roi=region,
                view_width=view_width,
                status_every=status_every,
                log=log,
                stop=stop,
                sinks=sinks,
                reconnect=reconnect,
                watch=watch,
                lane_sinks=services.lane_sinks,
            )
            services.start(sinks[0] if sinks else None, mqtt, access)
            summaries = run_many(specs, opened, options)
        finally:
            if watch is not None:
                watch.close()
            station_lines = services.close()
    for summary in summaries:
        for line in summary.lines():
            click.echo(line, err=to_stderr)
    if len(summaries) > 1:
        click.echo(total_line(summaries), err=to_stderr)
    for line in station_lines + [
        f"latency     capture -> mqtt publish: {figures.line()}"
        for sink in sinks
        if (figures := sink.latency.figures()) is not None
    ]:
        click.echo(line, err=to_stderr)
    undelivered = report_undelivered(sinks, log)
    errors = [f"{s.source}: {s.error}" if len(summaries) > 1 else s.error for s in summaries if s.error]
    if errors:
        raise ProtoADError(
            errors[0] + (f" ({len(errors) - 1} more sources failed, see above)" if len(errors) > 1 else "")
        )
    endings = [s.stopped for s in summaries if s.stopped in EXIT_CODES]
    if endings:
        sys.exit(EXIT_CODES[endings[0]])
    if undelivered:
        sys.exit(EXIT_UNDELIVERED)


def report_undelivered(sinks: list[MqttSink], log: Callable[[str], None]) -> bool:
    """After the sinks closed: one line for each that did not get every record to its broker; whether any did not."""
    shortfalls = [line for sink in sinks if (line := sink.shortfall())]
    for line in shortfalls:
        log(line)
    return bool(shortfalls)


def open_model(
    model: Path | None, backend: str, threads: int, server: str | None, reconnect: Reconnect, log: Callable[[str], None]
) -> Backend:
    """The local backend of --model on --threads CPU threads, or the Triton server of --server (retrying as a
    source reconnects)."""
    if server is None:
        from ..runtime.backends.registry import open_backend

        return open_backend(model, backend, options=BackendOptions(threads=cpu_threads(threads)))
    from ..runtime.serving.triton import TritonBackend

    return TritonBackend(server, retry=reconnect, log=log)


def total_line(summaries: list[RunSummary]) -> str:
    """All sources together: frames, anomalies and the run's throughput."""
    frames = sum(s.frames for s in summaries)
    seconds = max(s.seconds for s in summaries)
    return (
        f"total       {frames:,} frames from {len(summaries)} sources, {sum(s.anomalies for s in summaries):,} "
        f"anomalies, {frames / seconds if seconds else 0.0:.1f} FPS in all"
    )
