"""Nothing lost: what the broker did not acknowledge by the end of a run waits in a spool on disk, and the next run
to the same broker and topic (or ``protoad-run --mqtt URL --mqtt-flush``) sends it first, in order.

The spool on its own (bounds, lock, format) needs no broker; the promise itself is tested with a real mosquitto
that is down for a whole run and started afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mqtt_helpers import (  # noqa: F401
    MOSQUITTO,
    TOPIC,
    Broker,
    Subscriber,
    accounted,
    backend,
    free_port,
    parts,
    quiet,
    read_jsonl,
    run_with,
    some_parts,
    wait_until,
)

from protoad_edge.cli.run import main
from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.outputs.mqtt import EXIT_UNDELIVERED, MqttSink
from protoad_edge.runtime.outputs.spool import Spool, default_folder

HOST, PORT = "10.0.0.5", 1883


def records(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"frame": i, "timestamp": 1000.0 + i}).encode() for i in range(start, start + n)]


# ---------------------------------------------------------------- the spool on its own


def test_what_is_saved_comes_back_in_order_and_none_left_removes_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, HOST, PORT, TOPIC)
    assert spool.records == [] and not spool.path.exists()
    assert spool.save(records(5)) == 0
    spool.release()
    lines = spool.path.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"protoad_mqtt_spool": 1, "broker": f"{HOST}:{PORT}", "topic": TOPIC}
    again = Spool(tmp_path, HOST, PORT, TOPIC)
    assert again.records == records(5)
    again.save([])
    again.release()
    assert not spool.path.exists()


def test_one_spool_per_broker_and_topic(tmp_path: Path) -> None:
    paths = set()
    for host, port, topic in [
        (HOST, PORT, TOPIC),
        (HOST, 1884, TOPIC),
        ("10.0.0.6", PORT, TOPIC),
        (HOST, PORT, "plant/line4/verdicts"),
    ]:
        spool = Spool(tmp_path, host, port, topic)
        spool.save(records(1))
        spool.release()
        paths.add(spool.path)
        assert spool.path.name.startswith(f"{host}_{port}_") and spool.path.suffix == ".jsonl"
    assert len(paths) == 4


def test_the_oldest_are_dropped_beyond_the_byte_bound(tmp_path: Path) -> None:
    """Each record is len + 1 (its newline) bytes: exactly at the bound all are kept, one byte less drops one."""
    five = records(5)
    size = sum(len(r) + 1 for r in five)
    spool = Spool(tmp_path, HOST, PORT, TOPIC, max_bytes=size)
    assert spool.save(five) == 0 and spool.records == five
    spool.max_bytes = size - 1
    assert spool.save(five) == 1 and spool.records == five[1:]
    spool.max_bytes = 0
    assert spool.save(five) == 5 and not spool.path.exists()
    spool.release()


def test_a_spool_is_owned_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = Spool(tmp_path, HOST, PORT, TOPIC)
    with pytest.raises(ProtoADError) as error:
        Spool(tmp_path, HOST, PORT, TOPIC)
    assert str(error.value) == (
        f"the MQTT spool {first.path} is in use by another protoad-run with the same broker "
        f"and topic: give this one its own --mqtt-spool DIR"
    )
    first.release()
    Spool(tmp_path, HOST, PORT, TOPIC).release()


def test_a_file_that_is_not_this_spool_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, HOST, PORT, TOPIC)
    spool.release()
    spool.path.write_text('{"frame": 0}\n')
    with pytest.raises(ProtoADError, match=f"{spool.path} is not this broker's and topic's MQTT spool"):
        Spool(tmp_path, HOST, PORT, TOPIC)
    Spool(tmp_path, HOST, PORT, TOPIC + "x").release()  # the lock was let go: the next spool opens


def test_an_unusable_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ProtoADError, match=f"cannot use the MQTT spool folder {tmp_path / 'file' / 'spool'}"):
        Spool(tmp_path / "file" / "spool", HOST, PORT, TOPIC)


def test_the_default_folder_is_state_not_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_folder() == tmp_path / "protoad-edge" / "mqtt-spool"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_folder() == tmp_path / "home" / ".local" / "state" / "protoad-edge" / "mqtt-spool"


# ---------------------------------------------------------------- the sink and its spool, no broker


def down_url() -> str:
    return f"mqtt://127.0.0.1:{free_port()}/{TOPIC}"


def left_by_an_earlier_run(folder: Path, url: str, n: int) -> None:
    spool = Spool(folder, "127.0.0.1", int(url.split(":")[2].split("/")[0]), TOPIC)
    spool.save(records(n))
    spool.release()


def test_a_run_without_a_broker_spools_all(backend: OrtBackend, parts: Path, tmp_path: Path) -> None:
    url = down_url()
    sink = MqttSink(url, log=quiet, drain_timeout=0.5, spool=tmp_path / "spool")
    summary, written = run_with(sink, some_parts(parts, 6, tmp_path), backend, tmp_path)
    assert (sink.delivered, sink.queued, sink.spooled, sink.dropped) == (0, 0, 6, 0) and accounted(sink)
    assert summary.written[-1] == f"{url}: 0 delivered, 0 queued, 6 spooled, 0 dropped (spool {sink.spool.path})"
    assert sink.shortfall() == (
        f"mqtt: 6 records not acknowledged by 127.0.0.1:{sink.port}: 6 spooled in "
        f"{sink.spool.path} (the next run to this broker and topic, or protoad-run --mqtt "
        f"{url} --mqtt-flush, sends them first)"
    )
    assert [json.loads(r) for r in Spool(tmp_path / "spool", "127.0.0.1", sink.port, TOPIC).records] == written


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
def test_close_waits_the_drain_timeout_for_pubacks(tmp_path: Path) -> None:
    url = down_url()
    left_by_an_earlier_run(tmp_path, url, 2)
    sink = MqttSink(url, log=quiet, drain_timeout=3.0, spool=tmp_path)
    started = time.monotonic()
    sink.close(keep=True)
    # paho's thread may take up to 1 s more to stop (it sleeps between reconnects in steps of 1 s)
    assert 3.0 <= time.monotonic() - started < 8 and sink.spooled == 2


def test_a_spool_larger_than_the_buffer_loses_its_oldest(tmp_path: Path) -> None:
    url = down_url()
    left_by_an_earlier_run(tmp_path, url, 5)
    sink = MqttSink(url, buffer=3, log=quiet, drain_timeout=0, spool=tmp_path)
    assert (sink.from_spool, sink.dropped) == (5, 2)
    sink.close(keep=True)
    assert (sink.spooled, sink.dropped) == (3, 2) and accounted(sink)
    assert sink.spool.records == records(3, start=2)
    assert sink.summary().startswith(f"{url}: 5 from the spool + 0 new: 0 delivered, 0 queued, 3 spooled, 2 dropped")
    assert sink.shortfall().endswith("; 2 dropped (the buffer or the spool was full)")


def test_a_spool_that_cannot_be_written_leaves_the_records_queued(tmp_path: Path) -> None:
    url = down_url()
    folder = tmp_path / "spool"
    left_by_an_earlier_run(folder, url, 2)
    logs: list[str] = []
    sink = MqttSink(url, log=logs.append, drain_timeout=0, spool=folder)
    shutil.rmtree(folder)
    folder.write_text("")  # the spool's folder is now a file: nothing can be written there
    sink.close(keep=True)
    assert (sink.queued, sink.spooled) == (2, 0) and accounted(sink)
    failed = [line for line in logs if "spool" in line]
    assert len(failed) == 1 and failed[0].startswith(f"mqtt: cannot write the spool {sink.spool.path} (")
    assert failed[0].endswith("): 2 undelivered records are lost")
    assert sink.shortfall() == f"mqtt: 2 records not acknowledged by 127.0.0.1:{sink.port}: 2 lost (not spooled)"


# ---------------------------------------------------------------- a broker down for a whole run


@pytest.fixture
def late_broker(tmp_path: Path):
    """A broker configured on a port where nothing listens yet: the test starts it after the run."""
    if MOSQUITTO is None:
        pytest.skip("no mosquitto binary (apt-get install mosquitto)")
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Broker(folder)
    yield broker
    broker.stop()


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow
def test_a_broker_down_for_a_whole_run_gets_every_record_from_the_flush(
    late_broker: Broker, tiny_model: Path, parts: Path, tmp_path: Path
) -> None:
    """protoad-run with the broker down: exit 75 and one line with the count and the spool. The broker comes up;
    --mqtt-flush sends the spool (exit 0) and the subscriber gets every record, in order, as the run wrote it."""
    source, spool = some_parts(parts, 12, tmp_path), tmp_path / "spool"
    common = ["--mqtt", late_broker.url(), "--mqtt-spool", str(spool), "--mqtt-drain-timeout", "0.5"]
    down = cli(str(source), "--model", str(tiny_model), "--jsonl", str(tmp_path / "r.jsonl"), *common)
    assert down.exit_code == EXIT_UNDELIVERED, down.output
    written = read_jsonl(tmp_path / "r.jsonl")
    path = next(spool.glob("*.jsonl"))
    assert f"{late_broker.url()}: 0 delivered, 0 queued, 12 spooled, 0 dropped (spool {path})" in down.stdout
    shortfall = [line for line in down.stderr.splitlines() if "not acknowledged" in line]
    assert shortfall == [
        (
            f"mqtt: 12 records not acknowledged by 127.0.0.1:{late_broker.port}: 12 spooled in {path} "
            f"(the next run to this broker and topic, or protoad-run --mqtt {late_broker.url()} "
            f"--mqtt-flush, sends them first)"
        )
    ]
    assert sum("cannot connect" in line for line in down.stderr.splitlines()) == 1  # the outage: one line

    still_down = cli(*common, "--mqtt-flush")
    assert still_down.exit_code == EXIT_UNDELIVERED and "12 spooled" in still_down.stdout and path.exists()

    late_broker.start()
    subscriber = Subscriber(late_broker)
    try:
        flushed = cli(*common, "--mqtt-flush", "--mqtt-drain-timeout", "10")
        assert flushed.exit_code == 0, flushed.output
        assert subscriber.wait_for(set(range(12))) == written  # every record, in order, once each
        assert subscriber.qos == [1] * 12
    finally:
        subscriber.close()
    assert (
        f"{late_broker.url()}: 12 from the spool + 0 new: 12 delivered, 0 queued, 0 spooled, 0 dropped (spool {path})"
    ) in flushed.stdout
    assert not path.exists()
    empty = cli(*common, "--mqtt-flush")
    assert empty.exit_code == 0 and f"{late_broker.url()}: 0 delivered, 0 queued, 0 spooled, 0 dropped" in empty.stdout


@pytest.mark.slow
def test_the_next_run_sends_the_spool_first(
    late_broker: Broker, backend: OrtBackend, parts: Path, tmp_path: Path
) -> None:
    first = MqttSink(late_broker.url(), log=quiet, drain_timeout=0.5, spool=tmp_path / "spool")
    _, spooled = run_with(first, some_parts(parts, 8, tmp_path), backend, tmp_path)
    assert first.spooled == 8
    late_broker.start()
    subscriber = Subscriber(late_broker)
    try:
        second = MqttSink(late_broker.url(), log=quiet, drain_timeout=10, spool=tmp_path / "spool")
        summary, new = run_with(second, some_parts(parts, 4, tmp_path), backend, tmp_path)
        wait_until(lambda: len(subscriber.payloads) >= 12, 10, "12 records")
        time.sleep(0.2)  # and no more
    finally:
        subscriber.close()
    assert subscriber.records() == spooled + new  # the spooled first, then this run's, in order
    assert summary.written[-1] == (
        f"{late_broker.url()}: 8 from the spool + 4 new: 12 delivered, 0 queued, "
        f"0 spooled, 0 dropped (spool {second.spool.path})"
    )
    assert accounted(second) and not second.spool.path.exists()


def test_flush_wants_a_broker_and_no_source(tmp_path: Path) -> None:
    for args in (["--mqtt-flush"], ["--mqtt-flush", "--mqtt", down_url(), str(tmp_path)]):
        result = cli(*args)
        assert result.exit_code == 2
        assert "error: --mqtt-flush sends the spool of --mqtt URL and exits: give --mqtt and no SOURCE" in result.stderr
    nothing = cli("--mqtt", down_url())
    assert nothing.exit_code == 2 and "Missing argument 'SOURCE...'" in nothing.stderr
