"""What the MQTT tests share: a real mosquitto per test, a subscriber, a TCP relay that can stall and cut a
connection, the run that feeds a sink, and the fixtures (a model, a folder of parts)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import normal_crops, read_jsonl
from paho.mqtt.client import CallbackAPIVersion, Client

from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.loop import RunOptions, RunSummary, run
from protoad_edge.runtime.outputs.mqtt import MqttSink

TOPIC = "plant/line3/verdicts"
# Debian installs the broker in /usr/sbin, which a user's PATH may lack; .ci/run looks there too.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/local/sbin:/usr/sbin")
# CI installs the broker and openssl: there a missing one is a broken set-up, not a reason to skip.
if os.environ.get("PROTOAD_REQUIRE_BROKER") == "1" and (MOSQUITTO is None or shutil.which("openssl") is None):
    raise RuntimeError(
        "PROTOAD_REQUIRE_BROKER=1 but mosquitto or openssl is missing (apt-get install mosquitto openssl)"
    )
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary (apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


class Broker:
    """mosquitto on 127.0.0.1:``port``; ``persistent`` keeps sessions and queued messages across a restart
    (saved when it is stopped with SIGTERM), which a subscriber needs to miss nothing while it reconnects.
    ``extra`` are more configuration lines (a password file, a TLS listener)."""

    def __init__(
        self, folder: Path, persistent: bool = False, extra: tuple[str, ...] = (), port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        # Started as root, mosquitto switches to the user named here: stay ourselves, who own the folder.
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [f"listener {self.port} 127.0.0.1", f"user {user}"]
        lines += ["persistence true", f"persistence_location {folder}/"] if persistent else ["persistence false"]
        if not any(line.startswith("allow_anonymous") for line in extra):
            lines.append("allow_anonymous true")
        self.config.write_text("\n".join(lines + list(extra)) + "\n")
        self.process: subprocess.Popen | None = None

    def url(self, topic: str = TOPIC) -> str:
        return f"mqtt://127.0.0.1:{self.port}/{topic}"

    def start(self) -> None:
        with open(self.folder / "mosquitto.log", "ab") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.listening, 10, f"mosquitto on port {self.port}")

    def listening(self) -> bool:
        assert self.process is not None and self.process.poll() is None, (self.folder / "mosquitto.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip("no mosquitto binary (apt-get install mosquitto)")
    folder = tmp_path / "broker"
    folder.mkdir()
    started = Broker(folder)
    started.start()
    yield started
    started.stop()


class Subscriber:
    """A paho client that (re)subscribes at QoS 1 on every connect and keeps each payload as a record, and the
    QoS each came with (the lower of the publisher's and the subscription's: 1 only if published at QoS >= 1).

    With ``client_id`` its session is persistent, so a persistent broker queues what arrives while it is away."""

    def __init__(
        self, broker: Broker, client_id: str | None = None, user: str | None = None, password: str | None = None
    ) -> None:
        self.payloads: list[bytes] = []
        self.qos: list[int] = []
        self.subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=client_id is None)
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._received
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"

    def _received(self, client: Client, userdata: object, message) -> None:
        self.qos.append(message.qos)
        self.payloads.append(message.payload)

    def records(self) -> list[dict]:
        return [json.loads(p) for p in list(self.payloads)]

    def wait_for(self, frames: set[int], timeout: float = 10) -> list[dict]:
        wait_until(lambda: {r["frame"] for r in self.records()} >= frames, timeout, f"frames {sorted(frames)}")
        return self.records()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Relay:
    """A TCP relay to ``port``, for a network fault on one connection while the broker stays up: ``stall`` holds
    what the client sends (so the broker acknowledges nothing), ``flow`` lets it through, ``cut`` closes every
    connection (what was held is lost) and lets the next ones flow."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, topic: str = TOPIC) -> str:
        return f"mqtt://127.0.0.1:{self.port}/{topic}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, outbound: bool) -> None:
        try:
            while data := source.recv(65536):
                if outbound:
                    self.flowing.wait()
                target.sendall(data)
        except OSError:
            pass

    def stall(self) -> None:
        self.flowing.clear()

    def flow(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the pipes blocked in recv; the client sees the connection end
            except OSError:
                pass
            s.close()
        self.sockets.clear()
        self.flowing.set()

    def close(self) -> None:
        self.server.close()
        self.cut()


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> OrtBackend:
    return OrtBackend(tiny_model, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 50 'part' images: a source that runs the same way every time."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("parts")
    for i, rgb in enumerate(normal_crops(50, 80, seed=3)):
        Image.fromarray(rgb).save(folder / f"part_{i:03d}.png")
    return folder


def some_parts(parts: Path, n: int, tmp_path: Path) -> Path:
    folder = tmp_path / f"first_{n}"
    folder.mkdir(exist_ok=True)
    for path in sorted(parts.iterdir())[:n]:
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    return folder


def quiet(message: str) -> None:
    pass


def run_with(
    sink: MqttSink, source: Path, backend: OrtBackend, tmp_path: Path, **options
) -> tuple[RunSummary, list[dict]]:
    """Runs ``source`` into ``sink`` and a JSON-lines log; returns the summary and the log's records."""
    log = tmp_path / "run.jsonl"
    summary = run(str(source), backend, RunOptions(jsonl=log, sinks=[sink], log=quiet, **options))
    return summary, read_jsonl(log)


def accounted(sink: MqttSink) -> bool:
    """Every message counted exactly once: delivered + queued + spooled + dropped = taken from the spool + written."""
    return sink.delivered + sink.queued + sink.spooled + sink.dropped == sink.from_spool + sink.written
