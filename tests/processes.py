"""Reading a child process's output after the test has read some of it line by line."""

from __future__ import annotations

import subprocess
import threading
from typing import IO


def finish(process: subprocess.Popen, timeout: float) -> tuple[str, str | None]:
    """The rest of ``process``'s stdout and stderr (None where not a pipe) once it has exited.

    Read through the same buffered readers the test's ``readline()`` calls used: ``Popen.communicate(timeout=...)``
    reads the pipes' descriptors directly and silently drops the lines such a reader had already buffered - which
    showed as a frame "missing" from a run's records in about one in three runs of test_reload under load 3. A run
    still going after ``timeout`` seconds is killed and ``subprocess.TimeoutExpired`` raised, as ``communicate``
    raises it."""
    out: dict[str, str | None] = {}

    def drain(name: str, stream: IO[str] | None) -> None:
        out[name] = stream.read() if stream is not None else None

    readers = [
        threading.Thread(target=drain, args=(name, stream), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        for reader in readers:
            reader.join(10.0)
    return out.get("stdout") or "", out.get("stderr")
