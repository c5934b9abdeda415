"""One process owns a file at a time: an MQTT spool, a bundle's versions, a station database.

An exclusive ``flock`` on an open file: a second process is refused at once (not queued), and the kernel drops
the lock when the file is closed or the process ends, however it ends (a SIGKILL or a power cut leaves no stale
lock to clean up). ``flock`` locks are separate from the POSIX locks SQLite takes, so a database file can carry one.
"""

from __future__ import annotations

import fcntl
import os
from typing import IO


def own(path: str | os.PathLike, mode: str = "ab") -> IO[bytes] | None:
    """``path`` opened (``mode``) and locked for this process - close it to let go - or None where another process
    holds it. OSError where it cannot be opened."""
    handle = open(path, mode)  # noqa: SIM115 - the caller keeps it open: it is the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return handle
