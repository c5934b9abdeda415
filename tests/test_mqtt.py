"""Verdicts over MQTT against a real broker: mosquitto on 127.0.0.1, a free port, started per test.

Every record of a run must reach a subscriber in order and equal to the run's JSON lines; a broker
restart mid-run must lose nothing within the buffer's bound; with no broker at all the run must still
finish promptly and count what it dropped and what is still queued.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_helpers import (  # noqa: F401
    TOPIC,
    Broker,
    Relay,
    Subscriber,
    accounted,
    backend,
    broker,
    free_port,
    needs_broker,
    parts,
    quiet,
    read_jsonl,
    run_with,
    some_parts,
    wait_until,
)

from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.loop import RunOptions, run
from protoad_edge.runtime.outputs.mqtt import INFLIGHT, BrokerUrl, MqttSink, parse_mqtt_url

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- URLs and installation


def test_parse_mqtt_url() -> None:
    assert parse_mqtt_url("mqtt://10.0.0.5/line3") == BrokerUrl("10.0.0.5", 1883, "line3", tls=False)
    assert parse_mqtt_url("mqtt://broker.plant.local:8883/factory/line3/verdicts") == (
        "broker.plant.local",
        8883,
        "factory/line3/verdicts",
        False,
    )
    assert parse_mqtt_url("mqtt://[::1]:1884/a") == ("::1", 1884, "a", False)
    assert parse_mqtt_url("mqtts://10.0.0.5/line3") == ("10.0.0.5", 8883, "line3", True)
    assert parse_mqtt_url("mqtts://10.0.0.5:1883/line3") == ("10.0.0.5", 1883, "line3", True)


@pytest.mark.parametrize(
    "url, why",
    [
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
    ],
)
def test_bad_urls_name_the_url(url: str, why: str) -> None:
    for attempt in (parse_mqtt_url, MqttSink):
        with pytest.raises(ProtoADError) as error:
            attempt(url)
        assert repr(url) in str(error.value) and why in str(error.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("mqtts://operator:s3cr3t-pw@10.0.0.5/line3", "'mqtts://operator:***@10.0.0.5/line3'"),
        ("mqtt://s3cr3t-pw@10.0.0.5/line3", "'mqtt://***@10.0.0.5/line3'"),  # a user information alone may be a token
    ],
)
def test_credentials_in_the_url_are_refused_without_echoing_them(url: str, shown: str) -> None:
    """The line says where the password goes instead, and shows the URL with the secret masked."""
    for attempt in (parse_mqtt_url, MqttSink):
        with pytest.raises(ProtoADError) as error:
            attempt(url)
        message = str(error.value)
        assert "s3cr3t-pw" not in message and f"bad MQTT URL {shown}: a URL is no place for credentials" in message
        assert "--mqtt-user" in message and "PROTOAD_MQTT_PASSWORD" in message and "--mqtt-password-file" in message


def test_without_paho_the_runtime_imports_and_the_sink_says_what_to_install() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'paho':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import protoad_edge.runtime, protoad_edge.runtime.outputs.mqtt as m\n"
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
    assert subscriber.qos == [1] * 12  # published at QoS 1: a subscription at QoS 1 gets QoS 0 from a QoS 0 publish
    assert (sink.delivered, sink.queued, sink.dropped) == (12, 0, 0) and accounted(sink)
    assert summary.written[-1] == f"{broker.url()}: 12 delivered, 0 queued, 0 spooled, 0 dropped"
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
    assert summary.written[-1] == f"{broker.url()}: {len(anomalous)} delivered, 0 queued, 0 spooled, 0 dropped"


@pytest.mark.slow
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
    assert summary.written[-1] == f"{broker.url()}: 50 delivered, 0 queued, 0 spooled, 0 dropped"
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
    assert summary.written[-1] == f"{url}: 0 delivered, 3 queued, 0 spooled, 9 dropped"
    assert len(logs) == 1 and f"cannot connect to 127.0.0.1:{sink.port} (Connection refused)" in logs[0]


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
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
        summary, records = run_with(sink, some_parts(parts, 12, tmp_path), backend, tmp_path, on_frame=start_at_the_end)
        received = subscriber.wait_for({9, 10, 11})
    finally:
        subscriber.close()
        broker.stop()
    assert received == records[9:]
    assert summary.written[-1] == f"{broker.url()}: 3 delivered, 0 queued, 0 spooled, 9 dropped"
    assert len(logs) == 2 and "cannot connect" in logs[0] and "sending 3 queued messages" in logs[1]


@needs_broker
def test_protoad_run_publishes_through_the_cli(
    broker: Broker, tiny_model: Path, backend: OrtBackend, parts: Path, tmp_path: Path
) -> None:
    """``protoad-run SOURCE --mqtt URL --mqtt-anomalies-only``: the wiring a line engineer types."""
    from click.testing import CliRunner

    from protoad_edge.cli.run import main

    source = some_parts(parts, 10, tmp_path)
    scores: list[float] = []
    run(str(source), backend, RunOptions(threshold=1.0, log=quiet, on_frame=lambda r: scores.append(r.score)))
    threshold = sorted(scores)[4]  # the five highest scores are anomalous
    subscriber = Subscriber(broker)
    try:
        result = CliRunner().invoke(
            main,
            [
                str(source),
                "--model",
                str(tiny_model),
                "--threshold",
                repr(threshold),
                "--jsonl",
                str(tmp_path / "r.jsonl"),
                "--mqtt",
                broker.url(),
                "--mqtt-anomalies-only",
                "--mqtt-spool",
                str(tmp_path / "spool"),
            ],
        )
        assert result.exit_code == 0, result.output
        anomalous = [r for r in read_jsonl(tmp_path / "r.jsonl") if r["verdict"] == "anomaly"]
        assert len(anomalous) == 5
        assert subscriber.wait_for({r["frame"] for r in anomalous}) == anomalous
    finally:
        subscriber.close()
    spool = tmp_path / "spool" / f"127.0.0.1_{broker.port}_"
    assert f"{broker.url()}: 5 delivered, 0 queued, 0 spooled, 0 dropped (spool {spool}" in result.stdout
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # nothing owed, no spool file
    bad = CliRunner().invoke(main, [str(source), "--model", str(tiny_model), "--mqtt", "mqtt://127.0.0.1"])
    assert bad.exit_code == 2 and "bad MQTT URL 'mqtt://127.0.0.1': no topic" in bad.stderr


def test_messages_in_flight_at_a_cut_are_resent_in_order(
    broker: Broker, backend: OrtBackend, parts: Path, tmp_path: Path
) -> None:
    """A full window of messages awaiting their PUBACK when the connection breaks (the relay held them: the
    broker never saw them) goes out again, oldest first, ahead of those not sent yet: the subscriber gets
    every frame once, in order."""
    relay = Relay(broker.port)
    subscriber = Subscriber(broker)
    frames = INFLIGHT + 5
    sink = MqttSink(relay.url(), log=quiet, drain_timeout=10)

    def cut_with_a_full_window(result) -> None:
        if result.index == 0:
            wait_until(lambda: sink.delivered == 1, 5, "the first PUBACK")
            relay.stall()
        if result.index == frames - 1:
            wait_until(lambda: len(sink._inflight) == INFLIGHT, 5, "a full window in flight")
            relay.cut()

    try:
        _, records = run_with(
            sink, some_parts(parts, frames, tmp_path), backend, tmp_path, on_frame=cut_with_a_full_window
        )
        received = subscriber.wait_for(set(range(frames)))
    finally:
        subscriber.close()
        relay.close()
    assert [r["frame"] for r in received] == list(range(frames))
    assert received == records
    assert (sink.delivered, sink.queued, sink.dropped) == (frames, 0, 0)


def test_a_late_puback_of_a_dropped_message_is_not_counted(
    broker: Broker, backend: OrtBackend, parts: Path, tmp_path: Path
) -> None:
    """Buffer 3: frames 0-2 are in flight, held by the relay, when frames 3 and 4 push the two oldest out of the
    buffer; then the relay lets everything through and the broker acknowledges all five. The two dropped ones
    stay dropped: delivered + queued + spooled + dropped = written."""
    relay = Relay(broker.port)
    sink = MqttSink(relay.url(), buffer=3, log=quiet, drain_timeout=10)
    wait_until(lambda: sink._connected, 5, "the sink's connection")
    relay.stall()

    def overflow_then_flow(result) -> None:
        if result.index == 2:
            wait_until(lambda: len(sink._inflight) == 3, 5, "frames 0-2 in flight")
        if result.index == 4:
            wait_until(lambda: list(sink._inflight) == [2, 3, 4], 5, "frames 2-4 in flight")
            relay.flow()

    try:
        run_with(sink, some_parts(parts, 5, tmp_path), backend, tmp_path, on_frame=overflow_then_flow)
    finally:
        relay.close()
    assert (sink.written, sink.delivered, sink.queued, sink.dropped) == (5, 3, 0, 2)
    assert accounted(sink)
