"""``protoad-serve``: a bundle behind Triton Inference Server, through PyTriton (which ships ``tritonserver``).

Any local backend (ort, openvino, trt, torch) answers Triton's requests, with Triton's dynamic batching
gathering the frames of many clients into one call, HTTP and gRPC endpoints, readiness and Prometheus
metrics. The model looks exactly like one from a ``--triton-repo`` repository (``runtime.triton.signature``,
metadata under the ``protoad`` parameter), so ``protoad-run --server`` cannot tell them apart.

PyTriton runs the model in Triton's Python backend, whose stub process links ``libpythonX.Y.so.1.0``. It must
be the running interpreter's own: a system libpython of another patch release makes the stub fail when the
model loads. ``stub_library_path`` points the stub at this interpreter's library where it has one.

Ready means the model answers. PyTriton normally starts ``tritonserver`` with an empty repository and loads the
model through Triton's API afterwards, so ``/v2/health/ready`` said 200 about a second before any model existed.
Here the model's files are written into the repository first (PyTriton's local model store) and Triton, which
loads its start-up models before it opens any endpoint, listens only once the model is loaded: the server's
readiness, the model's (``/v2/models/NAME/ready``) and gRPC's agree from the first answer on. A request that
arrives in the moment before PyTriton connects its handler waits for it rather than failing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from ...errors import ProtoADError
from ..backends.base import Backend
from .triton import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, PARAMETER, check_model_name, info_parameter, signature

ALIVE_CHECK_S = 1.0
START_TIMEOUT_S = 120.0  # tritonserver loading the model (PyTriton's own start-up limit)
START_POLL_S = 0.1
INSTALL = "pip install 'protoad-edge[serve]' (PyTriton needs numpy < 2: give serving its own environment)"
PYTRITON = "nvidia-pytriton>=0.5.5,<0.8"  # the local model store, and the internals publish_info and start use
# Triton's start-up lines about a GPU it cannot use, which on a healthy CPU host read as errors ("E... CudaDriverHelper
# has not been initialized", "Error: Failed to initialize NVML", "DCGM ... initialization error"). protoad-serve's
# model runs in this process, on the backend's own device, so Triton's CUDA only serves pinned memory and GPU metrics.
HARMLESS = re.compile(
    r"CudaDriverHelper has not been initialized|Failed to initialize NVML|DCGM unable to start|"
    r"pinned memory pool will not be available"
)


@dataclass(frozen=True)
class ServeOptions:
    """Where and how the model is served; the ports are Triton's defaults."""

    name: str
    address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US

    @property
    def host(self) -> str:
        """Where this machine reaches the endpoints."""
        return "127.0.0.1" if self.address == "0.0.0.0" else self.address

    def endpoints(self) -> str:
        host = self.host
        return (
            f"grpc://{host}:{self.grpc_port}/{self.name}, http://{host}:{self.http_port}/v2/models/{self.name}, "
            f"metrics http://{host}:{self.metrics_port}/metrics"
        )


