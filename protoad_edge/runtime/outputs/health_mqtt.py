"""The run's health over MQTT: one retained message on ``TOPIC/health`` (QoS 1) at the start, on each change of any
source's problems, and at the end (``"running": false``), so a gateway that subscribes at any time reads the
current state, and a line whose run stopped is not taken for a healthy one.

Its own connection beside the records' (``mqtt.MqttSink``), with the same credentials and TLS: a state is not a
queue (only the newest matters), so it needs none of the records' buffering, and is sent again after every
reconnect.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from .mqtt import KEEPALIVE_S, BrokerAccess, parse_mqtt_url

SUFFIX = "health"
CLOSE_WAIT_S = 2.0  # the final message's PUBACK is waited for this long at most


class HealthPublisher:
    def __init__(self, url: str, access: BrokerAccess | None = None) -> None:
        from paho.mqtt.client import CallbackAPIVersion, Client

        broker = parse_mqtt_url(url)
        access = access or BrokerAccess()
        self.topic = f"{broker.topic}/{SUFFIX}"
        self.sent = 0
        self._latest: bytes | None = None
        self._connected = False
        self._lock = threading.Lock()
        self._client: Any = Client(CallbackAPIVersion.VERSION2, client_id="")
        if access.user is not None:
            self._client.username_pw_set(access.user, access.password)
        context = access.tls_context(broker)
        if context is not None:
            self._client.tls_set_context(context)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.connect_async(broker.host, broker.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()

    def publish(self, report: dict[str, Any]) -> Any:
        """Sends ``report`` now if connected, else as soon as the connection is (back)."""
        with self._lock:
            self._latest = json.dumps(report).encode()
            return self._send() if self._connected else None

    def close(self, report: dict[str, Any]) -> None:
        """Sends the final ``report``, waits up to CLOSE_WAIT_S for the broker to take it, and disconnects."""
        sent = self.publish(report)
        if sent is not None:
            try:
                sent.wait_for_publish(CLOSE_WAIT_S)
            except (RuntimeError, ValueError):
                pass  # the connection went meanwhile: the retained state before it stays the broker's
        self._client.disconnect()
        self._client.loop_stop()

    def _send(self) -> Any:
        """Call holding ``_lock``."""
        self.sent += 1
        return self._client.publish(self.topic, self._latest, qos=1, retain=True)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return  # the records' sink says why, once
        with self._lock:
            self._connected = True
            if self._latest is not None:
                self._send()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:
            self._connected = False
