"""``protoad-run``: inspect a camera, stream, video, image or folder of images with an exported model."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import click

from ..backends import CHOICES, HELP
from ..runtime.loop import RunAborted, RunOptions, StopRequest, run
from .common import EXIT_INTERRUPTED, EXIT_TERMINATED, user_errors


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Any file of a model bundle (NAME.onnx, .plan or .json). Default: the single bundle in ./models.")
@click.option("--backend", type=click.Choice(CHOICES), default="auto", show_default=True, help=HELP)
@click.option("--threshold", type=float, default=None,
              help="Image score above which a frame is anomalous. Default: the model's own.")
@click.option("--show", is_flag=True, help="Live window with the overlay (q or Esc quits).")
@click.option("--save", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the overlay video to FILE (.mp4 or .avi).")
@click.option("--save-masks", type=click.Path(path_type=Path, file_okay=False), default=None, metavar="DIR",
              help="Write a PNG defect mask of every anomalous frame into DIR (the model's crop, CROPxCROP pixels).")
@click.option("--jsonl", type=str, default=None, metavar="FILE",
              help="One JSON line per frame (frame, timestamp, source, score, verdict, latency_ms); - for stdout.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, metavar="N", help="Stop after N frames.")
@user_errors
def main(source: str, model: Path | None, backend: str, threshold: float | None, show: bool, save: Path | None,
         save_masks: Path | None, jsonl: str | None, max_frames: int | None) -> None:
    """Judge every frame of SOURCE: camera0 (or 0), csi0 (Jetson CSI camera), a video file, an image
    file, a folder of images, an rtsp:// or http(s):// stream, or a GStreamer pipeline (with '!').

    The overlay shows the model's centre crop, i.e. exactly the pixels that were judged.
    Ctrl-C (or SIGTERM) stops cleanly after the frame in hand: every output is finalised, the summary
    printed, and the exit status is 130 (143 for SIGTERM). A second Ctrl-C stops at once.
    """
    from ..backends import open_backend
    from ..runtime.sources import parse_source

    # Human-readable text goes to stderr when stdout carries the JSON lines.
    to_stderr = jsonl == "-"

    def log(message: str) -> None:
        click.echo(message, err=True)

    spec = parse_source(source)  # a mistyped source fails before a model is loaded
    stop = StopRequest()
    with stop_on_signals(stop), open_backend(model, backend) as opened:
        facts = opened.describe()
        log(f"model {facts.model} ({opened.info.category}, crop {opened.info.crop}), backend {facts.line()}")
        options = RunOptions(threshold=threshold, max_frames=max_frames, show=show, save=save,
                             save_masks=save_masks, jsonl=jsonl, log=log, stop=stop)
        try:
            summary = run(spec, opened, options)
        except RunAborted as exc:
            for line in exc.summary.lines():
                click.echo(line, err=to_stderr)
            raise
    for line in summary.lines():
        click.echo(line, err=to_stderr)
    if summary.stopped in EXIT_CODES:
        sys.exit(EXIT_CODES[summary.stopped])
