"""The line station's cost and the line's end-to-end latency (issue 28).

    python benchmarks/bench_station.py --rounds 3 --write

1. Speed: protoad-run (a subprocess, as on a line) judges the same 1280x720 video, in turns: plain (JSON lines
   only), and with the station (--db --station) while a client does what an open page does (the live view at
   --live-rate pictures/s, 960 px wide; the status every second; the gallery twice a second). The frames/s are the
   runs' own summaries; medians of --rounds runs each. Goal: the station costs at most 5 %.
2. Latency: a live 1280x720 MJPEG camera at --camera-fps (paced, so frames do not wait in a file's read-ahead),
   judged with --mqtt to a real mosquitto on 127.0.0.1 and the station open: the run's summary gives capture ->
   MQTT publish, -> station and -> database (the gallery); a subscriber beside it measures capture -> received
   (the record's capture timestamp against its arrival, one clock). p50 / p95 / p99 and jitter (p99 - p50).

The model is tests/conftest.py's ``make_bundle`` at the paper's input size (crop 224, K --k, random weights):
speed and latency depend on the network's shape, not its weights. About 5 % of the video's frames are made
anomalous by the threshold (the 95th percentile of its scores), so the database keeps pictures as a line would.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from bench_common import command_line, machine_text, update_results  # noqa: E402

SIZE = (1280, 720)
LATENCY_LINE = re.compile(
    r"latency     capture -> (.+?): p50 ([\d.]+) ms, p95 ([\d.]+) ms, p99 ([\d.]+) ms, "
    r"jitter ([\d.]+) ms \(([\d,]+) frames\)"
)


def line_frame(index: int) -> np.ndarray:
    """A demo part on a belt, in a 1280x720 frame (RGB)."""
    from protoad_edge.builder.demo import demo_image

    rng = np.random.default_rng([5, index])
    frame = np.clip(50 + rng.normal(0, 5, (SIZE[1], SIZE[0], 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    part = cv2.resize(demo_image("test/good" if index % 20 else "test/scratch", index)[1], (512, 512))
    frame[104:616, 384:896] = part
    return frame


def write_video(path: Path, count: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, SIZE)
    for i in range(count):
        writer.write(cv2.cvtColor(line_frame(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def protoad_run(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from protoad_edge.cli.run import main; main()", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Page(threading.Thread):
    """What an open station page asks for, at its rates, until ``stop``."""

    def __init__(self, url: str, live_rate: float) -> None:
        super().__init__(daemon=True)
        self.url, self.live_rate = url, live_rate
        self.stop = threading.Event()
        self.seen: set[str] = set()  # the live pictures' sequence numbers: each new one is a picture drawn

    def run(self) -> None:
        due = {"live": 0.0, "status": 0.0, "gallery": 0.0}
        every = {"live": 1.0 / self.live_rate, "status": 1.0, "gallery": 0.5}
        paths = {"live": "api/live/0.jpg?width=960", "status": "api/status", "gallery": "api/gallery?limit=24"}
        while not self.stop.is_set():
            now = time.monotonic()
            for name, when in due.items():
                if now >= when:
                    try:
                        with urllib.request.urlopen(self.url + paths[name], timeout=5) as response:
                            response.read()
                            if name == "live":
                                self.seen.add(response.headers["X-Frame-Seq"])
                    except OSError:
                        pass
                    due[name] = now + every[name]
            self.stop.wait(max(0.0, min(due.values()) - time.monotonic()))


def one_run(
    video: Path, model: Path, threshold: float, station: bool, live_rate: float, folder: Path
) -> tuple[float, float]:
    """(frames/s from the run's summary, live pictures/s the page got)."""
    args = [
        str(video),
        "--model",
        str(model),
        "--threshold",
        str(threshold),
        "--status-every",
        "0",
        "--jsonl",
        "run.jsonl",
    ]
    if station:
        for old in folder.glob("station.db*"):
            subprocess.run(["rm", "-rf", str(old)], check=True)
        args += ["--db", "station.db", "--station", "127.0.0.1:0"]
    process = protoad_run(args, folder)
    page = None
    assert process.stderr is not None
    log = []
    for line in process.stderr:
        log.append(line)
        found = re.search(r"station: (http://\S+)", line)
        if found and page is None:
            page = Page(found.group(1), live_rate)
            page.start()
    out, _ = process.communicate()
    if page is not None:
        page.stop.set()
        page.join()
    if process.returncode != 0:
        raise SystemExit("".join(log) + out)
    fps, seconds = judging_rate(folder / "run.jsonl")
    return fps, len(page.seen) / seconds if page is not None else 0.0


def judging_rate(jsonl: Path) -> tuple[float, float]:
    """(frames/s, seconds) of a file source's judging, from its records' capture times: the reader keeps
    FILE_QUEUE frames ahead, so from then on each frame is read as soon as the one judged FILE_QUEUE + 1 before it
    leaves the queue. (The summary's mean FPS has one decimal: too coarse to compare two runs by a few %.)"""
    from protoad_edge.runtime.sources.capture import FILE_QUEUE

    times = [json.loads(line)["timestamp"] for line in jsonl.read_text().splitlines()]
    seconds = times[-1] - times[FILE_QUEUE]
    return (len(times) - 1 - FILE_QUEUE) / seconds, seconds


def threshold_for(video: Path, model: Path) -> float:
    """The 95th percentile of the video's scores: about 5 % of its frames anomalous."""
    from protoad_edge.runtime.backends.ort import OrtBackend
    from protoad_edge.runtime.loop import RunOptions, run

    scores: list[float] = []
    run(
        str(video),
        OrtBackend(model, providers=["CPUExecutionProvider"]),
        RunOptions(threshold=1e9, status_every=0, log=lambda m: None, on_frame=lambda r: scores.append(r.score)),
    )
    return float(np.percentile(scores, 95))


def speed(model: Path, frames: int, rounds: int, live_rate: float, folder: Path) -> dict:
    video = write_video(folder / "line.avi", frames)
    threshold = threshold_for(video, model)
    fps: dict[str, list[float]] = {"plain": [], "station": []}
    pictures: list[float] = []
    for r in range(rounds):
        for name in ["plain", "station"] if r % 2 == 0 else ["station", "plain"]:
            got, shown = one_run(video, model, threshold, name == "station", live_rate, folder)
            fps[name].append(got)
            if name == "station":
                pictures.append(shown)
            print(
                f"round {r + 1}: {name} {got:.3f} FPS" + (f", {shown:.2f} live pictures/s" if shown else ""), flush=True
            )
    return {
        "fps": fps,
        "medians": {k: statistics.median(v) for k, v in fps.items()},
        "pictures": statistics.median(pictures),
    }


def latency(model: Path, seconds: float, camera_fps: float, folder: Path) -> dict:
    from mqtt_helpers import TOPIC, Broker
    from paho.mqtt.client import CallbackAPIVersion, Client
    from station_helpers import Camera

    pictures = [line_frame(i) for i in range(40)]
    camera = Camera(lambda i: pictures[i % len(pictures)], fps=camera_fps)
    broker_folder = folder / "broker"
    broker_folder.mkdir(exist_ok=True)
    broker = Broker(broker_folder)
    broker.start()
    received: list[float] = []
    subscriber = Client(CallbackAPIVersion.VERSION2)
    subscriber.on_connect = lambda c, u, f, r, p: c.subscribe(TOPIC, qos=1)
    subscriber.on_message = lambda c, u, m: received.append(time.time() - json.loads(m.payload)["timestamp"])
    subscriber.connect("127.0.0.1", broker.port)
    subscriber.loop_start()
    time.sleep(1.0)
    process = protoad_run(
        [
            camera.url,
            "--model",
            str(model),
            "--mqtt",
            broker.url(),
            "--db",
            "latency.db",
            "--station",
            "127.0.0.1:0",
            "--status-every",
            "0",
        ],
        folder,
    )
    try:
        time.sleep(seconds)
        process.terminate()
        out, err = process.communicate(timeout=60)
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
        broker.stop()
        camera.close()
    legs = {
        m.group(1): [float(m.group(i)) for i in range(2, 6)] + [int(m.group(6).replace(",", ""))]
        for m in LATENCY_LINE.finditer(out)
    }
    ms = np.asarray(received) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    legs["mqtt subscriber (received)"] = [p50, p95, p99, p99 - p50, len(ms)]
    return {"legs": legs, "summary": out}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=150, help="frames of the speed video")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--live-rate", type=float, default=5.0, help="live pictures per second the page asks for")
    parser.add_argument(
        "--camera-fps",
        type=float,
        default=0.0,
        help="frames/s of the latency run's camera (default: 0.6 x the station run's frames/s)",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the latency run judges the camera")
    parser.add_argument("--write", action="store_true", help="put the figures in benchmarks/RESULTS.md")
    args = parser.parse_args(argv[1:])

    from conftest import make_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_bundle(folder / "model", name="line", crop=224, resize=256, k=args.k)
        fast = speed(model, args.frames, args.rounds, args.live_rate, folder)
        # a line that keeps up: frames come slower than they are judged, so none waits behind another
        camera_fps = args.camera_fps or round(0.6 * fast["medians"]["station"], 2)
        slow = latency(model, args.seconds, camera_fps, folder)
    plain, station = fast["medians"]["plain"], fast["medians"]["station"]
    cost = 100.0 * (1 - station / plain)
    lines = [
        "## The line station: its cost, and the line's end-to-end latency (issue 28)",
        "",
        f"Command: `{command_line(argv)}`",
        "",
        f"Machine: {machine_text()}",
        "",
        f"Model: crop 224, K {args.k}, random weights (onnxruntime CPU). Speed: a {args.frames}-frame 1280x720 video "
        f"judged in turns, plain (--jsonl) and with the station (--db --station) while a client asks what an open "
        f"page asks (the live view {args.live_rate:g}/s at 960 px, the status 1/s, the gallery 2/s); about 5 % of "
        "the frames anomalous (their pictures kept). Frames/s from each run's records (capture times past the reader's "
        "read-ahead), medians of the rounds.",
        "",
        "| run | frames/s (each round) | median | vs plain |",
        "| --- | --- | ---: | ---: |",
        f"| plain | {', '.join(f'{v:.3f}' for v in fast['fps']['plain'])} | {plain:.3f} | 1.000x |",
        f"| station + page | {', '.join(f'{v:.3f}' for v in fast['fps']['station'])} | {station:.3f} | "
        f"{station / plain:.3f}x |",
        "",
        f"The station costs {cost:.1f} % of the frames/s (goal: at most 5 %): " + ("pass." if cost <= 5.0 else "FAIL."),
        "",
        f"The page asked for {args.live_rate:g} live pictures/s and got {fast['pictures']:.2f} new ones/s (median): "
        "the live view draws within its CPU budget (runtime/station/live.py), so a slow machine lowers the page's "
        "rate, not the line's.",
        "",
        f"Latency: a live 1280x720 MJPEG camera at {camera_fps:g} frames/s (below the judging rate, so no frame "
        f"waits behind another) judged for {args.seconds:g} s with "
        "--mqtt (a real mosquitto on 127.0.0.1), --db and --station; legs from the run's summary, and a subscriber's "
        "receipt of each record (its capture timestamp against the arrival, one clock).",
        "",
        "| capture -> | p50 ms | p95 ms | p99 ms | jitter (p99 - p50) ms | frames |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| {leg} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[3]:.1f} | {int(v[4]):,} |"
            for leg, v in slow["legs"].items()
        ],
        "",
        f"Measured {time.strftime('%Y-%m-%d')}.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        print(f"\nwrote {update_results('station', body)}")


if __name__ == "__main__":
    main(sys.argv)
