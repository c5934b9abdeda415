"""Verdicts over MQTT against a real broker: mosquitto on 127.0.0.1, a free port, started per test.

Every record of a run must reach a subscriber in order and equal to the run's JSON lines; a broker
restart mid-run must lose nothing within the buffer's bound; with no broker at all the run must still
finish promptly and count what it dropped and what is still queued.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client
from PIL import Image

from conftest import normal_crops
from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.loop import RunOptions, RunSummary, run
from protoad_edge.runtime.mqtt import MqttSink, parse_mqtt_url
from protoad_edge.runtime.ort_backend import OrtBackend

REPO = Path(__file__).resolve().parents[1]
TOPIC = "plant/line3/verdicts"
# Debian installs the broker in /usr/sbin, which a user's PATH may lack; .ci/run looks there too.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/local/sbin:/usr/sbin")
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
    (saved when it is stopped with SIGTERM), which a subscriber needs to miss nothing while it reconnects."""

    def __init__(self, folder: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        # Started as root, mosquitto switches to the user named here: stay ourselves, who own the folder.
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", f"user {user}"]
        lines += ["persistence true", f"persistence_location {folder}/"] if persistent else ["persistence false"]
        self.config.write_text("\n".join(lines) + "\n")
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


class Subscriber:
    """A paho client that (re)subscribes at QoS 1 on every connect and keeps each payload as a record.

    With ``client_id`` its session is persistent, so a persistent broker queues what arrives while it is away."""

    def __init__(self, broker: Broker, client_id: str | None = None) -> None:
        self.payloads: list[bytes] = []
        self.subscribed = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=client_id is None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda client, userdata, message: self.payloads.append(message.payload)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"

    def records(self) -> list[dict]:
        return [json.loads(p) for p in list(self.payloads)]

    def wait_for(self, frames: set[int], timeout: float = 10) -> list[dict]:
        wait_until(lambda: {r["frame"] for r in self.records()} >= frames, timeout, f"frames {sorted(frames)}")
        return self.records()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> OrtBackend:
    return OrtBackend(tiny_model, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 50 'part' images: a source that runs the same way every time."""
    folder = tmp_path_factory.mktemp("parts")
    for i, rgb in enumerate(normal_crops(50, 80, seed=3)):
        Image.fromarray(rgb).save(folder / f"part_{i:03d}.png")
    return folder


def some_parts(parts: Path, n: int, tmp_path: Path) -> Path:
    folder = tmp_path / f"first_{n}"
    folder.mkdir()
    for path in sorted(parts.iterdir())[:n]:
        (folder / path.name).symlink_to(path)
    return folder


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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet(message: str) -> None:
    pass


def run_with(sink: MqttSink, source: Path, backend: OrtBackend, tmp_path: Path,
             **options) -> tuple[RunSummary, list[dict]]:
    """Runs ``source`` into ``sink`` and a JSON-lines log; returns the summary and the log's records."""
    log = tmp_path / "run.jsonl"
    summary = run(str(source), backend, RunOptions(jsonl=log, sinks=[sink], log=quiet, **options))
    return summary, read_jsonl(log)


# ---------------------------------------------------------------- URLs and installation


def test_parse_mqtt_url() -> None:
    assert parse_mqtt_url("mqtt://10.0.0.5/line3") == ("10.0.0.5", 1883, "line3")
    assert parse_mqtt_url("mqtt://broker.plant.local:8883/factory/line3/verdicts") == (
        "broker.plant.local", 8883, "factory/line3/verdicts")
    assert parse_mqtt_url("mqtt://[::1]:1884/a") == ("::1", 1884, "a")


@pytest.mark.parametrize("url, why", [
    ("http://10.0.0.5/line3", "must start with mqtt://"),
    ("10.0.0.5:1883/line3", "must start with mqtt://"),
    ("mqtt:///line3", "no host"),
    ("mqtt://10.0.0.5", "no topic"),
    ("mqtt://10.0.0.5:1883/", "no topic"),
    ("mqtt://10.0.0.5:99999/line3", "port"),
    ("mqtt://10.0.0.5:0/line3", "port"),
    ("mqtt://10.0.0.5:abc/line3", "port"),
    ("mqtt://10.0.0.5:/line3", "port"),
    ("mqtt://10.0.0.5/line3/#", "cannot contain"),
    ("mqtt://10.0.0.5/+/verdicts", "cannot contain"),
    ("mqtt://user:secret@10.0.0.5/line3", "credentials"),
])
def test_bad_urls_name_the_url(url: str, why: str) -> None:
    for attempt in (parse_mqtt_url, MqttSink):
        with pytest.raises(ProtoADError) as error:
            attempt(url)
        assert repr(url) in str(error.value) and why in str(error.value)


def test_without_paho_the_runtime_imports_and_the_sink_says_what_to_install() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'paho':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import protoad_edge.runtime, protoad_edge.runtime.mqtt as m\n"
        "from protoad_edge.errors import ProtoADError\n"
        "try:\n"
        "    m.MqttSink('mqtt://127.0.0.1/line3')\n"
        "except ProtoADError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "pip install 'protoad-edge[mqtt]'" in result.stdout and "mqtt://127.0.0.1/line3" in result.stdout


# ---------------------------------------------------------------- a real broker


def test_every_record_arrives_in_order(broker: Broker, backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    subscriber = Subscriber(broker)
    try:
        logs: list[str] = []
        sink = MqttSink(broker.url(), log=logs.append)
        summary, records = run_with(sink, some_parts(parts, 12, tmp_path), backend, tmp_path)
        assert [r["frame"] for r in records] == list(range(12))
        assert subscriber.wait_for(set(range(12))) == records  # in order, once each, equal to the JSON lines
    finally:
        subscriber.close()
    assert (sink.delivered, sink.queued, sink.dropped) == (12, 0, 0)
    assert summary.written[-1] == f"{broker.url()}: 12 delivered, 0 queued, 0 dropped"
    assert logs == []


def test_anomalies_only(broker: Broker, backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    source = some_parts(parts, 12, tmp_path)
    scores: list[float] = []
    run(str(source), backend, RunOptions(threshold=1.0, log=quiet, on_frame=lambda r: scores.append(r.score)))
    threshold = sorted(scores)[len(scores) // 2]  # the frames above the median are anomalous
    subscriber = Subscriber(broker)
    try:
        sink = MqttSink(broker.url(), anomalies_only=True, log=quiet)
        summary, records = run_with(sink, source, backend, tmp_path, threshold=threshold)
        anomalous = [r for r in records if r["verdict"] == "anomaly"]
        assert 0 < len(anomalous) < 12
        assert subscriber.wait_for({r["frame"] for r in anomalous}) == anomalous
        time.sleep(0.3)  # nothing else trickles in
        assert subscriber.records() == anomalous
    finally:
        subscriber.close()
    assert summary.written[-1] == f"{broker.url()}: {len(anomalous)} delivered, 0 queued, 0 dropped"


@needs_broker
def test_a_broker_restart_mid_run_loses_nothing(backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    """mosquitto stops after frame 8 while frames keep coming (one per 0.1 s) and is back 2 s later on the
    same port: everything published meanwhile waits in the buffer and reaches the subscriber."""
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    subscriber = Subscriber(broker, client_id="protoad-test-subscriber")
    stopped_at: list[float] = []

    def paced(result) -> None:
        if result.index == 8:
            broker.stop()
            stopped_at.append(time.monotonic())
        elif len(stopped_at) == 1 and time.monotonic() - stopped_at[0] >= 2.0:
            broker.start()
            stopped_at.append(time.monotonic())
        time.sleep(0.1)

    try:
        logs: list[str] = []
        sink = MqttSink(broker.url(), log=logs.append, drain_timeout=15, max_backoff=2)
        started = time.monotonic()
        summary, records = run_with(sink, parts, backend, tmp_path, on_frame=paced)
        assert len(stopped_at) == 2 and time.monotonic() - started < 25
        received = subscriber.wait_for(set(range(50)), timeout=15)
    finally:
        subscriber.close()
        broker.stop()
    first_seen = list(dict.fromkeys(r["frame"] for r in received))
    assert first_seen == list(range(50))  # complete and in order; a resent message may come twice
    assert all(r == records[r["frame"]] for r in received)
    assert (sink.delivered, sink.queued, sink.dropped) == (50, 0, 0)
    assert summary.written[-1] == f"{broker.url()}: 50 delivered, 0 queued, 0 dropped"
    assert len(logs) == 2 and "lost the connection to 127.0.0.1" in logs[0] and "connected to 127.0.0.1" in logs[1]


def test_without_a_broker_the_run_goes_on_and_counts(backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    """Nothing listens: the run must not wait for the broker, and the summary says what became of each frame."""
    url = f"mqtt://127.0.0.1:{free_port()}/{TOPIC}"
    logs: list[str] = []
    sink = MqttSink(url, buffer=3, log=logs.append, drain_timeout=0.5)
    started = time.monotonic()
    summary, records = run_with(sink, some_parts(parts, 12, tmp_path), backend, tmp_path)
    assert time.monotonic() - started < 8 and len(records) == 12
    assert (sink.delivered, sink.queued, sink.dropped) == (0, 3, 9)
    assert summary.written[-1] == f"{url}: 0 delivered, 3 queued, 9 dropped"
    assert len(logs) == 1 and "cannot connect to 127.0.0.1" in logs[0]


@needs_broker
def test_a_late_broker_gets_the_newest_messages_in_order(backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    """The buffer drops the oldest: a broker that appears only at the end of the run gets the last 3 frames."""
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    subscriber = Subscriber(broker, client_id="protoad-test-late")  # a session the broker keeps while it is down
    broker.stop()

    def start_at_the_end(result) -> None:
        if result.index == 11:
            broker.start()

    try:
        logs: list[str] = []
        sink = MqttSink(broker.url(), buffer=3, log=logs.append, drain_timeout=10, max_backoff=1)
        summary, records = run_with(sink, some_parts(parts, 12, tmp_path), backend, tmp_path,
                                    on_frame=start_at_the_end)
        received = subscriber.wait_for({9, 10, 11})
    finally:
        subscriber.close()
        broker.stop()
    assert received == records[9:]
    assert summary.written[-1] == f"{broker.url()}: 3 delivered, 0 queued, 9 dropped"
    assert len(logs) == 2 and "cannot connect" in logs[0] and "sending 3 queued messages" in logs[1]


@needs_broker
def test_protoad_run_publishes_through_the_cli(broker: Broker, tiny_model: Path, backend: OrtBackend, parts: Path,
                                               tmp_path: Path) -> None:
    """``protoad-run SOURCE --mqtt URL --mqtt-anomalies-only``: the wiring a line engineer types."""
    from click.testing import CliRunner

    from protoad_edge.cli.run import main

    source = some_parts(parts, 10, tmp_path)
    scores: list[float] = []
    run(str(source), backend, RunOptions(threshold=1.0, log=quiet, on_frame=lambda r: scores.append(r.score)))
    threshold = sorted(scores)[4]  # the five highest scores are anomalous
    subscriber = Subscriber(broker)
    try:
        result = CliRunner().invoke(main, [str(source), "--model", str(tiny_model), "--threshold", repr(threshold),
                                           "--jsonl", str(tmp_path / "r.jsonl"), "--mqtt", broker.url(),
                                           "--mqtt-anomalies-only"])
        assert result.exit_code == 0, result.output
        anomalous = [r for r in read_jsonl(tmp_path / "r.jsonl") if r["verdict"] == "anomaly"]
        assert len(anomalous) == 5
        assert subscriber.wait_for({r["frame"] for r in anomalous}) == anomalous
    finally:
        subscriber.close()
    assert f"{broker.url()}: 5 delivered, 0 queued, 0 dropped" in result.stdout
    bad = CliRunner().invoke(main, [str(source), "--model", str(tiny_model), "--mqtt", "mqtt://127.0.0.1"])
    assert bad.exit_code == 2 and "bad MQTT URL 'mqtt://127.0.0.1': no topic" in bad.stderr
