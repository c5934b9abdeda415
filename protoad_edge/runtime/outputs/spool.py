"""The MQTT spool: the records a run could not get acknowledged, kept on disk for the next run to send first.

One file per broker and topic, ``HOST_PORT_HASH.jsonl`` (HASH: of ``host:port/topic``; no credential ever
shapes the name): a header line naming the broker and topic, then one record per line, oldest first (a
record is compact JSON, so it holds no raw newline). The file is only ever replaced whole (a temporary
file beside it, fsynced, renamed, then the folder fsynced): a crash or a power cut leaves the old spool or
the new one, never part of one. A lock file beside it (``flock``) keeps two processes from owning one
spool at a time; the kernel drops the lock with the process however it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ...atomic import write_atomic
from ...errors import ProtoADError
from ...owner import own

FORMAT = 1
MAX_BYTES = 64 * 1024 * 1024  # beyond this the oldest records are dropped (the count is bounded by the buffer)


def default_folder() -> Path:
    """``$XDG_STATE_HOME/protoad-edge/mqtt-spool`` (``~/.local/state/...``): state that must outlive a run and a
    reboot, which a cache folder (that cleaners empty) is not."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "protoad-edge" / "mqtt-spool"


def _fsync_folder(folder: Path) -> None:
    """Makes a rename or an unlink in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool of one broker and topic in ``folder``, locked for this process until ``release``.

    ``records`` are what an earlier run left, oldest first; ``save`` replaces them with what is owed now.
    """

    def __init__(self, folder: str | os.PathLike, host: str, port: int, topic: str, max_bytes: int = MAX_BYTES) -> None:
        self.folder = Path(folder).expanduser()
        digest = hashlib.sha256(f"{host}:{port}/{topic}".encode()).hexdigest()[:16]
        self.path = self.folder / f"{re.sub(r'[^A-Za-z0-9.-]', '_', host)}_{port}_{digest}.jsonl"
        self.header = json.dumps({"protoad_mqtt_spool": FORMAT, "broker": f"{host}:{port}", "topic": topic}).encode()
        self.max_bytes = max_bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = own(self.path.with_suffix(".lock"))
        except OSError as exc:
            raise ProtoADError(f"cannot use the MQTT spool folder {self.folder}: {exc.strerror or exc}") from None
        if lock is None:
            raise ProtoADError(
                f"the MQTT spool {self.path} is in use by another protoad-run with the same broker and "
                f"topic: give this one its own --mqtt-spool DIR"
            )
        self._lock = lock
        try:
            self.records = self._load()
        except BaseException:
            self._lock.close()
            raise

    def _load(self) -> list[bytes]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ProtoADError(f"cannot read the MQTT spool {self.path}: {exc.strerror or exc}") from None
        if not lines or lines[0] != self.header:
            raise ProtoADError(
                f"{self.path} is not this broker's and topic's MQTT spool (its first line should be "
                f"{self.header.decode()}): move it away"
            )
        return lines[1:]

    def save(self, records: list[bytes]) -> int:
        """Replaces the spool with ``records`` (oldest first), dropping the oldest beyond ``max_bytes``; none left
        removes the file. Returns how many were dropped."""
        size = sum(len(r) + 1 for r in records)
        dropped = 0
        while size > self.max_bytes:
            size -= len(records[dropped]) + 1
            dropped += 1
        kept = records[dropped:]
        if kept:
            write_atomic(self.path, lambda f: f.write(b"\n".join([self.header, *kept]) + b"\n"))
        else:
            self.path.unlink(missing_ok=True)
        _fsync_folder(self.folder)
        self.records = kept
        return dropped

    def release(self) -> None:
        """Lets another process own this spool (closing the lock file drops the lock)."""
        self._lock.close()
