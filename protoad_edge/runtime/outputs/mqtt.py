"""Verdicts to the plant over MQTT: each judged frame's JSON record, QoS 1, to an MES or PLC gateway.

A broker outage must never stall inspection, so ``write`` only appends to a bounded buffer of messages
not yet acknowledged (when it overflows the oldest is dropped, and counted). A sender thread hands them
to paho in order, at most ``INFLIGHT`` awaiting their PUBACK at a time, while connected.

The buffer, not paho, is the record of what is owed. paho (2.x) does resend the unacknowledged messages
it was handed once it reconnects, but from a queue of its own that has no bound of ours and cannot drop
the oldest. So on every (re)connect paho's leftovers are discarded (``drop_out_messages``) and everything
still in the buffer is published again from the oldest: an outage loses nothing within the bound and
keeps the order. A message whose PUBACK was lost with the connection may arrive twice (QoS 1 is at least
once: a duplicate is the same bytes, the same source, frame and timestamp), but each message is counted
once: delivered (PUBACK), spooled, queued (owed at the end and not spooled) or dropped.

What is still owed when the run ends (after up to ``drain_timeout`` waiting for PUBACKs) goes to the
spool (``spool.Spool``), which the next sink for the same broker and topic loads and sends first.

Locking: paho calls ``on_publish`` holding its own message lock, so ``_state`` is never held while
calling into paho (the reverse order could deadlock). ``_send_lock`` makes each publish and the record
of its message id one step that a reconnect's reset cannot split.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from ...errors import ProtoADError
from ...redact import redact
from ..latency import Latencies
from ..result import FrameResult
from .sinks import Sink
from .spool import Spool

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
INFLIGHT = 20  # messages awaiting their PUBACK on one connection (paho's own default window)
KEEPALIVE_S = 15  # a silently dead link is noticed within about 1.5 times this
URL_FORM = "mqtt[s]://HOST[:PORT]/TOPIC"
PASSWORD_ENV = "PROTOAD_MQTT_PASSWORD"
EXIT_UNDELIVERED = 75  # sysexits' EX_TEMPFAIL: some records did not reach the broker; try again later
AUTH_REFUSALS = ("Bad user name or password", "Not authorized")  # CONNACK reasons that mean the credentials


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BrokerUrl(NamedTuple):
    host: str
    port: int
    topic: str
    tls: bool  # mqtts://


def parse_mqtt_url(url: str) -> BrokerUrl:
    """``mqtt[s]://HOST[:PORT]/TOPIC`` -> BrokerUrl; the topic may contain ``/`` but no wildcard."""

    def bad(why: str) -> ProtoADError:
        return ProtoADError(f"bad MQTT URL {redact(url)!r}: {why} (expected {URL_FORM})")

    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise bad("it must start with mqtt:// or mqtts://")
    if parts.username is not None:
        raise bad(
            f"a URL is no place for credentials (ps shows them): give --mqtt-user, and the password in "
            f"{PASSWORD_ENV} or --mqtt-password-file"
        )
    if "#" in url or "+" in parts.path or "?" in url:
        raise bad("a topic to publish to cannot contain '#', '+' or '?'")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise bad("the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise bad("no host")
    topic = parts.path[1:]
    if not topic:
        raise bad("no topic")
    return BrokerUrl(parts.hostname, port or DEFAULT_PORTS[parts.scheme], topic, parts.scheme == "mqtts")


@dataclass(frozen=True)
class BrokerAccess:
    """Who the sink is to the broker and how it trusts the broker. The password has no repr: it never shows
    in a log line or a traceback."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None  # CA file the broker's certificate must chain to (None: the system's CAs)
    cert: Path | None = None  # client certificate (and key, unless ``key``), for brokers that require one
    key: Path | None = None
    insecure: bool = False  # do not verify the broker's certificate

    @classmethod
    def from_options(
        cls,
        user: str | None = None,
        password_file: Path | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        insecure: bool = False,
        environ: Mapping[str, str] = os.environ,
    ) -> BrokerAccess:
        """The CLI's options: the password from ``password_file`` (its first line), else from ``PASSWORD_ENV``."""
        password = None
        if password_file is not None:
            if user is None:
                raise ProtoADError("--mqtt-password-file needs --mqtt-user")
            try:
                lines = Path(password_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ProtoADError(
                    f"cannot read --mqtt-password-file {password_file}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
            if not lines or not lines[0]:
                raise ProtoADError(f"--mqtt-password-file {password_file}: its first line is empty")
            password = lines[0]
        elif user is not None:
            password = environ.get(PASSWORD_ENV) or None
        if key is not None and cert is None:
            raise ProtoADError("--mqtt-key needs --mqtt-cert (the client certificate it belongs to)")
        return cls(user, password, ca, cert, key, insecure)

    def tls_context(self, broker: BrokerUrl) -> ssl.SSLContext | None:
        """The TLS settings of ``broker`` (None for mqtt://); files that cannot be used fail here, naming the flag."""
        if not broker.tls:
            if self.ca or self.cert or self.insecure:
                raise ProtoADError("--mqtt-ca, --mqtt-cert and --mqtt-insecure are TLS settings: use an mqtts:// URL")
            return None

        def unusable(flag: str, path: Path | None, exc: OSError) -> ProtoADError:
            return ProtoADError(f"cannot use {flag} {path}: {exc.strerror or exc}")

        try:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except OSError as exc:  # ssl.SSLError is an OSError
            raise unusable("--mqtt-ca", self.ca, exc) from None
        if self.cert is not None:
            try:
                context.load_cert_chain(self.cert, self.key)
            except OSError as exc:
                flags = "--mqtt-cert" if self.key is None else "--mqtt-cert/--mqtt-key"
                raise unusable(flags, self.cert, exc) from None
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _why(exc: OSError) -> str:
    """A failed connection attempt in a few words (a certificate's problem, not just 'SSL error')."""
    verify = getattr(exc, "verify_message", None)
    return f"TLS certificate verify failed: {verify}" if verify else exc.strerror or str(exc)


@functools.cache
def _client_class() -> type:
    """paho's Client, remembering why its last connection attempt failed (paho's ``on_connect_fail`` is not told).
    Built on first use, as paho is optional: ImportError without it."""
    from paho.mqtt.client import Client

    class RecordingClient(Client):  # type: ignore[misc]
        failure = ""

        def reconnect(self) -> Any:
            try:
                return super().reconnect()
            except OSError as exc:
                self.failure = _why(exc)
                raise

    return RecordingClient


class MqttSink(Sink):
    """Publishes each frame's JSON record (QoS 1) to one topic, or only the anomalous ones.

    ``buffer`` bounds the messages not yet acknowledged; ``drain_timeout`` is how long ``close`` waits for
    them; ``max_backoff`` caps the pause between reconnect attempts (1 s, doubling). With ``spool`` (a folder)
    what an earlier run left there for this broker and topic is sent first, and what is owed at ``close``
    is left there. The counts ``delivered``, ``queued``, ``spooled`` and ``dropped`` are final once ``close``
    returned; they add up to ``from_spool`` + ``written``.
    """

    def __init__(
        self,
        url: str,
        anomalies_only: bool = False,
        buffer: int = 10_000,
        client_id: str | None = None,
        log: Callable[[str], None] = _stderr,
        drain_timeout: float = 5.0,
        max_backoff: int = 10,
        access: BrokerAccess | None = None,
        spool: str | os.PathLike | None = None,
    ) -> None:
        self.host, self.port, self.topic, tls = broker = parse_mqtt_url(url)
        if buffer < 1:
            raise ProtoADError(f"the MQTT buffer must hold at least one message, not {buffer}")
        access = access or BrokerAccess()
        context = access.tls_context(broker)
        try:
            from paho.mqtt.client import CallbackAPIVersion

            client_class = _client_class()
        except ImportError:
            raise ProtoADError(f"publishing to {url} needs paho-mqtt 2.x: pip install 'protoad-edge[mqtt]'") from None

        self.url = url
        self.anomalies_only = anomalies_only
        self.buffer = buffer
        self.log = log
        self.drain_timeout = drain_timeout
        self.delivered = 0
        self.dropped = 0
        self.spooled = 0
        self.written = 0
        self._unsent: deque[tuple[int, bytes]] = deque()  # in order, after every message in _inflight
        self._inflight: OrderedDict[int, bytes] = OrderedDict()  # handed to paho, no PUBACK yet
        self._mids: dict[int, int] = {}  # paho's message id -> our sequence number, this connection
        self._early: set[int] = set()  # PUBACKs that came before publish() returned their message id
        self._next_seq = 0
        self._captured: dict[int, float] = {}  # sequence number -> capture time of the frame, until published
        self.latency = Latencies()  # capture -> handed to the broker's connection (first time)
        self._connected = False
        self._outage = False  # an outage was logged; the next connect logs the recovery
        self._closing = False
        self._state = threading.Condition()
        self._send_lock = threading.Lock()

        self.spool = Spool(spool, self.host, self.port, self.topic) if spool is not None else None
        earlier = self.spool.records if self.spool is not None else []
        self.from_spool = len(earlier)
        for payload in earlier:  # first, oldest first
            self._append(payload)
        if access.insecure:
            log(
                f"mqtt: WARNING: --mqtt-insecure: the certificate of {self.host}:{self.port} is not verified; "
                f"anyone between here and the broker can read and change the verdicts"
            )
        elif access.password is not None and not tls:
            log(f"mqtt: WARNING: the password for {self.host}:{self.port} travels unencrypted: use mqtts://")

        self._client: Any = client_class(CallbackAPIVersion.VERSION2, client_id=client_id or "")
        if access.user is not None:
            self._client.username_pw_set(access.user, access.password)
        if context is not None:
            self._client.tls_set_context(context)
        self._client.max_inflight_messages_set(INFLIGHT)
        self._client.reconnect_delay_set(min_delay=1, max_delay=max_backoff)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="protoad-mqtt-sender", daemon=True)
        self._sender.start()

    @property
    def queued(self) -> int:
        """Messages still waiting for their PUBACK (after ``close``: owed, and not in the spool)."""
        with self._state:
            return len(self._unsent) + len(self._inflight)

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        if self.anomalies_only and not result.anomalous:
            return True
        self.written += 1
        self._append(json.dumps(result.record()).encode(), result.timestamp)
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    def _append(self, payload: bytes, captured: float | None = None) -> None:
        """Buffers one message (of a frame captured at ``captured``); over the bound the oldest is dropped."""
        with self._state:
            if captured is not None:
                self._captured[self._next_seq] = captured
            self._unsent.append((self._next_seq, payload))
            self._next_seq += 1
            if len(self._unsent) + len(self._inflight) > self.buffer:
                if self._inflight:  # the oldest; its PUBACK, should it still come, is ignored
                    seq, _ = self._inflight.popitem(last=False)
                else:
                    seq, _ = self._unsent.popleft()
                self._captured.pop(seq, None)
                self.dropped += 1
            self._state.notify_all()

    def close(self, keep: bool) -> str | None:
        """Waits up to ``drain_timeout`` for the buffer to empty (sent messages cannot be recalled, so
        ``keep`` changes nothing), disconnects, and leaves what is still owed in the spool."""
        with self._state:
            self._state.wait_for(lambda: not self._unsent and not self._inflight, timeout=self.drain_timeout)
            self._closing = True
            self._state.notify_all()
        self._sender.join()
        self._client.disconnect()
        self._client.loop_stop()  # no callback runs after this
        if self.spool is not None:
            self._spool_owed(self.spool)
        return self.summary()

    def _spool_owed(self, spool: Spool) -> None:
        """Moves the messages still owed into the spool, oldest first (an unwritable spool leaves them queued)."""
        owed = list(self._inflight.values()) + [payload for _, payload in self._unsent]
        try:
            over = spool.save(owed)
        except OSError as exc:
            self.log(
                f"mqtt: cannot write the spool {spool.path} ({exc.strerror or exc}): "
                f"{len(owed)} undelivered records are lost"
            )
        else:
            self._inflight.clear()
            self._unsent.clear()
            self.spooled, self.dropped = len(owed) - over, self.dropped + over
        finally:
            spool.release()

    def summary(self) -> str:
        """What became of every message: the summary's line."""
        origin = f"{self.from_spool} from the spool + {self.written} new: " if self.from_spool else ""
        where = f" (spool {self.spool.path})" if self.spool is not None else ""
        return (
            f"{self.url}: {origin}{self.delivered} delivered, {self.queued} queued, {self.spooled} spooled, "
            f"{self.dropped} dropped{where}"
        )

    def shortfall(self) -> str | None:
        """After ``close``: one line saying what did not reach the broker and where it is, or None if all did."""
        if not (self.spooled or self.queued or self.dropped):
            return None
        parts = []
        if self.spooled:
            assert self.spool is not None
            parts.append(
                f"{self.spooled} spooled in {self.spool.path} (the next run to this broker and topic, or "
                f"protoad-run --mqtt {self.url} --mqtt-flush, sends them first)"
            )
        if self.queued:
            parts.append(f"{self.queued} lost (not spooled)")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (the buffer or the spool was full)")
        undelivered = self.spooled + self.queued + self.dropped
        return f"mqtt: {undelivered} records not acknowledged by {self.host}:{self.port}: " + "; ".join(parts)

    def _ready(self) -> bool:
        return self._connected and bool(self._unsent) and len(self._inflight) < INFLIGHT

    def _send_loop(self) -> None:
        """Hands buffered messages to paho in order, one at a time, while connected."""
        while True:
            with self._state:
                self._state.wait_for(lambda: self._closing or self._ready())
                if self._closing:
                    return
            with self._send_lock:
                with self._state:
                    if not self._ready():  # lost the connection meanwhile
                        continue
                    seq, payload = self._unsent.popleft()
                    self._inflight[seq] = payload
                mid = self._client.publish(self.topic, payload, qos=1).mid
                sent = time.time()
                with self._state:
                    captured = self._captured.pop(seq, None)
                    if mid in self._early:
                        self._early.discard(mid)
                        self._acknowledged(seq)
                    else:
                        self._mids[mid] = seq
                if captured is not None:
                    self.latency.since_capture(captured, sent)

    def _acknowledged(self, seq: int) -> None:
        """Counts a PUBACK, unless its message was dropped meanwhile. Call holding ``_state``."""
        if self._inflight.pop(seq, None) is not None:
            self.delivered += 1
            self._state.notify_all()

    def _note_outage(self, what: str) -> None:
        """Logs the first failure of an outage only: a broker down for an hour is one line, not one a retry."""
        with self._state:
            if self._outage or self._closing:
                return
            self._outage = True
        self.log(f"mqtt: {what}; queuing up to {self.buffer} messages and reconnecting")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = (
                f": check --mqtt-user and the password ({PASSWORD_ENV} or --mqtt-password-file)"
                if str(reason) in AUTH_REFUSALS
                else ""
            )
            self._note_outage(f"broker {self.host}:{self.port} refused the connection ({reason}){hint}")
            return
        with self._send_lock:
            client.drop_out_messages()  # the last connection's leftovers: the buffer resends them, in order
            with self._state:
                self._unsent.extendleft(reversed(self._inflight.items()))
                self._inflight.clear()
                self._mids.clear()
                self._early.clear()
                self._connected = True
                recovered, self._outage = self._outage, False
                queued = len(self._unsent)
                self._state.notify_all()
        if recovered:
            self.log(f"mqtt: connected to {self.host}:{self.port}; sending {queued} queued messages")

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._note_outage(f"cannot connect to {self.host}:{self.port} ({client.failure})")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._state:
            self._connected = False
        self._note_outage(f"lost the connection to {self.host}:{self.port} ({reason})")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._state:
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early.add(mid)
            else:
                self._acknowledged(seq)
