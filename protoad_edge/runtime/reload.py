"""A running line picks up a new version of its bundle without stopping.

A teach, a rollback or ``protoad-eval --set-threshold`` rewrites the bundle's files and its sidecar last
(``versions.py``). :class:`ModelWatch` looks every ``every`` seconds, on a thread, at the sidecar and the file the
backend runs (a ``stat`` each; for a ``--server`` model, the served configuration); when they change it opens the
new version there, beside the backend that keeps judging, warms it up on one frame, and hands it over. The run
loop takes it between two batches (``poll``), so no frame is judged twice or skipped and the capture and every
output stay open; the old backend is closed after.

A version that cannot be opened (half written, corrupt, its sidecar not matching its graph, a plan of another
GPU) is refused with one line and the run goes on with the version it has; the watch tries again when the files
change again. A version still being written (``versions.writing`` holds the bundle's lock) is not read before its
writer is done. A change that lands while the new version is being opened is opened afresh: the version handed
over is the one whose files stayed put while it was read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..bundle import Bundle
from ..versions import stamp, writing_now
from .backends.base import Backend, BackendOptions

if TYPE_CHECKING:
    from .serving.triton import TritonBackend

CHECK_EVERY_S = 2.0  # between two looks at the bundle's files
Log = Callable[[str], None]


class ModelWatch:
    """Watches the model of ``backend``: ``look()`` says what it is now (None: not now, a version is being
    written), and when that changes ``open_()`` opens it (``local`` and ``served`` make the pair)."""

    def __init__(
        self,
        backend: Backend,
        open_: Callable[[], Backend],
        look: Callable[[], object],
        every: float = CHECK_EVERY_S,
        log: Log = print,
        what: str = "",
    ) -> None:
        self.open_, self.look, self.every, self.log = open_, look, every, log
        self.what = what or str(backend.path)
        self.seen = look()  # the model running (or last refused)
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

    def _now(self) -> object:
        try:
            return self.look()
        except Exception:  # a server restarting: the requests wait for it, the watch looks again later
            return None

    def _refuse(self, exc: BaseException) -> None:
        self.log(
            f"model: the new version of {self.what} was refused, still judging with version {self.version}: "
            f"{_one_line(exc)}"
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            now = self._now()
            if now is None or now == self.seen:
                continue
            try:
                opened = self.open_()
            except Exception as exc:  # any failure to open: the line goes on with the version it has
                self.seen = now
                self._refuse(exc)
                continue
            if self._now() != now:  # it changed again while being read: read it afresh
                opened.close()
                continue
            try:
                info = opened.info
                opened.infer(np.zeros((1, 3, info.crop, info.crop), np.float32))  # lazy set-up, not in a frame
            except Exception as exc:
                opened.close()
                self.seen = now
                self._refuse(exc)
                continue
            self.seen, self.version = now, opened.info.version
            with self._lock:
                stale, self._ready = self._ready, opened
            if stale is not None:
                stale.close()


def local(backend: Backend, options: BackendOptions, every: float = CHECK_EVERY_S, log: Log = print) -> ModelWatch:
    """The watch of a backend opened from a bundle's file: it looks at the sidecar and that file (a ``stat`` each),
    not while a version is being written (``versions.writing`` holds the lock), and opens the new version with the
    same backend and options once its sidecar vouches for the file (``backends.open_file``: the digests).
    onnxruntime gets the providers that run now: a provider that would fall back prints to stdout, which may carry
    the records."""
    from .backends.registry import REGISTRY, open_file

    entry, path = REGISTRY[backend.name], Path(backend.path)
    bundle = Bundle.of(path)

    def look() -> object:
        return None if writing_now(bundle) else stamp(bundle.sidecar, path)

    if backend.name != "ort":
        return ModelWatch(backend, lambda: open_file(entry, path, options), look, every, log, str(bundle.stem))
    providers = list(getattr(backend, "providers", []))

    def open_() -> Backend:
        bundle.check(path)
        return entry.load()(path, options, providers=providers)  # type: ignore[call-arg]

    return ModelWatch(backend, open_, look, every, log, str(bundle.stem))


def served(backend: TritonBackend, every: float = CHECK_EVERY_S, log: Log = print) -> ModelWatch:
    """The watch of a ``--server`` model: it reads the model's configuration (one call; its ``protoad`` parameter
    carries the version and thresholds), so a server restarted on a new version of the bundle, or a Triton that
    loaded a rewritten repository, is judged with from then on."""
    from .serving.triton import TritonBackend

    client = backend.grpc.InferenceServerClient(backend.address.target)

    def look() -> object:
        return client.get_model_config(backend.address.model, as_json=True)

    def open_() -> Backend:
        return TritonBackend(backend.address.url, retry=backend.retry, log=log)

    return ModelWatch(backend, open_, look, every, log, backend.address.url)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
