"""A live MJPEG stream over HTTP on 127.0.0.1, the way many IP cameras serve one: for outage tests.

``python mjpeg_server.py PORT [FPS]`` serves ``http://127.0.0.1:PORT/stream.mjpg`` until killed: 160x120
frames of a smooth 'part' whose brightness carries the frame count, at FPS (default 25).
"""

from __future__ import annotations

import http.server
import socketserver
import sys
import time

import cv2
import numpy as np


def frame(index: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = 110 + 50 * np.sin(2 * np.pi * (xx / width + yy / (2 * height))) + (index % 20)
    return np.clip(np.repeat(base[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def serve(port: int, fps: float = 25.0) -> None:
    class Stream(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            index = 0
            try:
                while True:
                    jpg = cv2.imencode(".jpg", frame(index))[1].tobytes()
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg))
                    self.wfile.write(jpg + b"\r\n")
                    index += 1
                    time.sleep(1.0 / fps)
            except (BrokenPipeError, ConnectionResetError):
                return

        def log_message(self, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    Server(("127.0.0.1", port), Stream).serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 25.0)
