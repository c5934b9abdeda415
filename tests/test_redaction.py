"""No secret in any output: a camera's URL carries its password (OpenCV's FFmpeg backend takes credentials only
there), so a source is named everywhere by ``redact``'s text and only the capture opens the real URL.

End to end, protoad-run judges a real MJPEG stream on 127.0.0.1 that demands HTTP basic authentication, through
an outage (reconnect lines), and every output is searched for the password: stdout, stderr, the JSON lines, the
masks' names and bytes, the saved video, the preview, the summary."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from bench_outage import free_port
from mjpeg_server import frame

from protoad_edge.errors import ProtoADError
from protoad_edge.redact import redact
from protoad_edge.runtime.sources.source import open_source, parse_source

PASSWORD = "s3cret"

CASES = {
    # what the user typed -> how every output shows it
    "rtsp://admin:s3cret@10.0.0.5/live": "rtsp://admin:***@10.0.0.5/live",
    "rtsp://admin:s3cret@10.0.0.5:554/Streaming/Channels/101": "rtsp://admin:***@10.0.0.5:554/Streaming/Channels/101",
    "rtsps://admin:p@ss@cam.local/x": "rtsps://admin:***@cam.local/x",  # an unencoded '@': FFmpeg's last-'@' split
    "http://user:s3cret@127.0.0.1:8080/stream.mjpg": "http://user:***@127.0.0.1:8080/stream.mjpg",
    "https://user:s3cret@cam.example.com": "https://user:***@cam.example.com",
    "http://user:@cam/x": "http://user:***@cam/x",
    "https://ghp_abc123@cam.example.com/feed": "https://***@cam.example.com/feed",  # a lone user part may be a token
    "rtsp://10.0.0.5:554/live": "rtsp://10.0.0.5:554/live",
    "https://cam.local/mjpg?fps=5&size=640": "https://cam.local/mjpg?fps=5&size=640",
    "http://cam/video.cgi?user=admin&pwd=s3cret": "http://cam/video.cgi?user=admin&pwd=***",
    "http://cam/video.cgi?PASSWORD=s3cret&fps=5": "http://cam/video.cgi?PASSWORD=***&fps=5",
    "http://cam/v?passwd=s3cret;pass=s3cret": "http://cam/v?passwd=***;pass=***",
    "https://cam/v?access_token=s3cret&api_key=s3cret": "https://cam/v?access_token=***&api_key=***",
    "https://cam/v?Secret=s3cret&auth=s3cret&Authorization=s3cret": "https://cam/v?Secret=***&auth=***&Authorization=***",
    "https://cam/v?client_secret=s3cret#top": "https://cam/v?client_secret=***#top",
    "rtspsrc location=rtsp://u:s3cret@cam/x user-id=u user-pw=s3cret ! decodebin ! appsink": "rtspsrc "
    "location=rtsp://u:***@cam/x user-id=u user-pw=*** ! decodebin ! appsink",
    'souphttpsrc location=http://cam/x proxy-pw="s3 cret" ! appsink': (
        "souphttpsrc location=http://cam/x proxy-pw=*** ! appsink"
    ),
    "0": "0",
    "camera2": "camera2",
    "csi0": "csi0",
    "/home/line3/videos/shift 2.mp4": "/home/line3/videos/shift 2.mp4",
    "/data/parts/part@2x.png": "/data/parts/part@2x.png",
    r"C:\Users\line3\Videos\shift 2.mp4": r"C:\Users\line3\Videos\shift 2.mp4",
    r"D:\parts\key frames\0001.png": r"D:\parts\key frames\0001.png",
}


@pytest.mark.parametrize("typed", list(CASES), ids=list(CASES))
def test_redact(typed: str) -> None:
    assert redact(typed) == CASES[typed]
    assert redact(CASES[typed]) == CASES[typed]  # applying it twice changes nothing


def test_a_stream_is_named_by_its_redacted_url_and_opened_with_the_real_one(tmp_path: Path) -> None:
    url = "rtsp://admin:s3cret@10.0.0.5:554/live?token=s3cret"
    spec = parse_source(url)
    assert spec.name == "rtsp://admin:***@10.0.0.5:554/live?token=***" and spec.target == url
    assert PASSWORD not in repr(spec)  # a dataclass repr in a traceback or a debug line
    opened: list[object] = []
    source = open_source(spec, open_capture=lambda target, api: opened.append(target) or Opened())
    assert opened == [url] and source.name == spec.name  # only the capture sees the password
    assert source.read()[1] == spec.name  # each frame's label: the records' "source"
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    assert parse_source(str(video)).name == str(video)  # a file is named by its path, unchanged


def test_error_lines_never_quote_the_password() -> None:
    with pytest.raises(ProtoADError) as caught:  # an FFmpeg protocol OpenCV may take, not one we know: a path
        parse_source("srt://user:s3cret@10.0.0.5:9000")
    assert str(caught.value).startswith("source not found: srt://user:***@10.0.0.5:9000")

    def noisy(target: object, api: int) -> Closed:
        os.write(2, f"[http @ 0x55d0c8a0] Cannot open {target}: HTTP error 401 Unauthorized\n".encode())
        return Closed()

    for typed, shown in (
        ("http://user:s3cret@10.0.0.5/x", "stream http://user:***@10.0.0.5/x"),
        (
            "rtspsrc location=rtsp://u:s3cret@cam/x user-pw=s3cret ! appsink",
            "GStreamer pipeline rtspsrc location=rtsp://u:***@cam/x user-pw=*** ! appsink",
        ),
    ):
        with pytest.raises(ProtoADError) as caught:
            open_source(typed, open_capture=noisy)
        message = str(caught.value)
        assert message.startswith(f"cannot open {shown}") and PASSWORD not in message, message
        assert "(OpenCV's backend: Cannot open " in message and "HTTP error 401 Unauthorized)" in message


class Opened:
    """A capture that opens and delivers black frames."""

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 0.0

    def read(self) -> tuple[bool, np.ndarray]:
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        pass


class Closed(Opened):
    def isOpened(self) -> bool:
        return False


# --- end to end: a camera that demands a password ------------------------------------------------------------


class AuthMjpegServer:
    """An MJPEG camera on 127.0.0.1 behind HTTP basic authentication (user ``user``, password ``s3cret``), like many
    IP cameras: 401 with a challenge without the right credentials, else benchmarks/mjpeg_server.py's frames at
    25 frames/s. ``stop`` takes it down (streams cut, port closed) and ``start`` brings it back on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frames = 0  # sent to an authenticated client
        self.authorized = 0  # streams opened with the right credentials
        self.refused = 0
        self._down = threading.Event()
        self._server: socketserver.TCPServer | None = None

    def start(self) -> AuthMjpegServer:
        camera = self
        expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()

        class Stream(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != expected:
                    camera.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                camera.authorized += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not camera._down.is_set():
                        jpg = cv2.imencode(".jpg", frame(camera.frames))[1].tobytes()
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                            + jpg
                            + b"\r\n"
                        )
                        camera.frames += 1
                        time.sleep(0.04)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._down.clear()
        self._server = Server(("127.0.0.1", self.port), Stream)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._down.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def protoad_run(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from protoad_edge.cli.run import main; main()", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_no_output_of_a_run_holds_the_password(tiny_model: Path, tmp_path: Path) -> None:
    camera = AuthMjpegServer(free_port()).start()
    url = f"http://user:{PASSWORD}@127.0.0.1:{camera.port}/stream.mjpg"
    shown = f"http://user:***@127.0.0.1:{camera.port}/stream.mjpg"
    out = tmp_path / "out"
    run = protoad_run(
        url,
        "--model",
        tiny_model,
        "--threshold",
        "0",
        "--max-frames",
        "40",
        "--status-every",
        "0.2",
        "--reconnect-timeout",
        "30",
        "--jsonl",
        out / "run.jsonl",
        "--save",
        out / "line.mp4",
        "--save-masks",
        out / "masks",
    )
    try:
        wait_for(lambda: camera.frames >= 15)
        camera.stop()  # the camera goes away mid-run: the reconnect lines name the source too
        time.sleep(1.0)
        camera.start()
        stdout, stderr = run.communicate(timeout=120)
        preview = protoad_run(url, "--model", tiny_model, "--preview", out / "roi.png")
        preview_out, preview_err = preview.communicate(timeout=60)
    finally:
        run.kill()
        camera.stop()
    assert run.returncode == 0, stderr
    assert preview.returncode == 0, preview_err
    assert camera.authorized >= 3 and camera.refused >= 1  # the password reached the camera, and only it
    records = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    assert len(records) == 40 and {r["source"] for r in records} == {shown}
    assert f"source      {shown} (max frames)" in stdout and "1 reconnects" in stdout
    assert f"{shown}: frames again after" in stderr and any(line.startswith("status: ") for line in stderr.splitlines())
    files = sorted(p for p in out.rglob("*"))
    assert {p.name for p in files} >= {"run.jsonl", "line.mp4", "masks", "roi.png", "000000.png"}
    assert len(list((out / "masks").iterdir())) == 40  # threshold 0: a mask per frame
    for text in (stdout, stderr, preview_out, preview_err):
        assert PASSWORD not in text
    for path in files:
        assert PASSWORD not in str(path.relative_to(tmp_path))
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nothing listens", "wrong password"])
def test_a_stream_that_cannot_open_is_named_without_its_password(case: str, tiny_model: Path, tmp_path: Path) -> None:
    camera = AuthMjpegServer(free_port()).start()
    port = free_port() if case == "nothing listens" else camera.port
    password = "wr0ngpass" if case == "wrong password" else PASSWORD
    try:
        run = protoad_run(
            f"http://user:{password}@127.0.0.1:{port}/stream.mjpg",
            "--model",
            tiny_model,
            "--jsonl",
            tmp_path / "run.jsonl",
        )
        stdout, stderr = run.communicate(timeout=60)
    finally:
        camera.stop()
    assert run.returncode == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot open stream http://user:***@127.0.0.1:{port}/")
    assert password not in stdout + stderr
    assert camera.authorized == 0 and (camera.refused > 0) == (case == "wrong password")
    assert list(tmp_path.iterdir()) == []