def stub_library_path(config: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the LD_LIBRARY_PATH that makes Triton's Python stub load this interpreter's libpython, or None to leave it;
    a line for the log). ``config`` is ``sysconfig.get_config_vars()``."""
    soname = f"libpython{config.get('LDVERSION') or config.get('py_version_short', '')}.so.1.0"
    libdir = config.get("LIBDIR") or ""
    current = environ.get("LD_LIBRARY_PATH", "")
    if not config.get("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / soname).is_file():
        return None, (
            f"this Python has no shared {soname} (built without --enable-shared): Triton's Python stub loads "
            f"the system's {soname} if there is one, and fails to start the model if that is another "
            "release; if it does, serve from a Python built with --enable-shared"
        )
    if current.split(":")[0] == libdir:
        return None, f"Triton's Python stub loads {Path(libdir) / soname} (already first on LD_LIBRARY_PATH)"
    return ":".join(p for p in (libdir, current) if p), f"Triton's Python stub loads {Path(libdir) / soname}"


def serve(
    backend: Backend,
    options: ServeOptions,
    *,
    log: Callable[[str], None],
    stop: threading.Event | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``backend`` until ``stop`` is set (or the server dies: a ProtoADError). ``ready`` is called once the
    model answers."""
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ProtoADError(f"protoad-serve needs PyTriton ({exc}): {INSTALL}") from None
    try:
        from pytriton.triton import TritonLifecyclePolicy
    except ImportError:
        raise ProtoADError(
            f"this nvidia-pytriton has no local model store, which ready-means-ready needs: install {PYTRITON}"
        ) from None
    check_model_name(options.name, "--name")
    check_ports(options)
    path, line = stub_library_path(sysconfig.get_config_vars(), os.environ)
    if path is not None:
        os.environ["LD_LIBRARY_PATH"] = path  # tritonserver and its stub inherit the environment
    log(line)
    limit = backend.max_batch or options.max_batch
    if options.max_batch > limit:
        raise ProtoADError(
            f"--max-batch {options.max_batch}: {backend.describe().line()} runs at most {limit} images per call"
        )
    inputs, outputs = signature(backend.info)
    (image,) = inputs
    amap, score = outputs

    @batch
    def infer(**tensors: np.ndarray) -> dict[str, np.ndarray]:
        maps, scores = backend.infer(tensors[image.name])
        return {amap.name: maps, score.name: scores.reshape(-1, 1)}

    config = TritonConfig(
        http_address=options.address,
        http_port=options.http_port,
        grpc_address=options.address,
        grpc_port=options.grpc_port,
        metrics_port=options.metrics_port,
        allow_metrics=True,
        allow_cpu_metrics=True,
    )
    stop = stop or threading.Event()
    output = TritonOutput(sys.stdout, log)
    with contextlib.redirect_stdout(output):  # PyTriton prints tritonserver's output to stdout
        triton = Triton(config=config, triton_lifecycle_policy=TritonLifecyclePolicy(local_model_store=True))
        try:
            triton.bind(
                model_name=options.name,
                infer_func=infer,
                inputs=[Tensor(name=image.name, dtype=np.float32, shape=image.dims)],
                outputs=[Tensor(name=t.name, dtype=np.float32, shape=t.dims) for t in outputs],
                config=ModelConfig(
                    max_batch_size=options.max_batch,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us),
                ),
            )
            publish_info(triton, options.name, info_parameter(backend.info))
            started = time.monotonic()
            start(triton, options, line)
            try:
                triton.connect()
            except Exception as exc:  # PyTriton raises its own types, with the model's traceback inside
                raise ProtoADError(f"Triton did not start model {options.name}: {failure(str(exc))} ({line})") from None
            log(
                f"serving {options.name} ({backend.describe().line()}, batch up to {options.max_batch}, queue delay "
                f"{options.queue_delay_us} us) at {options.endpoints()}; ready in {time.monotonic() - started:.1f} s"
            )
            if ready:
                ready()
            while not stop.wait(ALIVE_CHECK_S):
                if not triton.is_alive():
                    raise ProtoADError(f"Triton serving {options.name} stopped unexpectedly")
        finally:
            triton.stop()
            output.finish()


def start(triton: Any, options: ServeOptions, stub: str) -> None:
    """Start tritonserver and wait until it answers. It loads the model from the local store before it listens,
    and exits if the model fails to load: that is one line from its log, at once, rather than PyTriton's
    two-minute wait for a server that is gone. ``stub`` (which libpython the stub loads) goes with a failure."""
    url = f"http://{options.host}:{options.http_port}/v2/health/ready"
    try:
        triton._run_server()
        server = triton._triton_server
    except AttributeError:
        raise ProtoADError(f"this nvidia-pytriton starts Triton differently: install {PYTRITON}") from None
    end = time.monotonic() + START_TIMEOUT_S
    while not answers(url):
        if not server.is_alive():
            raise ProtoADError(f"Triton did not start model {options.name}: {load_error(server.logs())} ({stub})")
        if time.monotonic() > end:
            raise ProtoADError(
                f"Triton did not start model {options.name}: {url} not ready after {START_TIMEOUT_S:.0f} s"
            )
        time.sleep(START_POLL_S)


