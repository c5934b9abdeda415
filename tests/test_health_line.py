"""Health on the line, end to end: a bundle built by protoad-export (which records its normal images), videos in
which the light changes, the part's scale changes, the camera freezes and goes black, judged by protoad-run; the
records name the problems within the documented window, and back when the scene is restored; the MQTT status
message follows every change."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import normal_crops
from mqtt_helpers import TOPIC, Broker, broker, needs_broker, wait_until  # noqa: F401
from PIL import Image

from protoad_edge.cli.export import main as export_main
from protoad_edge.cli.run import main as run_main
from protoad_edge.metadata import ModelInfo

pytestmark = pytest.mark.slow  # a real build, then runs

SIZE = (160, 120)
WINDOW = 10  # --health-window: a problem is in force from the 6th of 10 frames showing it
SEGMENT = 20  # frames before, during and after each change


def belt_part(seed: int, zoom: float = 1.0, light: float = 1.0) -> np.ndarray:
    """A part (different in every frame) on a belt with sensor noise, RGB; ``zoom`` > 1 shows it larger, as a
    camera moved closer would; ``light`` scales the whole scene, as another lamp would."""
    rng = np.random.default_rng([11, seed])
    frame = np.clip(60 + rng.normal(0, 4, (SIZE[1], SIZE[0], 1)), 0, 255).repeat(3, axis=2)
    frame[12:108, 32:128] = normal_crops(1, 96, seed=seed)[0]
    if zoom != 1.0:
        w, h = round(SIZE[0] / zoom), round(SIZE[1] / zoom)
        x, y = (SIZE[0] - w) // 2, (SIZE[1] - h) // 2
        frame = cv2.resize(frame[y : y + h, x : x + w], SIZE, interpolation=cv2.INTER_LINEAR)
    return np.clip(frame * light, 0, 255).astype(np.uint8)


def lossless_video(path: Path, frames: list[np.ndarray]) -> Path:
    """FFV1 in AVI: every frame decodes to exactly the pixels written (no codec drift in the scores)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def belt_model(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    """A bundle built on 30 normal parts, 10 of them held out (enough for the drift check)."""
    root = tmp_path_factory.mktemp("belt")
    for split, count in {"train/good": 30, "test/good": 2}.items():
        folder = root / "belt" / split
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(belt_part(1000 * (split == "test/good") + i)).save(folder / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("belt_model")
    result = CliRunner().invoke(
        export_main,
        [
            "--category",
            "belt",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--weights",
            "none",
            "--resize",
            "72",
            "--crop",
            "64",
            "--no-cache",
            "--val-split",
            "0.34",
        ],
    )
    assert result.exit_code == 0, result.output
    return out / "belt.onnx"


def judge(video: Path, model: Path, tmp_path: Path, *extra: str) -> tuple[list[dict], str]:
    jsonl = tmp_path / f"{video.stem}.jsonl"
    result = CliRunner().invoke(
        run_main,
        [
            str(video),
            "--model",
            str(model),
            "--jsonl",
            str(jsonl),
            "--health-window",
            str(WINDOW),
            "--status-every",
            "0",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in jsonl.read_text().splitlines()], result.output


def in_force(records: list[dict], code: str) -> list[int]:
    return [r["frame"] for r in records if code in r["health"]["problems"]]


def test_the_bundle_records_its_normal_images(belt_model: Path) -> None:
    built_on = ModelInfo.load_json(belt_model.with_suffix(".json")).built_on
    assert built_on is not None and built_on["images"] == 30
    assert built_on["region"] == {"min": list(SIZE), "max": list(SIZE)}
    assert built_on["scores"]["images"] == "held-out" and built_on["scores"]["count"] == 10
    assert built_on["scores"]["p05"] <= built_on["scores"]["p50"] <= built_on["scores"]["p95"]
    for stat in ("brightness", "contrast", "sharpness"):
        low, high = built_on[stat]
        assert 0 < low <= high


def test_a_lamp_change_is_named_within_the_window_and_cleared_when_restored(belt_model: Path, tmp_path: Path) -> None:
    frames = [belt_part(100 + i, light=1.5 if SEGMENT <= i < 2 * SEGMENT else 1.0) for i in range(3 * SEGMENT)]
    records, output = judge(lossless_video(tmp_path / "lamp.avi", frames), belt_model, tmp_path)
    # the 6th brighter frame makes it a problem (6 of 10); the 5th restored frame leaves 5 of 10: no longer one
    assert in_force(records, "over-exposed") == list(range(SEGMENT + WINDOW // 2, 2 * SEGMENT + WINDOW // 2 - 1))
    assert all(r["health"]["problems"] == [] for r in records[:SEGMENT])
    assert records[-1]["health"]["problems"] == []
    assert all(r["health"]["frame"] == ["over-exposed"] for r in records[SEGMENT : 2 * SEGMENT])
    assert "health: " in output and "ATTENTION: over-exposed: brightness" in output and "ok again" in output


def test_a_scale_change_is_named_within_the_window_and_cleared_when_restored(belt_model: Path, tmp_path: Path) -> None:
    frames = [belt_part(200 + i, zoom=1.8 if SEGMENT <= i < 2 * SEGMENT else 1.0) for i in range(3 * SEGMENT)]
    records, _ = judge(lossless_video(tmp_path / "zoom.avi", frames), belt_model, tmp_path)
    troubled = [r["frame"] for r in records if r["health"]["problems"]]
    assert troubled and SEGMENT <= troubled[0] <= SEGMENT + WINDOW // 2  # within the window of the change
    assert troubled[-1] < 2 * SEGMENT + WINDOW // 2 + 1  # and over within the window of the restore
    assert records[-1]["health"]["problems"] == []
    # the coarser detail reads as blur, and the model scores the unfamiliar scale higher
    assert {code for r in records for code in r["health"]["problems"]} == {"blurred", "scores-high"}


def test_frozen_and_black_frames_are_named(belt_model: Path, tmp_path: Path) -> None:
    good = [belt_part(300 + i) for i in range(SEGMENT)]
    black = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    frames = good[:10] + [good[9]] * 8 + [black] * 8 + good[10:]
    records, _ = judge(lossless_video(tmp_path / "stuck.avi", frames), belt_model, tmp_path)
    named = {r["frame"]: r["health"]["frame"] for r in records}
    assert all("frozen" in named[i] for i in range(10, 18)) and "frozen" not in named[9]
    assert all("black" in named[i] for i in range(18, 26))
    assert all("black" not in named[i] and "frozen" not in named[i] for i in range(26, len(frames)))
    assert 15 in in_force(records, "frozen")  # the 6th frozen frame of 10


@needs_broker
def test_one_mqtt_status_message_per_change(belt_model: Path, broker: Broker, tmp_path: Path) -> None:  # noqa: F811
    """Retained on TOPIC/health: the state at the start, one message on each change of the problems (as the
    records show them), and the end; a gateway subscribing after the run reads that the line stopped."""
    from paho.mqtt.client import CallbackAPIVersion, Client

    def subscriber(into: list[dict]) -> Client:
        client = Client(CallbackAPIVersion.VERSION2)
        client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{TOPIC}/health", qos=1)
        client.on_message = lambda c, u, message: into.append(json.loads(message.payload) | {"_r": message.retain})
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        return client

    messages: list[dict] = []
    client = subscriber(messages)
    wait_until(lambda: client.is_connected(), 10, "the subscriber")
    frames = [belt_part(400 + i, light=1.5 if SEGMENT <= i < 2 * SEGMENT else 1.0) for i in range(3 * SEGMENT)]
    records, output = judge(lossless_video(tmp_path / "lamp.avi", frames), belt_model, tmp_path, "--mqtt", broker.url())
    assert "latency     capture -> mqtt publish: p50 " in output and f"({len(frames)} frames)" in output
    states = [[]]  # the start: nothing in force
    for record in records:
        if record["health"]["problems"] != states[-1]:
            states.append(record["health"]["problems"])
    wait_until(lambda: messages and messages[-1]["running"] is False, 10, "the final status message")
    client.disconnect()
    client.loop_stop()
    assert [[p["code"] for p in m["sources"][0]["problems"]] for m in messages] == states + [states[-1]]
    assert [m["running"] for m in messages] == [True] * len(states) + [False]
    assert any("over-exposed" in state for state in states) and states[-1] == []
    late: list[dict] = []
    client = subscriber(late)
    wait_until(lambda: late, 10, "the retained status")
    client.disconnect()
    client.loop_stop()
    assert late == [messages[-1] | {"_r": True}]
