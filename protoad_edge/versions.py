"""Versions of a model bundle: every teach and every threshold change makes a new version, the versions it
replaced stay on disk, and a rollback restores any kept version bit for bit. No torch here: the line box uses it.

The version in force is the bundle's own files (``NAME.onnx``, ``NAME.json``, ...), so every tool reads it as
before. The versions it replaced live in ``NAME.versions/vN/`` beside them, as hard links to the replaced files (a
copy where the file system has none): every writer in this project replaces a file by renaming a new one over it,
never in place, so a link keeps the old bytes and keeping a version copies nothing.

A new version is committed in one order: its model files renamed into place one by one, the sidecar ``NAME.json``
last. The sidecar is the commit point: a running line reloads when it changes (``runtime/reload.py``), and a tool
that opens the bundle between two renames meets new model files beside the old sidecar, which the sidecar's
identity check refuses (``Bundle.in_force``: the prototype count differs). One writer at a time: a lock file in
``NAME.versions/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .atomic import PendingFile
from .bundle import FILES, Bundle, kind_of, sha256
from .errors import ProtoADError
from .metadata import ModelInfo
from .owner import own

SUFFIX = ".versions"
# The files that make a version: all but the TensorRT timing cache, which only speeds up engine builds.
KINDS = tuple(kind for kind in FILES if kind != "timing_cache")
KEEP = 5  # replaced versions kept on disk, the newest ones


def folder(bundle: Bundle) -> Path:
    return bundle.stem.with_name(bundle.name + SUFFIX)


def present(bundle: Bundle) -> dict[str, Path]:
    """The files of the version in force, by kind."""
    return {kind: bundle.file(kind) for kind in KINDS if bundle.file(kind).is_file()}


def kept(bundle: Bundle) -> dict[int, Path]:
    """The replaced versions on disk: number -> folder."""
    root = folder(bundle)
    if not root.is_dir():
        return {}
    return {int(p.name[1:]): p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)}


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def locked(bundle: Bundle) -> Iterator[None]:
    """One writer of ``bundle``'s versions at a time (a second one is refused, not queued: it would write a version
    made from one that is no longer in force)."""
    root = folder(bundle)
    root.mkdir(parents=True, exist_ok=True)
    lock = own(root / ".lock", "w")
    if lock is None:
        raise ProtoADError(
            f"another teach, rollback or threshold change of {bundle.stem} is in progress "
            f"(it holds {root / '.lock'}): wait for it to finish"
        )
    with lock:
        yield


def writing_now(bundle: Bundle) -> bool:
    """Whether a writer holds ``bundle``'s lock (a version is being written): a reader waits for the sidecar."""
    import fcntl

    try:
        lock = open(folder(bundle) / ".lock")
    except OSError:
        return False
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s bytes: a hard link, or a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _same(saved: Path, files: dict[str, Path]) -> bool:
    """Whether the folder ``saved`` holds exactly ``files``, byte for byte."""
    names = {p.name for p in saved.iterdir()}
    if names != {p.name for p in files.values()}:
        return False
    return all(
        os.path.samefile(saved / p.name, p) or filecmp.cmp(saved / p.name, p, shallow=False) for p in files.values()
    )


def archive(bundle: Bundle, version: int) -> Path:
    """Keep the files in force as version ``version`` in ``NAME.versions/vN`` (already kept: nothing to do). A kept
    ``vN`` with other bytes (the bundle was rebuilt, or its plan rebuilt, after that version was kept) is moved
    aside to ``vN.replaced-TIME``, never lost."""
    root = folder(bundle)
    target = root / f"v{version}"
    files = present(bundle)
    if target.is_dir():
        if _same(target, files):
            return target
        target.rename(root / f"v{version}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}")
    staging = root / f".v{version}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in files.values():
        _link(path, staging / path.name)
    os.replace(staging, target)
    return target


def prune(bundle: Bundle, keep: int = KEEP) -> list[int]:
    """Remove all but the ``keep`` newest kept versions; returns the numbers removed."""
    numbers = sorted(kept(bundle))
    removed = numbers[: max(0, len(numbers) - keep)]
    for number in removed:
        shutil.rmtree(folder(bundle) / f"v{number}")
    return removed