def answers(url: str) -> bool:
    """Whether ``url`` says 200 (Triton's readiness)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


def load_error(logs: str) -> str:
    """Why Triton exited while loading the model: its first error line, reduced to the error (see ``failure``)."""
    for line in logs.splitlines():
        if re.match(r"E\d{4} ", line) and not HARMLESS.search(line):
            return failure(line.split("] ", 1)[-1].strip('"'))
        if line.startswith("error: "):  # tritonserver's last words
            return failure(line.removeprefix("error: "))
    return "tritonserver exited (no error logged)"


class TritonOutput(io.TextIOBase):
    """Triton's output, which PyTriton prints to stdout in pieces, passed on whole line by whole line, less the
    lines that match ``HARMLESS``: one line of ``log`` says they were hidden. Every other line, errors included,
    shows as Triton wrote it."""

    def __init__(self, stream: TextIO, log: Callable[[str], None]) -> None:
        super().__init__()
        self.stream, self.log = stream, log
        self.pending = ""
        self.said = False  # that lines were hidden
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            *lines, self.pending = (self.pending + text).split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if not HARMLESS.search(line):
            self.stream.write(line + "\n")
            self.stream.flush()
        elif not self.said:
            self.said = True
            self.log(
                "Triton found no usable GPU for itself (CUDA, NVML, DCGM): its lines about that are hidden; the "
                "model runs on the backend's device, Triton's metrics cover the CPU"
            )

    def finish(self) -> None:
        """Pass on a last line that has no newline."""
        with self.lock:
            if self.pending:
                self._line(self.pending)
                self.pending = ""


def check_ports(options: ServeOptions) -> None:
    """Each port distinct and free on the address, or one line naming the flag: Triton itself would only exit,
    and PyTriton report a readiness time-out minutes later."""
    ports = {"--http-port": options.http_port, "--grpc-port": options.grpc_port, "--metrics-port": options.metrics_port}
    if len(set(ports.values())) < len(ports):
        raise ProtoADError(f"{', '.join(f'{k} {v}' for k, v in ports.items())}: the three ports must differ")
    for flag, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.address, port))
            except OSError as exc:
                raise ProtoADError(
                    f"{flag} {port}: cannot listen on {options.address}:{port} ({exc.strerror})"
                ) from None


def publish_info(triton: Any, name: str, text: str) -> None:
    """Put the bundle's metadata into the model configuration PyTriton generates, under ``PARAMETER``, and write
    that configuration again into the local model store (``bind`` wrote it there without the metadata).

    PyTriton's public API has no model parameters, so this sets the one dictionary its configuration generator
    writes as ``parameters`` (nvidia-pytriton 0.5.5-0.7); a PyTriton without it is refused with the versions that
    have it, rather than serving a model that clients cannot judge with.
    """
    try:
        from pytriton.model_config.generator import ModelConfigGenerator

        model = next(m for m in triton._model_manager.models if m.model_name == name)
        config = model._get_triton_model_config()
        config.backend_parameters[PARAMETER] = text
        ModelConfigGenerator(config=config).to_file(triton._workspace.model_store_path / name / "config.pbtxt")
    except (AttributeError, ImportError, StopIteration, TypeError):
        raise ProtoADError(
            f"this nvidia-pytriton cannot carry the bundle's metadata to clients: install {PYTRITON}"
        ) from None


def failure(text: str) -> str:
    """What went wrong, from an error that may carry a whole traceback: its last ``SomeError: why`` line."""
    found = re.findall(r"([A-Z]\w*(?:Error|Exception): [^\n\\]+)", text)
    return found[-1].strip() if found else text.strip().splitlines()[0]
