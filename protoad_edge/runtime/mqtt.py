"""Verdicts to the plant over MQTT: each judged frame's JSON record, QoS 1, to an MES or PLC gateway.

A broker outage must never stall inspection, so ``write`` only appends to a bounded buffer of messages
not yet acknowledged (when it overflows the oldest is dropped, and counted). A sender thread hands them
to paho in order, at most ``INFLIGHT`` awaiting their PUBACK at a time, while connected.

The buffer, not paho, is the record of what is owed. paho (2.x) does resend the unacknowledged messages
it was handed once it reconnects, but from a queue of its own that has no bound of ours and cannot drop
the oldest. So on every (re)connect paho's leftovers are discarded (``drop_out_messages``) and everything
still in the buffer is published again from the oldest: an outage loses nothing within the bound and
keeps the order. A message whose PUBACK was lost with the connection may arrive twice (QoS 1 allows it),
but each message is counted once: delivered (PUBACK), queued (still in the buffer at the end) or dropped.

Locking: paho calls ``on_publish`` holding its own message lock, so ``_state`` is never held while
calling into paho (the reverse order could deadlock). ``_send_lock`` makes each publish and the record
of its message id one step that a reconnect's reset cannot split.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict, deque
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np

from ..errors import ProtoADError
from .result import FrameResult
from .sinks import Sink

DEFAULT_PORT = 1883
INFLIGHT = 20  # messages awaiting their PUBACK on one connection (paho's own default window)
KEEPALIVE_S = 15  # a silently dead link is noticed within about 1.5 times this
URL_FORM = "mqtt://HOST[:PORT]/TOPIC"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_mqtt_url(url: str) -> tuple[str, int, str]:
    """``mqtt://HOST[:PORT]/TOPIC`` -> (host, port, topic); the topic may contain ``/`` but no wildcard."""

    def bad(why: str) -> ProtoADError:
        return ProtoADError(f"bad MQTT URL {url!r}: {why} (expected {URL_FORM})")

    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        raise bad("it must start with mqtt://")
    if "#" in url or "+" in parts.path or "?" in url:
        raise bad("a topic to publish to cannot contain '#', '+' or '?'")
    if parts.username is not None:
        raise bad("credentials in the URL are not supported")
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
    return parts.hostname, port or DEFAULT_PORT, topic


class MqttSink(Sink):
    """Publishes each frame's JSON record (QoS 1) to one topic, or only the anomalous ones.

    ``buffer`` bounds the messages not yet acknowledged; ``drain_timeout`` is how long ``close`` waits for
    them; ``max_backoff`` caps the pause between reconnect attempts (1 s, doubling). The counts
    ``delivered``, ``queued`` and ``dropped`` are final once ``close`` returned.
    """

    def __init__(self, url: str, anomalies_only: bool = False, buffer: int = 10_000, client_id: str | None = None,
                 log: Callable[[str], None] = _stderr, drain_timeout: float = 5.0, max_backoff: int = 10) -> None:
        self.host, self.port, self.topic = parse_mqtt_url(url)
        if buffer < 1:
            raise ProtoADError(f"the MQTT buffer must hold at least one message, not {buffer}")
        try:
            from paho.mqtt.client import CallbackAPIVersion, Client
        except ImportError:
            raise ProtoADError(f"publishing to {url} needs paho-mqtt 2.x: pip install 'protoad-edge[mqtt]'") from None
        self.url = url
        self.anomalies_only = anomalies_only
        self.buffer = buffer
        self.log = log
        self.drain_timeout = drain_timeout
        self.delivered = 0
        self.dropped = 0
        self._unsent: deque[tuple[int, bytes]] = deque()  # in order, after every message in _inflight
        self._inflight: OrderedDict[int, bytes] = OrderedDict()  # handed to paho, no PUBACK yet
        self._mids: dict[int, int] = {}  # paho's message id -> our sequence number, this connection
        self._early: set[int] = set()  # PUBACKs that came before publish() returned their message id
        self._next_seq = 0
        self._connected = False
        self._outage = False  # an outage was logged; the next connect logs the recovery
        self._closing = False
        self._state = threading.Condition()
        self._send_lock = threading.Lock()

        self._client: Any = Client(CallbackAPIVersion.VERSION2, client_id=client_id or "")
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
        """Messages still waiting for their PUBACK."""
        with self._state:
            return len(self._unsent) + len(self._inflight)

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        if self.anomalies_only and not result.anomalous:
            return True
        payload = json.dumps(result.record()).encode()
        with self._state:
            self._unsent.append((self._next_seq, payload))
            self._next_seq += 1
            if len(self._unsent) + len(self._inflight) > self.buffer:
                if self._inflight:  # the oldest; its PUBACK, should it still come, is ignored
                    self._inflight.popitem(last=False)
                else:
                    self._unsent.popleft()
                self.dropped += 1
            self._state.notify_all()
        return True

    def close(self, keep: bool) -> str | None:
        """Waits up to ``drain_timeout`` for the buffer to empty (sent messages cannot be recalled, so
        ``keep`` changes nothing), then disconnects."""
        with self._state:
            self._state.wait_for(lambda: not self._unsent and not self._inflight, timeout=self.drain_timeout)
            self._closing = True
            self._state.notify_all()
        self._sender.join()
        self._client.disconnect()
        self._client.loop_stop()
        return f"{self.url}: {self.delivered} delivered, {self.queued} queued, {self.dropped} dropped"

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
                with self._state:
                    if mid in self._early:
                        self._early.discard(mid)
                        self._acknowledged(seq)
                    else:
                        self._mids[mid] = seq

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
            self._note_outage(f"broker {self.host}:{self.port} refused the connection ({reason})")
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
        self._note_outage(f"cannot connect to {self.host}:{self.port}")

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
