"""The station's database: one SQLite file holding every judgement of every run, the operators' labels and what
they did. All SQL lives here.

Schema version 1 (``PRAGMA user_version``; a newer file is refused, an older one is migrated by ``MIGRATIONS``):

- ``runs``: one row per ``protoad-run``: ``id``, ``started``/``ended`` (Unix seconds), ``model``, ``category``,
  ``sources`` (JSON list of the SOURCEs as shown, secrets masked).
- ``frames``: one row per judged frame, in the order judged (``id``); the JSON record's fields: ``run``, ``lane``
  (the SOURCE the frame came from), ``source`` (the record's: the image's path for a folder, else the SOURCE),
  ``frame``, ``timestamp`` (capture, Unix seconds), ``pos_ms``, ``score``, ``verdict`` ('ok' | 'anomaly'),
  ``threshold``, ``threshold_rule``, ``model``, ``model_version``, ``category``, ``latency_ms``, ``roi``,
  ``regions`` and ``health`` (JSON), and ``images``: the folder under ``FILE.images/`` that holds the frame
  (``frame.png``), its defect mask (``mask.png``) and overlay (``overlay.jpg``), or NULL (none kept, or removed
  by the retention: the row itself is never removed).
- ``labels``: an operator's verdict on a frame: ``frame`` (frames.id), ``label`` ('false-alarm' | 'real-defect' |
  'missed-defect'), ``operator``, ``at``. The newest label of a frame is in force; older ones stay as history.
- ``actions``: who did what from the page: ``at``, ``operator``, ``address``, ``action``, ``detail`` (JSON).

Crash safety: WAL journal, one transaction per batch of rows; a killed run leaves every committed row readable and
no half row. ``synchronous=NORMAL``: a power cut may lose the last second's rows, never the file's consistency.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from ... import owner
from ...errors import ProtoADError

SCHEMA_VERSION = 1
LABELS = ("false-alarm", "real-defect", "missed-defect")
BUSY_TIMEOUT_MS = 5000  # a reader holding a lock for a moment must not fail a write
SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    model TEXT NOT NULL,
    category TEXT NOT NULL,
    sources TEXT NOT NULL
);
CREATE TABLE frames (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs(id),
    lane TEXT NOT NULL,
    source TEXT NOT NULL,
    frame INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    pos_ms REAL,
    score REAL NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'anomaly')),
    threshold REAL NOT NULL,
    threshold_rule TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version INTEGER,
    category TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    roi TEXT NOT NULL,
    regions TEXT NOT NULL,
    health TEXT,
    images TEXT
);
CREATE INDEX frames_by_verdict ON frames (verdict, id);
CREATE INDEX frames_with_images ON frames (id) WHERE images IS NOT NULL;
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    frame INTEGER NOT NULL REFERENCES frames(id),
    label TEXT NOT NULL CHECK (label IN ('false-alarm', 'real-defect', 'missed-defect')),
    operator TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX labels_by_frame ON labels (frame, id);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    operator TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
# version -> the statements that bring a database of that version to the next one
MIGRATIONS: dict[int, str] = {}
FRAME_COLUMNS = (
    "run",
    "lane",
    "source",
    "frame",
    "timestamp",
    "pos_ms",
    "score",
    "verdict",
    "threshold",
    "threshold_rule",
    "model",
    "model_version",
    "category",
    "latency_ms",
    "roi",
    "regions",
    "health",
    "images",
)
INSERT_FRAME = f"INSERT INTO frames ({', '.join(FRAME_COLUMNS)}) VALUES ({', '.join('?' * len(FRAME_COLUMNS))})"
# The newest label of each frame (the one in force).
CURRENT_LABELS = "SELECT frame, label FROM labels WHERE id IN (SELECT max(id) FROM labels GROUP BY frame)"


class Unwritable(ProtoADError):
    """The database's storage refuses writes (read-only, full, locked): judging goes on without the record."""


