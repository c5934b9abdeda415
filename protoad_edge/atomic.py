"""Atomic file output: a reader never sees half a file, and a failed run leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable

from .errors import ProtoADError


class PendingFile:
    """A temporary file beside ``path`` that becomes ``path`` on ``commit`` (or vanishes on ``discard``).

    It lives in the same folder, so the final ``os.replace`` is atomic, and it keeps the target's
    suffix, because some writers (cv2.VideoWriter) choose the container from the file name.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ProtoADError(f"{self.path} is a folder: expected a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{self.path.suffix}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        # mkstemp creates 0600; the finished file should be as readable as any other the user writes.
        os.chmod(self.tmp, 0o666 & ~_umask())

    def commit(self) -> Path:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds."""
    pending = PendingFile(path)
    try:
        yield pending.tmp
        pending.commit()
    finally:
        pending.discard()


def write_atomic(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``writer(file)`` atomically; returns the final path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            writer(f)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces the folder ``path`` only if the block succeeds.

    A reader sees the old folder or the new one whole, never a mix; between the two renames there is a moment
    without ``path`` (POSIX has no portable exchange of two folders).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ProtoADError(f"{path} is a file: expected a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; a server running as another user must read it
        yield tmp
        old = path.with_name(f"{tmp.name}.old")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)  # the old folder back, not left hidden beside a missing one
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
