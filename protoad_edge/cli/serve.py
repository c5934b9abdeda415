"""``protoad-serve``: serve a bundle through Triton Inference Server (PyTriton) to many lines'
``protoad-run --server``."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click

from ..bundle import Bundle
from ..runtime.backends.registry import HELP, SPECS
from ..runtime.serving.serve import ServeOptions
from ..runtime.serving.triton import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US
from .common import cpu_threads, threads_option, user_errors

PORT = click.IntRange(1, 65535)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Any file of a model bundle (NAME.onnx, .plan or .json). Default: the single bundle in ./models.",
)
@click.option("--backend", type=click.Choice(SPECS), default="auto", show_default=True, help=HELP)
@click.option(
    "--name", default=None, help="Model name clients use (grpc://HOST:PORT/NAME). Default: the bundle's name."
)
@click.option(
    "--address",
    default="0.0.0.0",
    show_default=True,
    help="Interface the endpoints listen on (127.0.0.1: this machine only).",
)
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="Triton's HTTP/REST port.")
@click.option(
    "--grpc-port", type=PORT, default=8001, show_default=True, help="Triton's gRPC port (protoad-run --server)."
)
@click.option("--metrics-port", type=PORT, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="Most frames Triton's dynamic batcher gathers into one call of the backend.",
)
@click.option(
    "--queue-delay-us",
    type=click.IntRange(min=0),
    default=DEFAULT_QUEUE_DELAY_US,
    show_default=True,
    help="How long a request may wait for others to fill a batch (microseconds).",
)
@threads_option("the backend (onnxruntime intra-op, OpenVINO, torch)")
@user_errors
def main(
    model: Path | None,
    backend: str,
    name: str | None,
    address: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    max_batch: int,
    queue_delay_us: int,
    threads: int,
) -> None:
    """Serve a model bundle with Triton Inference Server until Ctrl-C or SIGTERM: dynamic batching across clients,
    HTTP and gRPC, readiness and Prometheus metrics. Lines connect with
    protoad-run SOURCE --server grpc://HOST:GRPC_PORT/NAME. Needs pip install 'protoad-edge[serve]'.

    Ready means the model answers: Triton loads it before it opens any endpoint, so /v2/health/ready and
    /v2/models/NAME/ready say 200 only once an inference can be served (before that they refuse connections)."""
    from ..runtime.backends.base import BackendOptions
    from ..runtime.backends.registry import open_backend
    from ..runtime.serving.serve import serve

    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open_backend(model, backend, options=BackendOptions(threads=cpu_threads(threads))) as opened:
            options = ServeOptions(
                name=name or Bundle.of(opened.path).name,
                address=address,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                max_batch=max_batch,
                queue_delay_us=queue_delay_us,
            )
            serve(opened, options, log=lambda m: click.echo(m, err=True), stop=stop)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
    click.echo(f"stopped ({received[0] if received else 'server ended'})", err=True)
