"""A real ``protoad-serve`` on 127.0.0.1, for the tests and the load benchmark.

PyTriton needs numpy < 2, so serving has its own environment (``pip install '.[serve]'`` in it; ``.ci/run``
makes ``.venv-serve``). The server runs from ``$PROTOAD_SERVE_PYTHON``, else ``.venv-serve/bin/python`` of
this checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bench_outage import free_port

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0


def serve_python() -> Path | None:
    """The serving environment's interpreter, or None when there is none."""
    given = os.environ.get("PROTOAD_SERVE_PYTHON")
    path = Path(given) if given else ROOT / ".venv-serve" / "bin" / "python"
    return path if path.is_file() else None


class Server:
    """``protoad-serve --model MODEL`` on free ports; ``restart`` stops it and starts it again on the same ports."""

    def __init__(
        self, model: Path, log: Path, *, name: str | None = None, max_batch: int = 8, threads: int = 0
    ) -> None:
        python = serve_python()
        if python is None:
            raise RuntimeError(
                "no serving environment: python -m venv .venv-serve && .venv-serve/bin/pip install -e '.[serve]' "
                "(or set PROTOAD_SERVE_PYTHON)"
            )
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.name = name or model.name.split(".")[0]
        self.args = [
            str(python),
            "-c",
            "from protoad_edge.cli.serve import main; main()",
            "--model",
            str(model),
            "--name",
            self.name,
            "--address",
            "127.0.0.1",
            "--max-batch",
            str(max_batch),
            "--threads",
            str(threads),
            *(f"--{kind}-port={port}" for kind, port in self.ports.items()),
        ]
        self.log = log
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.ports['grpc']}/{self.name}"

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except OSError as exc:
            return getattr(exc, "code", 0) or 0, str(exc)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as r:
            return r.read().decode()

    def start(self) -> Server:
        return self.launch().wait_ready()

    def launch(self, env: dict[str, str] | None = None) -> Server:
        """Start the process and return at once (``wait_ready`` waits for the model); ``env`` adds variables."""
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
            )
        self.starts += 1
        return self

    def wait_ready(self) -> Server:
        """Wait until the model is ready (Triton's /v2/models/NAME/ready), or fail with the server's log."""
        assert self.process is not None
        end = time.monotonic() + READY_TIMEOUT_S
        while self.http(f"/v2/models/{self.name}/ready")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"protoad-serve did not become ready; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> int | None:
        """SIGTERM, as systemd or docker stop would; the exit status (killed after 60 s)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
