"""A running line picks up a new version of its bundle without stopping.

A teach, a rollback or ``protoad-eval --set-threshold`` rewrites the bundle's files and its sidecar last
(``versions.py``). :class:`ModelWatch` polls the sidecar and the file the backend runs (a ``stat`` each, every
``every`` seconds) on a thread; when they change it opens the new version there, beside the backend that keeps
judging, warms it up on one frame, and hands it over. The run loop takes it between two batches (``poll``), so no
frame is judged twice or skipped and the capture and every output stay open; the old backend is closed after.

A version that cannot be opened (half written, corrupt, its sidecar not matching its graph, a plan of another
GPU) is refused with one line and the run goes on with the version it has; the watch tries again when the files
change again. A version still being written (``versions.writing`` holds the bundle's lock) is not read before its
writer is done. A change that lands while the new version is being opened is opened afresh: the version handed
over is the one whose files stayed put while it was read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..versions import stamp, writing_now
from .backends.base import Backend, BackendOptions

CHECK_EVERY_S = 2.0  # between two looks at the bundle's files
Log = Callable[[str], None]


class ModelWatch:
    """Watches the bundle of ``backend`` (a local backend opened from a file of a bundle); ``open_`` opens the
    bundle's new version (``reopener``)."""

    def __init__(self, backend: Backend, open_: Callable[[], Backend], every: float = CHECK_EVERY_S,
                 log: Log = print) -> None:
        self.open_, self.every, self.log = open_, every, log
        path = Path(backend.path)
        self.bundle = Bundle.of(path)
        self.paths = (self.bundle.sidecar, path)
        self.seen = stamp(*self.paths)  # the files of the version running (or last refused)
        self.version = backend.info.version
        self._ready: Backend | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="protoad-model-watch", daemon=True)
        self._thread.start()

    def poll(self) -> Backend | None:
        """The new version's backend, once, when one is ready (never blocks)."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        leftover = self.poll()
        if leftover is not None:
            leftover.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            now = stamp(*self.paths)
            if now == self.seen or writing_now(self.bundle):  # a version half written: read it once it is whole
                continue
            try:
                opened = self.open_()
            except Exception as exc:  # any failure to open: the line goes on with the version it has
                self.seen = now
                self.log(f"model: the changed {self.paths[0].name} was refused, still judging with version "
                         f"{self.version}: {_one_line(exc)}")
                continue
            if stamp(*self.paths) != now:  # it changed again while being read: read it afresh
                opened.close()
                continue
            try:
                info = opened.info
                opened.infer(np.zeros((1, 3, info.crop, info.crop), np.float32))  # lazy set-up, not in a frame
            except Exception as exc:
                opened.close()
                self.seen = now
                self.log(f"model: the changed {self.paths[0].name} was refused, still judging with version "
                         f"{self.version}: {_one_line(exc)}")
                continue
            self.seen, self.version = now, opened.info.version
            with self._lock:
                stale, self._ready = self._ready, opened
            if stale is not None:
                stale.close()


def reopener(backend: Backend, options: BackendOptions) -> Callable[[], Backend]:
    """How to open the new version of ``backend``'s file with the same backend and options, once its sidecar
    vouches for it (``backends.open_file``: the digests). onnxruntime gets the providers that run now: a provider
    that would fall back prints to stdout, which may carry the records."""
    from .backends.registry import REGISTRY, open_file

    entry, path = REGISTRY[backend.name], Path(backend.path)
    if backend.name != "ort":
        return lambda: open_file(entry, path, options)
    providers = list(getattr(backend, "providers", []))

    def open_() -> Backend:
        Bundle.of(path).check(path)
        return entry.load()(path, options, providers=providers)  # type: ignore[call-arg]

    return open_


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