def own(path: str | Path) -> IO[bytes] | None:
    """This run's hold on the database file, kept open while it records: one run at a time records into a file
    (two would trim each other's pictures and interleave their rows), so a second is refused in one line. None
    where the file cannot be opened for writing: the recorder says why once, and judging goes on."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = owner.own(path)
    except OSError:
        return None
    if handle is None:
        raise ProtoADError(
            f"the station database {path} is being recorded into by another protoad-run: give this run its own "
            "--db FILE"
        )
    return handle


def connect(path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to the station database ``path`` (created and brought to SCHEMA_VERSION with ``create``).

    Raises ProtoADError naming the file when it is not a station database or is newer than this protoad-edge, and
    Unwritable (a ProtoADError) when the storage refuses (read-only, full, locked)."""
    path = Path(path)
    if not create and not path.is_file():
        raise ProtoADError(f"station database not found: {path}")
    try:
        db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise Unwritable(f"cannot open the station database {path}: {exc}") from None
    try:
        db.row_factory = sqlite3.Row
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ProtoADError(
                f"station database {path} has schema {version}, newer than this protoad-edge reads "
                f"({SCHEMA_VERSION}): upgrade protoad-edge or use another --db file"
            )
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise ProtoADError(f"{path} is an SQLite file but not a station database: use another --db file")
        if create:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _bring_up_to_date(db, version)
        return db
    except sqlite3.OperationalError as exc:  # read-only, full, locked: the storage, not the file's content
        db.close()
        raise Unwritable(f"cannot write the station database {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ProtoADError(f"cannot use {path} as the station database: {exc}") from None
    except BaseException:
        db.close()
        raise


def _bring_up_to_date(db: sqlite3.Connection, version: int) -> None:
    """Creates the schema in an empty file, or applies each migration from ``version`` on, in one transaction."""
    if version == SCHEMA_VERSION:
        return
    with transaction(db):
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        else:
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class transaction:
    """``with transaction(db):`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")


def start_run(db: sqlite3.Connection, model: str, category: str, sources: Sequence[str]) -> int:
    with transaction(db):
        cursor = db.execute(
            "INSERT INTO runs (started, model, category, sources) VALUES (?, ?, ?, ?)",
            (time.time(), model, category, json.dumps(list(sources))),
        )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def end_run(db: sqlite3.Connection, run: int) -> None:
    with transaction(db):
        db.execute("UPDATE runs SET ended = ? WHERE id = ?", (time.time(), run))


def frame_row(run: int, lane: str, record: dict[str, Any], images: str | None) -> tuple[Any, ...]:
    """The ``frames`` row of one JSON record (``FrameResult.record()``), in FRAME_COLUMNS' order."""
    return (
        run,
        lane,
        record["source"],
        record["frame"],
        record["timestamp"],
        record.get("pos_ms"),
        record["score"],
        record["verdict"],
        record["threshold"],
        record["threshold_rule"],
        record["model"],
        record.get("model_version"),
        record["category"],
        record["latency_ms"],
        json.dumps(record["roi"]),
        json.dumps(record["regions"]),
        json.dumps(record["health"]) if "health" in record else None,
        images,
    )


def insert_frames(db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    with transaction(db):
        db.executemany(INSERT_FRAME, rows)


def forget_images(db: sqlite3.Connection, folders: Sequence[str]) -> None:
    """The retention removed these folders: their rows stay, without images."""
    with transaction(db):
        db.executemany("UPDATE frames SET images = NULL WHERE images = ?", [(f,) for f in folders])


def kept_images(db: sqlite3.Connection) -> list[str]:
    """Every image folder the rows name, oldest first (the retention's order)."""
    return [row[0] for row in db.execute("SELECT images FROM frames WHERE images IS NOT NULL ORDER BY id")]


def frame_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A ``frames`` row (with ``label``) as the page's JSON."""
    out = dict(row)
    for key in ("roi", "regions", "health"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


FRAME_WITH_LABEL = f"SELECT f.*, l.label FROM frames f LEFT JOIN ({CURRENT_LABELS}) l ON l.frame = f.id"


def recent(
    db: sqlite3.Connection,
    verdict: str,
    after: int = 0,
    limit: int = 24,
    lane: str | None = None,
    with_images: bool = False,
) -> list[dict[str, Any]]:
    """Frames of ``verdict`` newer than row ``after``, newest first (the gallery)."""
    where = ["f.verdict = ?", "f.id > ?"] + (["f.lane = ?"] if lane is not None else [])
    where += ["f.images IS NOT NULL"] if with_images else []
    args: list[Any] = [verdict, after] + ([lane] if lane is not None else [])
    rows = db.execute(f"{FRAME_WITH_LABEL} WHERE {' AND '.join(where)} ORDER BY f.id DESC LIMIT ?", [*args, limit])
    return [frame_dict(row) for row in rows]


def frame_by_id(db: sqlite3.Connection, frame_id: int) -> dict[str, Any] | None:
    row = db.execute(f"{FRAME_WITH_LABEL} WHERE f.id = ?", (frame_id,)).fetchone()
    return frame_dict(row) if row is not None else None


def add_label(db: sqlite3.Connection, frame_id: int, label: str, operator: str, address: str) -> None:
    """Stores ``label`` for frame ``frame_id`` and logs who did it, in one transaction."""
    if label not in LABELS:
        raise ProtoADError(f"unknown label {label!r}: one of {', '.join(LABELS)}")
    with transaction(db):
        if db.execute("SELECT 1 FROM frames WHERE id = ?", (frame_id,)).fetchone() is None:
            raise ProtoADError(f"no judged frame {frame_id}")
        db.execute(
            "INSERT INTO labels (frame, label, operator, at) VALUES (?, ?, ?, ?)",
            (frame_id, label, operator, time.time()),
        )
        _log(db, operator, address, "label", {"frame": frame_id, "label": label})


def log_action(db: sqlite3.Connection, operator: str, address: str, action: str, detail: dict[str, Any]) -> None:
    with transaction(db):
        _log(db, operator, address, action, detail)


def _log(db: sqlite3.Connection, operator: str, address: str, action: str, detail: dict[str, Any]) -> None:
    db.execute(
        "INSERT INTO actions (at, operator, address, action, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), operator, address, action, json.dumps(detail)),
    )


def labelled(db: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every frame with a label in force, oldest first."""
    rows = db.execute(f"{FRAME_WITH_LABEL} WHERE l.label IS NOT NULL ORDER BY f.id")
    return [frame_dict(row) for row in rows]


def actions(db: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    rows = db.execute("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]
