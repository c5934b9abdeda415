"""What the station tests share: a live camera the test steers (an MJPEG stream on 127.0.0.1), a real
``protoad-run`` started as a process with its station URL read from its log, the station database read back, and
a headless Chromium driven by Selenium."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def wait_until(condition: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> object:
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


class Camera:
    """An MJPEG stream at ``fps`` whose frames ``draw(index)`` makes (RGB); ``frames_served`` counts them."""

    def __init__(self, draw: Callable[[int], np.ndarray], fps: float = 10.0) -> None:
        self.draw, self.fps = draw, fps
        self.frames_served = 0
        camera = self

        class Stream(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                index = 0
                try:
                    while not camera.closed:
                        started = time.monotonic()
                        bgr = cv2.cvtColor(camera.draw(index), cv2.COLOR_RGB2BGR)
                        jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                            + jpg
                            + b"\r\n"
                        )
                        camera.frames_served += 1
                        index += 1
                        time.sleep(max(0.0, 1.0 / camera.fps - (time.monotonic() - started)))
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, *args: object) -> None:
                pass

        self.closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"

    def close(self) -> None:
        self.closed = True
        self.server.shutdown()
        self.server.server_close()


class RunProcess:
    """``protoad-run ARGS`` as a process (stderr kept in ``log``); ``url`` is its station's, once it serves."""

    def __init__(
        self,
        args: list[str],
        folder: Path,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from protoad_edge.cli.run import main; main()", *args],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            preexec_fn=preexec,
        )
        self.stdout = ""
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = self.process.stdout.read()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def url(self, timeout: float = 60) -> str:
        def found() -> str | None:
            assert self.process.poll() is None or any("station:" in line for line in self.lines), self.log
            return next((m.group(1) for line in self.lines if (m := re.search(r"station: (http://\S+)", line))), None)

        return str(wait_until(found, timeout, "the station's URL in the log"))

    def wait(self, timeout: float = 120) -> int:
        """The exit status, once the process ended (its stdout in ``stdout``, its stderr all in ``lines``)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def rows(db: Path, sql: str = "SELECT * FROM frames ORDER BY id", args: tuple = ()) -> list[dict]:
    """Rows of the station database ``db``, read as any other reader would (a new connection)."""
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql, args)]


@pytest.fixture
def browser():
    """A headless Chromium (Debian's chromium and chromium-driver) driven by Selenium."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
