"""The station's web server: the page and its JSON API, from the standard library's ``ThreadingHTTPServer``.

No web framework: a handful of routes, plain HTML and JavaScript served from the package, nothing more to install
on a line PC. Each request runs in its own thread; the judging thread never serves one.

Access: bound to the loopback (the default, 127.0.0.1) the page is open to whoever is on that machine. Bound to
any other address a token is required (``token``): from a page's first visit (``/?token=...``, which sets a
same-site cookie), or the ``X-Station-Token`` header. A state-changing request must be JSON (a form on another
site cannot send one without the browser asking first), and on the loopback the ``Host`` must be a loopback name
(a DNS-rebinding page cannot talk to it).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
import threading
import traceback
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs, urlsplit

from ...errors import ProtoADError

COOKIE = "protoad_station_token"
TOKEN_HEADER = "X-Station-Token"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/station.js": ("station.js", "text/javascript"),
    "/station.css": ("station.css", "text/css"),
}
LOOPBACK_NAMES = ("localhost",)
MAX_BODY = 64 * 1024


class App(Protocol):
    """What the routes ask of the station (``station.Station``)."""

    def status(self) -> dict[str, Any]: ...

    def live(self, lane: int, width: int) -> tuple[dict[str, Any], bytes] | None: ...

    def gallery(self, query: dict[str, str]) -> dict[str, Any]: ...

    def frame(self, frame_id: int) -> dict[str, Any] | None: ...

    def picture(self, frame_id: int, kind: str) -> tuple[bytes, str] | None: ...

    def actions(self) -> dict[str, Any]: ...

    def review(self) -> dict[str, Any]: ...

    def post(self, action: str, body: dict[str, Any], address: str) -> dict[str, Any]: ...


def parse_bind(text: str) -> tuple[str, int]:
    """``--station HOST:PORT`` (or ``PORT``: the loopback) -> (host, port); port 0 picks a free one."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ProtoADError(f"bad --station {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8080) or PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StationServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], app: App, token: str | None) -> None:
        host, port = bind
        self.app, self.token, self.loopback = app, token, is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as exc:
            raise ProtoADError(f"--station {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
        self._thread = threading.Thread(target=self.serve_forever, name="protoad-station-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


Route = Callable[["Handler", re.Match[str], dict[str, str]], None]


class Handler(BaseHTTPRequestHandler):
    server: StationServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # a page polling every second would flood the run's log

    # ------------------------------------------------------------------ access

    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _presented_token(self) -> str | None:
        header = self.headers.get(TOKEN_HEADER)
        if header:
            return header
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie:
            return cookie[COOKIE].value
        return self._query().get("token")

    def _allowed(self) -> bool:
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if not is_loopback(host):
                self._send_text(HTTPStatus.FORBIDDEN, f"the station answers only to a loopback name, not {host!r}")
                return False
        token = self.server.token
        if token is None:
            return True
        presented = self._presented_token()
        if presented is not None and hmac.compare_digest(presented.encode(), token.encode()):
            return True
        self._send_text(HTTPStatus.UNAUTHORIZED, "token required: open the station's URL with ?token=TOKEN")
        return False

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: object, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        try:
            for pattern, route in GET_ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    route(self, match, self._query())
                    return
            self._send_text(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        except ProtoADError as exc:
            self._send_text(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802
        if not self._allowed():
            return
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._send_text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send_text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ProtoADError("send a JSON object")
            match = re.fullmatch(r"/api/(?P<action>[a-z-]+)", urlsplit(self.path).path)
            if match is None:
                self._send_text(HTTPStatus.NOT_FOUND, f"no such action: {self.path}")
                return
            self._send_json(self.server.app.post(match["action"], body, self.client_address[0]))
        except json.JSONDecodeError:
            self._send_text(HTTPStatus.BAD_REQUEST, "the request is not valid JSON")
        except ProtoADError as exc:
            self._send_json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # a bug in an action: the page gets an answer, the run goes on, stderr the trace
            traceback.print_exc()
            error = f"internal error ({type(exc).__name__}: {exc})"
            self._send_json({"error": error}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def page(self, match: re.Match[str], query: dict[str, str]) -> None:
        name, content_type = STATIC[match[0]]
        body = resources.files(__package__).joinpath("page", name).read_bytes()
        headers = {}
        token = query.get("token")
        if match[0] == "/" and token is not None and self.server.token is not None:
            headers["Set-Cookie"] = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
        self._send(HTTPStatus.OK, body, content_type, headers)

    def status(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._send_json(self.server.app.status())

    def live(self, match: re.Match[str], query: dict[str, str]) -> None:
        got = self.server.app.live(int(match["lane"]), _int(query, "width", 640))
        if got is None:
            self._send_text(HTTPStatus.NOT_FOUND, "no frame judged yet")
            return
        facts, picture = got
        self._send(HTTPStatus.OK, picture, "image/jpeg", {f"X-Frame-{k}": str(v) for k, v in facts.items()})

    def gallery(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._send_json(self.server.app.gallery(query))

    def actions(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._send_json(self.server.app.actions())

    def review(self, match: re.Match[str], query: dict[str, str]) -> None:
        self._send_json(self.server.app.review())

    def frame(self, match: re.Match[str], query: dict[str, str]) -> None:
        found = self.server.app.frame(int(match["id"]))
        if found is None:
            self._send_text(HTTPStatus.NOT_FOUND, f"no judged frame {match['id']}")
        else:
            self._send_json(found)

    def picture(self, match: re.Match[str], query: dict[str, str]) -> None:
        got = self.server.app.picture(int(match["id"]), match["kind"])
        if got is None:
            self._send_text(HTTPStatus.NOT_FOUND, f"frame {match['id']} has no {match['kind']} kept")
        else:
            self._send(HTTPStatus.OK, got[0], got[1])


def _int(query: dict[str, str], key: str, default: int) -> int:
    value = query.get(key, "")
    if not value:
        return default
    if not value.lstrip("-").isdigit():
        raise ProtoADError(f"{key} must be a whole number, not {value!r}")
    return int(value)


GET_ROUTES: list[tuple[re.Pattern[str], Route]] = [
    (re.compile(r"/|/station\.js|/station\.css"), Handler.page),
    (re.compile(r"/api/status"), Handler.status),
    (re.compile(r"/api/live/(?P<lane>\d+)\.jpg"), Handler.live),
    (re.compile(r"/api/gallery"), Handler.gallery),
    (re.compile(r"/api/actions"), Handler.actions),
    (re.compile(r"/api/review"), Handler.review),
    (re.compile(r"/api/frames/(?P<id>\d+)"), Handler.frame),
    (re.compile(r"/api/frames/(?P<id>\d+)/(?P<kind>frame|mask|overlay)"), Handler.picture),
]
