"""The station database: every judgement of a run, equal to its JSON lines; crash-safe under SIGKILL; written from
its own thread in batches; pictures kept within a retention; a full or read-only disk is one line and judging goes
on; the schema is versioned and documented."""

from __future__ import annotations

import os
import re
import resource
import signal
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import normal_crops, read_jsonl
from station_helpers import Camera, RunProcess, rows, wait_until

from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.loop import RunOptions, run
from protoad_edge.runtime.station import database
from protoad_edge.runtime.station.images import FILES
from protoad_edge.runtime.station.recorder import Judgement, Recorder, Retention

FRAMES = 24


def part(index: int, defect: bool = False, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """A smooth part on a grey belt (RGB); ``defect`` paints a white square on it."""
    crop = normal_crops(1, 96, seed=index % 5)[0]
    frame = np.full((size[1], size[0], 3), 60, np.uint8)
    frame[12:108, 32:128] = crop
    if defect:
        frame[50:70, 70:90] = 255
    return frame


def write_video(path: Path, count: int, defects: set[int]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(count):
        writer.write(cv2.cvtColor(part(i, i in defects), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> OrtBackend:
    return OrtBackend(tiny_model, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "line.avi", FRAMES, {3, 9, 10, 17})


@pytest.fixture(scope="module")
def threshold(video: Path, backend: OrtBackend) -> float:
    """A threshold that flags some frames of the video and passes others (the median score)."""
    scores: list[float] = []
    run(
        str(video),
        backend,
        RunOptions(threshold=1.0, status_every=0, log=lambda m: None, on_frame=lambda r: scores.append(r.score)),
    )
    return float(np.median(scores))


def test_the_database_holds_exactly_the_frames_judged(
    video: Path, tiny_model: Path, threshold: float, tmp_path: Path
) -> None:
    db, jsonl = tmp_path / "line.db", tmp_path / "line.jsonl"
    result = CliRunner().invoke(
        run_main,
        [
            str(video),
            "--model",
            str(tiny_model),
            "--threshold",
            str(threshold),
            "--db",
            str(db),
            "--jsonl",
            str(jsonl),
            "--db-normal-every",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    records, stored = read_jsonl(jsonl), rows(db)
    assert len(stored) == len(records) == FRAMES
    assert 0 < sum(r["verdict"] == "anomaly" for r in records) < FRAMES
    for record, row in zip(records, stored):  # same order, same judgement
        assert (row["frame"], row["source"], row["verdict"], row["score"], row["threshold"]) == (
            record["frame"],
            record["source"],
            record["verdict"],
            record["score"],
            record["threshold"],
        )
        assert (row["timestamp"], row["threshold_rule"], row["model"], row["category"]) == (
            record["timestamp"],
            record["threshold_rule"],
            record["model"],
            record["category"],
        )
        assert np.isclose(row["latency_ms"], record["latency_ms"]) and row["lane"] == str(video)
        assert json_of(row["regions"]) == record["regions"] and json_of(row["roi"]) == record["roi"]
    # pictures: every anomalous frame, and every 5th normal one of the source
    normal_seen, expected = 0, []
    for record in records:
        if record["verdict"] == "ok":
            normal_seen += 1
        expected.append(record["verdict"] == "anomaly" or normal_seen % 5 == 0 and record["verdict"] == "ok")
    kept = [row["images"] is not None for row in stored]
    # a file judged faster than its pictures are written leaves some without (counted in the summary)
    skipped = re.search(r"(\d+) without pictures \(writer behind\)", result.output)
    assert all(want or not got for want, got in zip(expected, kept))
    assert sum(expected) - sum(kept) == (int(skipped.group(1)) if skipped else 0)
    folder = db.with_name("line.db.images")
    for row in stored:
        if row["images"]:
            frame = cv2.imread(str(folder / row["images"] / FILES["frame"]))
            assert frame.shape == (120, 160, 3)
            mask = cv2.imread(str(folder / row["images"] / FILES["mask"]), cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (120, 160) and (mask.max() == 255) == (row["verdict"] == "anomaly")
    assert f"database    {db}: {FRAMES} judgements recorded, {sum(kept)} frames' pictures kept" in result.output
    assert "latency     capture -> database: p50 " in result.output and f"({FRAMES} frames)" in result.output
    run_row = rows(db, "SELECT * FROM runs")[0]
    assert run_row["ended"] >= run_row["started"] and json_of(run_row["sources"]) == [str(video)]


def json_of(text: str) -> object:
    import json

    return json.loads(text)


@pytest.mark.slow
def test_sigkill_leaves_every_committed_row(tiny_model: Path, tmp_path: Path) -> None:
    """A run judging a live camera is killed with SIGKILL while it writes: the file opens, passes SQLite's
    integrity check, and holds every row that a reader saw committed before the kill, whole and in order."""
    camera = Camera(lambda i: part(i, i % 4 == 0), fps=30)
    db = tmp_path / "killed.db"
    process = RunProcess([camera.url, "--model", str(tiny_model), "--db", str(db), "--db-normal-every", "2"], tmp_path)
    try:
        wait_until(lambda: db.exists() and _count(db) >= 20, 60, "20 committed rows")
        seen = _count(db)
        process.process.send_signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
        camera.close()
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    connection.close()
    stored = rows(db)
    assert len(stored) >= seen
    assert [row["id"] for row in stored] == list(range(1, len(stored) + 1))
    frames = [row["frame"] for row in stored]
    assert frames == sorted(set(frames))  # in the order judged (a live source drops what it cannot judge in time)
    assert all(row[column] is not None for row in stored for column in ("score", "verdict", "regions", "roi"))
    # a new run on the same file goes on from there, and the pictures of rows never committed are gone
    named = {row["images"] for row in stored if row["images"]}
    recorder = Recorder(db, "tiny", "tiny", ["again"], log=lambda m: None)
    recorder.close()
    assert {p.name for p in db.with_name("killed.db.images").iterdir()} == named


def _count(db: Path) -> int:
    try:
        return rows(db, "SELECT count(*) AS n FROM frames")[0]["n"]
    except sqlite3.Error:
        return 0


def judgement(index: int, anomalous: bool = False, with_result: object = None) -> Judgement:
    record = {
        "frame": index,
        "timestamp": time.time(),
        "source": "cam",
        "score": 0.5,
        "verdict": "anomaly" if anomalous else "ok",
        "threshold": 0.4,
        "threshold_rule": "manual",
        "model": "m",
        "category": "c",
        "latency_ms": 1.0,
        "roi": [0, 0, 10, 10],
        "regions": [],
    }
    return Judgement(0, record, with_result)  # type: ignore[arg-type]


def test_rows_are_committed_per_batch_of_rows_or_of_time(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "b.db", "m", "c", ["cam"], log=lambda m: None, batch_rows=3, batch_seconds=30)
    try:
        for i in range(3):
            recorder.put(judgement(i))
        wait_until(lambda: _count(tmp_path / "b.db") == 3, 10, "a full batch committed without waiting")
        recorder.put(judgement(3))
        time.sleep(0.5)
        assert _count(tmp_path / "b.db") == 3  # one row waits for its batch's time
    finally:
        recorder.close()
    assert _count(tmp_path / "b.db") == 4  # closing stores what waits
    timed = Recorder(tmp_path / "t.db", "m", "c", ["cam"], log=lambda m: None, batch_rows=100, batch_seconds=0.3)
    try:
        timed.put(judgement(0))
        wait_until(lambda: _count(tmp_path / "t.db") == 1, 5, "the batch's time to commit one row")
    finally:
        timed.close()


def test_a_stalled_disk_never_blocks_the_judging_thread(tmp_path: Path) -> None:
    """Another process holds the database's write lock: the writer waits, ``put`` does not; past the queue's
    bound rows are dropped and counted, in one log line; when the lock goes every queued row is stored."""
    path = tmp_path / "s.db"
    logs: list[str] = []
    recorder = Recorder(path, "m", "c", ["cam"], log=logs.append, batch_rows=1, queue_rows=5)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.perf_counter()
        for i in range(20):
            recorder.put(judgement(i))
        assert time.perf_counter() - started < 0.5
        assert recorder.not_recorded >= 20 - 5 - 2  # the queue's 5, the one being written, one taken meanwhile
        assert len([line for line in logs if "rows behind" in line]) == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    summary = recorder.close()
    assert recorder.recorded + recorder.not_recorded == 20 and recorder.recorded >= 5
    assert f"{recorder.not_recorded:,} not recorded" in summary


def test_retention_removes_the_oldest_pictures_first_and_keeps_every_row(
    video: Path, backend: OrtBackend, tmp_path: Path
) -> None:
    path = tmp_path / "r.db"
    recorder = Recorder(
        path,
        "m",
        "c",
        [str(video)],
        Retention(keep_count=3, keep_bytes=10**9, normal_every=1),
        log=lambda m: None,
        image_backlog=FRAMES,
    )
    run(
        str(video),
        backend,
        RunOptions(threshold=1.0, status_every=0, log=lambda m: None, lane_sinks=lambda i, s: [recorder.sink(i)]),
    )
    recorder.close()
    stored = rows(path)
    assert len(stored) == FRAMES
    assert [row["frame"] for row in stored if row["images"]] == [FRAMES - 3, FRAMES - 2, FRAMES - 1]
    assert sorted(p.name for p in (tmp_path / "r.db.images").iterdir()) == [r["images"] for r in stored[-3:]]
    # by size: the newest that fit in the bytes allowed
    one = sum(f.stat().st_size for f in (tmp_path / "r.db.images" / stored[-1]["images"]).iterdir())
    sized = tmp_path / "z.db"
    recorder = Recorder(
        sized,
        "m",
        "c",
        [str(video)],
        Retention(keep_count=100, keep_bytes=int(2.5 * one), normal_every=1),
        log=lambda m: None,
        image_backlog=FRAMES,
    )
    run(
        str(video),
        backend,
        RunOptions(threshold=1.0, status_every=0, log=lambda m: None, lane_sinks=lambda i, s: [recorder.sink(i)]),
    )
    recorder.close()
    kept = [row["frame"] for row in rows(sized) if row["images"]]
    assert kept == [FRAMES - 2, FRAMES - 1] and len(rows(sized)) == FRAMES


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
def test_pictures_that_cannot_be_written_are_one_line_and_judging_goes_on(tiny_model: Path, tmp_path: Path) -> None:
    """Files may not grow past 256 KB (RLIMIT_FSIZE, as a full disk would stop them): every 640x480 frame's picture
    fails (EFBIG). The run judges every frame, says so once, and records every row without pictures."""
    limit = 256 * 1024
    rng = np.random.default_rng(0)
    noisy = tmp_path / "noisy.avi"
    writer = cv2.VideoWriter(str(noisy), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for _ in range(FRAMES):
        writer.write(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    writer.release()

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = RunProcess(
        [
            str(noisy),
            "--model",
            str(tiny_model),
            "--db",
            "full.db",
            "--db-normal-every",
            "1",
            "--threshold",
            "1.0",
            "--status-every",
            "0",
        ],
        tmp_path,
        preexec=small_files,
    )
    assert process.wait(120) == 0, process.log
    log = process.log + "\n" + process.stdout
    assert f"frames      {FRAMES}, anomalies 0" in log
    pictures = [line for line in log.splitlines() if "cannot keep pictures" in line]
    assert len(pictures) == 1 and "File too large" in pictures[0] and "judging goes on" in pictures[0], log
    stored = rows(tmp_path / "full.db")
    assert len(stored) == FRAMES and not any(row["images"] for row in stored)
    assert f"{FRAMES} judgements recorded, 0 frames' pictures kept" in log


def test_a_full_database_is_one_line_until_it_has_room_again(tmp_path: Path) -> None:
    """SQLite's own 'database or disk is full' (the file may not pass max_page_count): one line, the rows counted,
    and one line when rows are stored again."""
    logs: list[str] = []
    recorder = Recorder(tmp_path / "f.db", "m", "c", ["cam"], log=logs.append, batch_rows=1)
    assert recorder.db is not None
    pages = recorder.db.execute("PRAGMA page_count").fetchone()[0]
    recorder.db.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(200):
        recorder.put(judgement(i))
    wait_until(lambda: recorder.recorded + recorder.not_recorded == 200, 30, "200 rows handled")
    assert recorder.not_recorded > 0
    full = [line for line in logs if "database or disk is full" in line]
    assert len(full) == 1 and "judging goes on" in full[0]
    recorder.db.execute(f"PRAGMA max_page_count = {10 * pages + 1000}")
    recorder.put(judgement(200))
    recorder.close()
    assert logs[-1].startswith("station: recording into") and "again" in logs[-1]
    assert len(rows(tmp_path / "f.db")) == recorder.recorded


def test_a_read_only_database_is_one_line_and_judging_goes_on(tiny_model: Path, video: Path, tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    database.connect(path, create=True).close()
    with read_only(path):
        result = CliRunner().invoke(
            run_main,
            [str(video), "--model", str(tiny_model), "--db", str(path), "--threshold", "1.0", "--status-every", "0"],
        )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "readonly database" in line]
    assert len(lines) == 1 and str(path) in lines[0] and "judging goes on" in lines[0], result.output
    assert f"frames      {FRAMES}" in result.output and f"0 judgements recorded, {FRAMES} not recorded" in result.output


def test_a_database_another_run_records_into_is_refused_in_one_line(
    tiny_model: Path, video: Path, tmp_path: Path
) -> None:
    """Two runs recording into one file would trim each other's pictures and interleave their rows: while one
    records, another is refused before it judges; once the first has ended (or died), the file is free."""
    path = tmp_path / "line.db"
    holder = Recorder(path, "tiny", "tiny", ["cam"], log=lambda m: None)
    try:
        args = [str(video), "--model", str(tiny_model), "--db", str(path), "--status-every", "0"]
        result = CliRunner().invoke(run_main, args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert f"the station database {path} is being recorded into by another protoad-run" in errors[0]
    finally:
        holder.close()
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 0 and f"{FRAMES} judgements recorded" in result.output, result.output


class read_only:
    """The file cannot be written, even by root: immutable (chattr +i) for root, mode 0444 for anyone else."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        if os.geteuid() == 0:
            import subprocess

            subprocess.run(["chattr", "+i", str(self.path)], check=True)
        else:
            self.path.chmod(0o444)

    def __exit__(self, *exc: object) -> None:
        if os.geteuid() == 0:
            import subprocess

            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            self.path.chmod(0o644)


def test_schema_is_versioned_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    db = database.connect(path, create=True)
    assert db.execute("PRAGMA user_version").fetchone()[0] == database.SCHEMA_VERSION == 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {database.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ProtoADError, match=r"schema 2, newer than this protoad-edge reads \(1\)"):
        database.connect(path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(ProtoADError, match="not a station database"):
        database.connect(other, create=True)
    (tmp_path / "text.db").write_text("hello, not SQLite at all" * 100)
    with pytest.raises(ProtoADError, match="cannot use .*text.db as the station database"):
        database.connect(tmp_path / "text.db", create=True)


def test_every_column_is_documented(tmp_path: Path) -> None:
    """The module's docstring is the schema's documentation: each table and column is named in it."""
    db = database.connect(tmp_path / "d.db", create=True)
    doc = database.__doc__ or ""
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        assert f"``{table}``" in doc
        for column in db.execute(f"PRAGMA table_info({table})").fetchall():
            assert f"``{column[1]}``" in doc, f"{table}.{column[1]} is not documented"
    db.close()


def test_labels_keep_their_history_and_the_newest_is_in_force(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    recorder = Recorder(path, "m", "c", ["cam"], log=lambda m: None)
    recorder.put(judgement(0, anomalous=True))
    recorder.close()
    db = database.connect(path)
    database.add_label(db, 1, "real-defect", "ana", "127.0.0.1")
    database.add_label(db, 1, "false-alarm", "ben", "127.0.0.1")
    assert [f["label"] for f in database.labelled(db)] == ["false-alarm"]
    assert len(rows(path, "SELECT * FROM labels")) == 2
    assert [(a["operator"], a["action"], a["detail"]) for a in database.actions(db)] == [
        ("ben", "label", {"frame": 1, "label": "false-alarm"}),
        ("ana", "label", {"frame": 1, "label": "real-defect"}),
    ]
    with pytest.raises(ProtoADError, match="unknown label 'good'"):
        database.add_label(db, 1, "good", "ana", "127.0.0.1")
    with pytest.raises(ProtoADError, match="no judged frame 7"):
        database.add_label(db, 7, "real-defect", "ana", "127.0.0.1")
    db.close()


def test_writing_happens_off_the_judging_thread(tmp_path: Path, video: Path, backend: OrtBackend) -> None:
    """SQLite and the pictures are touched only by the recorder's thread."""
    recorder = Recorder(tmp_path / "w.db", "m", "c", [str(video)], log=lambda m: None)
    judging = threading.get_ident()
    writers: set[int] = set()
    store = recorder._store

    def spy(batch):  # type: ignore[no-untyped-def]
        writers.add(threading.get_ident())
        store(batch)

    recorder._store = spy  # type: ignore[method-assign]
    run(
        str(video),
        backend,
        RunOptions(threshold=0.0, status_every=0, log=lambda m: None, lane_sinks=lambda i, s: [recorder.sink(i)]),
    )
    recorder.close()
    assert writers and judging not in writers and len(rows(tmp_path / "w.db")) == FRAMES


def test_frames_waiting_for_their_pictures_are_bounded(tmp_path: Path) -> None:
    """The writer is stalled (another process holds the write lock): past ``image_backlog`` frames waiting for their
    pictures, the next ones are queued without (each would hold its frame in memory), and counted."""
    from test_station_live import judged

    import protoad_edge.runtime.station.recorder as recorder_module

    assert recorder_module.IMAGE_BACKLOG == 8
    path = tmp_path / "p.db"
    recorder = Recorder(path, "m", "c", ["cam"], log=lambda m: None, batch_rows=1, image_backlog=2)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(6):
            result = judged(i)
            recorder.put(Judgement(0, result.record(), result))
        assert 6 - 2 - 1 <= recorder.images_skipped <= 6 - 2  # the writer may have taken the first meanwhile
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    summary = recorder.close()
    kept = [row for row in rows(path) if row["images"]]
    assert len(rows(path)) == 6 and len(kept) == 6 - recorder.images_skipped
    assert f"{recorder.images_skipped} without pictures (writer behind)" in summary
