"""Every judgement into the station database, from a thread of its own, so the judging thread never waits on a disk.

The judging thread only queues (``RecordSink.write``: the record, and the frame when its pictures are kept). The
writer thread stores the queued rows in one transaction per ``batch_rows`` rows or ``batch_seconds``, whichever
comes first, after writing their pictures (``images.ImageStore``), so a row in the gallery has its pictures.

Nothing here stops the line. A full queue (the disk stalled for minutes) drops the row and counts it; more than
``image_backlog`` frames waiting for their pictures are stored without them (counted); a database or picture
folder that is full or read-only is one line on the log when it starts and one when it ends, and every row it
refused meanwhile is counted as not recorded. The summary says all of it.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..latency import Latencies
from ..outputs.sinks import Sink
from ..result import FrameResult
from . import database
from .images import ImageStore

BATCH_ROWS, BATCH_SECONDS = 200, 0.5  # a row reaches the page at most half a second after its frame was judged
QUEUE_ROWS = 20_000  # rows waiting for the writer: minutes of a stalled disk at 100 FPS
IMAGE_BACKLOG = 8  # frames waiting for their pictures (each holds its frame in memory)
KEEP_IMAGES, KEEP_MB, NORMAL_EVERY = 5000, 2048, 100
_CLOSE = object()


@dataclass
class Judgement:
    lane: int
    record: dict[str, Any]
    result: FrameResult | None  # set when its pictures are to be kept


@dataclass(frozen=True)
class Retention:
    """Which frames keep their pictures, and how many are kept."""

    keep_count: int = KEEP_IMAGES
    keep_bytes: int = KEEP_MB * 1024 * 1024
    normal_every: int = NORMAL_EVERY  # every N-th normal frame of each source keeps its pictures (0: none)


class Recorder:
    """Opens (creating or migrating) the database ``path`` and its picture folder ``path.images``, records one run.

    ``lanes`` are the run's SOURCEs as shown; ``log`` takes the lines about
    the storage. ``committed`` stamps each row's capture-to-commit latency.
    """

    def __init__(
        self,
        path: str | Path,
        model: str,
        category: str,
        lanes: Sequence[str],
        retention: Retention = Retention(),
        log: Callable[[str], None] = print,
        batch_rows: int = BATCH_ROWS,
        batch_seconds: float = BATCH_SECONDS,
        queue_rows: int = QUEUE_ROWS,
        image_backlog: int = IMAGE_BACKLOG,
    ) -> None:
        self.path = Path(path)
        self.lanes = list(lanes)
        self.retention = retention
        self.log = log
        self.batch_rows, self.batch_seconds, self.image_backlog = batch_rows, batch_seconds, image_backlog
        self.recorded = self.not_recorded = self.images_skipped = 0
        self.committed = Latencies()
        self.problem = ""  # why rows are not recorded now ("" while they are)
        self.image_problem = ""
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_rows)
        self._backlog = 0  # frames queued with their pictures
        self._lock = threading.Lock()
        self._dropped_logged = False
        self.db: sqlite3.Connection | None = None
        self._owner = database.own(self.path)  # one run records into a file at a time
        self.images: ImageStore | None = None
        self.run = 0
        self._run_facts = (model, category, self.lanes)
        self._open()
        self._thread = threading.Thread(target=self._write_loop, name="protoad-station-recorder", daemon=True)
        self._thread.start()

    @property
    def image_folder(self) -> Path:
        return self.path.with_name(self.path.name + ".images")

    def sink(self, lane: int) -> RecordSink:
        return RecordSink(self, lane)

    def put(self, judgement: Judgement) -> None:
        """Queues one judgement without waiting (the judging thread calls this)."""
        if judgement.result is not None:
            with self._lock:
                if self._backlog >= self.image_backlog:
                    judgement.result = None
                    self.images_skipped += 1
                else:
                    self._backlog += 1
        try:
            self._queue.put_nowait(judgement)
        except queue.Full:
            with self._lock:
                self.not_recorded += 1
                if judgement.result is not None:
                    self._backlog -= 1
                first = not self._dropped_logged
                self._dropped_logged = True
            if first:
                self.log(
                    f"station: the writer of {self.path} is {self._queue.maxsize:,} rows behind (a stalled "
                    "disk?): further rows are dropped and counted until it catches up; judging goes on"
                )

    def close(self) -> str:
        """Stores everything queued, ends the run's row, and returns the summary line."""
        self._queue.put(_CLOSE)
        self._thread.join()
        if self.db is not None:
            try:
                database.end_run(self.db, self.run)
            except sqlite3.Error:
                pass  # the rows are what counts; their failure was logged
            self.db.close()
        if self._owner is not None:
            self._owner.close()
        kept = f", {len(self.images.kept):,} frames' pictures kept" if self.images is not None else ""
        lost = f", {self.not_recorded:,} not recorded" if self.not_recorded else ""
        skipped = f", {self.images_skipped:,} without pictures (writer behind)" if self.images_skipped else ""
        return f"{self.path}: {self.recorded:,} judgements recorded{lost}{kept}{skipped}"

    def state(self) -> dict[str, Any]:
        """For the page."""
        return {
            "path": str(self.path),
            "recorded": self.recorded,
            "not_recorded": self.not_recorded,
            "images_kept": len(self.images.kept) if self.images is not None else 0,
            "problem": self.problem or self.image_problem,
        }

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        pending: list[Judgement] = []
        first = 0.0
        while True:
            wait = None if not pending else max(0.0, first + self.batch_seconds - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if isinstance(item, Judgement):
                if not pending:
                    first = time.monotonic()
                pending.append(item)
            closing = item is _CLOSE
            if pending and (
                closing or len(pending) >= self.batch_rows or time.monotonic() - first >= self.batch_seconds
            ):
                self._store(pending)
                pending = []
            if closing:
                return

    def _store(self, batch: list[Judgement]) -> None:
        """The pictures of the batch, then its rows in one transaction, then the retention."""
        if self.db is None:
            self._open()
        if self.db is not None and self.images is None and any(j.result is not None for j in batch):
            self._open_images()
        named: list[str | None] = []
        for judgement in batch:
            named.append(self._save_images(judgement) if judgement.result is not None else None)
            if judgement.result is not None:
                with self._lock:
                    self._backlog -= 1
                judgement.result = None
        rows = [database.frame_row(self.run, self.lanes[j.lane], j.record, name) for j, name in zip(batch, named)]
        try:
            if self.db is None:
                raise sqlite3.OperationalError(self.problem)
            database.insert_frames(self.db, rows)
        except sqlite3.Error as exc:
            with self._lock:
                self.not_recorded += len(rows)
            for name in named:
                if name is not None and self.images is not None:
                    self.images.discard(name)
            if self.db is not None:
                self._storage_failed(f"cannot write the station database {self.path}: {exc}")
            return
        now = time.time()
        for judgement in batch:
            self.committed.since_capture(judgement.record["timestamp"], now)
        with self._lock:
            self.recorded += len(rows)
        if self.problem:
            self.log(
                f"station: recording into {self.path} again ({self.not_recorded:,} judgements were not "
                "recorded meanwhile)"
            )
            self.problem = ""
        self._trim()

    def _save_images(self, judgement: Judgement) -> str | None:
        if self.images is None:
            return None
        assert judgement.result is not None
        name = f"{self.run:06d}-{judgement.lane}-{judgement.record['frame']:09d}"
        try:
            self.images.save(name, judgement.result)
        except OSError as exc:
            self._images_failed(exc)
            return None
        if self.image_problem:
            self.log(f"station: keeping pictures in {self.image_folder} again")
            self.image_problem = ""
        return name

    def _trim(self) -> None:
        if self.images is None or self.db is None:
            return
        removed = self.images.trim()
        if removed:
            try:
                database.forget_images(self.db, removed)
            except sqlite3.Error as exc:  # the rows keep naming removed folders until the next trim: harmless
                self._storage_failed(f"cannot write the station database {self.path}: {exc}")

    def _open(self) -> None:
        """Opens the database and the picture folder; when they cannot be written, says so once (and ``_store``
        tries again with its next batch: a read-only or full disk may have been fixed)."""
        try:
            db = database.connect(self.path, create=True)
        except database.Unwritable as exc:
            self._storage_failed(str(exc))
            return
        try:
            self.run = database.start_run(db, *self._run_facts)
        except sqlite3.Error as exc:
            db.close()
            self._storage_failed(f"cannot write the station database {self.path}: {exc}")
            return
        self.db = db

    def _open_images(self) -> None:
        assert self.db is not None
        try:
            self.images = ImageStore(
                self.image_folder, self.retention.keep_count, self.retention.keep_bytes, database.kept_images(self.db)
            )
        except OSError as exc:
            self._images_failed(exc)

    def _storage_failed(self, why: str) -> None:
        """One line when recording stops, none while it stays stopped."""
        if not self.problem:
            self.log(f"station: {why}; judgements are not recorded until it can be written again (judging goes on)")
        self.problem = why

    def _images_failed(self, exc: OSError) -> None:
        why = f"cannot keep pictures in {self.image_folder}: {exc.strerror or exc}"
        if not self.image_problem:
            self.log(
                f"station: {why}; frames are recorded without them until it can be written again (judging goes on)"
            )
        self.image_problem = why


class RecordSink(Sink):
    """One source's judgements into the recorder; every ``normal_every``-th normal frame keeps its pictures."""

    def __init__(self, recorder: Recorder, lane: int) -> None:
        self.recorder = recorder
        self.lane = lane
        self.normal = 0

    def write(self, result: FrameResult, view: np.ndarray | None) -> bool:
        every = self.recorder.retention.normal_every
        keep = result.anomalous
        if not keep:
            self.normal += 1
            keep = every > 0 and self.normal % every == 0
        self.recorder.put(Judgement(self.lane, result.record(), result if keep else None))
        return True

    def close(self, keep: bool) -> str | None:
        return None  # the recorder is shared by the run's sources: the station closes it once