class NewVersion:
    """A version being written (``writing``): stage its files beside the ones in force, then ``commit``."""

    def __init__(self, bundle: Bundle, before: ModelInfo) -> None:
        self.bundle, self.before = bundle, before
        self.version = 1 + max([before.version, *kept(bundle)])
        self.pending: dict[str, PendingFile] = {}
        self.dropped: set[str] = set()

    def stage(self, kind: str) -> Path:
        """A temporary path that becomes the bundle's ``kind`` file when the version is committed."""
        if kind == "sidecar":
            raise ValueError("the sidecar is written by commit")
        if kind not in self.pending:
            self.pending[kind] = PendingFile(self.bundle.file(kind))
        return self.pending[kind].tmp

    def drop(self, kind: str) -> None:
        """The new version has no ``kind`` file (a stale plan); the version replaced keeps it."""
        self.dropped.add(kind)

    def info(self, info: ModelInfo, what: str, **details: Any) -> ModelInfo:
        """``info`` as this version's metadata: its number, and the change record appended."""
        change = {"version": self.version, "from": self.before.version, "what": what, "when": now(), **details}
        return dataclasses.replace(info, version=self.version, changes=[*self.before.changes, change])

    def commit(self, info: ModelInfo, keep: int = KEEP) -> ModelInfo:
        """Keep the version in force, rename the staged files into place, drop the dropped ones, record the
        digests of the files changed (``Bundle.seal``: a sidecar without digests stays without), and write the
        sidecar last (the commit point). ``info`` comes from :meth:`info`; returns it as written."""
        if info.version != self.version:
            raise ValueError(f"commit of version {info.version}, staged as {self.version}")
        archive(self.bundle, self.before.version)
        for pending in self.pending.values():
            pending.commit()
        for kind in self.dropped - set(self.pending):
            self.bundle.file(kind).unlink(missing_ok=True)
        info = self.bundle.seal(info, tuple(sorted(set(self.pending) | self.dropped)))
        info.save_json(self.bundle.sidecar)
        prune(self.bundle, keep)
        return info

    def discard(self) -> None:
        for pending in self.pending.values():
            pending.discard()


@contextlib.contextmanager
def writing(bundle: Bundle) -> Iterator[NewVersion]:
    """A new version of ``bundle`` under its lock; what was staged and not committed is removed on the way out."""
    with locked(bundle):
        version = NewVersion(bundle, bundle.info())
        try:
            yield version
        finally:
            version.discard()


@dataclass(frozen=True)
class Rollback:
    """A rollback done: from the version that was in force to the one restored, and the files restored."""

    old: int
    new: int
    files: list[str]


def rollback(bundle: Bundle, to: int | None = None) -> Rollback:
    """Put kept version ``to`` (default: the version the one in force was made from) back in force, bit for bit:
    its files linked back into place (the sidecar last), the files it did not have removed. The version it
    replaces is kept, so a rollback can be undone with ``to``."""
    with locked(bundle):
        info = bundle.info()
        versions = kept(bundle)
        listed = ", ".join(str(v) for v in sorted(versions) if v != info.version) or "none"
        if to is None:
            if not info.changes:
                raise ProtoADError(
                    f"{bundle.stem} is version {info.version} as built, not made from another: "
                    f"nothing to roll back to (kept versions: {listed}; name one with --to)"
                )
            to = int(info.changes[-1]["from"])
        if to == info.version:
            raise ProtoADError(f"{bundle.stem} is version {to} already")
        if to not in versions:
            raise ProtoADError(f"version {to} of {bundle.stem} is not kept in {folder(bundle)} (kept: {listed})")
        source = versions[to]
        files = {kind_of(p): p for p in source.iterdir() if kind_of(p) in KINDS}
        _verify(files, to)
        archive(bundle, info.version)
        for kind in sorted(files, key=lambda k: k == "sidecar"):  # the sidecar last: it commits
            target = bundle.file(kind)
            if target.exists() and os.path.samefile(files[kind], target):
                continue  # the version in force shares the file (a rename onto its own link would do nothing)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.restore")
            tmp.unlink(missing_ok=True)
            _link(files[kind], tmp)
            os.replace(tmp, target)
        for kind in sorted(set(KINDS) - set(files), key=lambda k: k == "sidecar"):
            bundle.file(kind).unlink(missing_ok=True)
        return Rollback(info.version, to, sorted(p.name for p in files.values()))


def _verify(files: dict[str, Path], version: int) -> None:
    """Refuse to restore a kept version whose files no longer have the digests its sidecar recorded: a copy onto
    the bundle's file (``cp`` writes in place) changes the kept link too. Unsealed versions cannot be checked."""
    if "sidecar" not in files:
        return
    digests = ModelInfo.load_json(files["sidecar"]).digests or {}
    for kind, path in files.items():
        if kind in digests and sha256(path) != digests[kind]:
            raise ProtoADError(
                f"version {version}'s {path.name} in {path.parent} no longer has the sha256 its sidecar "
                "recorded (the bundle's file was overwritten in place, by cp, while this version shared "
                "it): not restored"
            )


def stamp(*paths: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when any of ``paths`` is replaced, written or removed: (inode, size, mtime) each, None if
    missing. Cheap enough to poll between frames."""
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def history(bundle: Bundle) -> list[tuple[int, bool, dict[str, Any] | None]]:
    """(version, whether in force, the change that made it or None) for the version in force and every kept one,
    newest first."""
    current = bundle.info()
    rows = {current.version: (True, current.changes[-1] if current.changes else None)}
    for number, path in kept(bundle).items():
        if number in rows:
            continue
        sidecar = path / bundle.sidecar.name
        info = ModelInfo.load_json(sidecar) if sidecar.is_file() else None
        rows[number] = (False, info.changes[-1] if info is not None and info.changes else None)
    return [(number, *rows[number]) for number in sorted(rows, reverse=True)]
