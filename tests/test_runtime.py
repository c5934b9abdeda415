"""The torch-free runtime: sources, the capture thread and its reconnect schedule, model discovery,
the sidecar check, the overlay, and the ``run`` loop's clean endings (Ctrl-C, a source that dies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from protoad_edge.bundle import Bundle
from protoad_edge.errors import ProtoADError
from protoad_edge.preprocess import Preprocess, to_batch
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.loop import RunAborted, RunOptions, StopRequest, run, run_many
from protoad_edge.runtime.outputs.overlay import DIM, HEADER, HEADER_SHADE, JUDGED_BGR, render
from protoad_edge.runtime.outputs.sinks import PendingFile, VideoSink, display_problem
from protoad_edge.runtime.result import FrameResult, RunContext
from protoad_edge.runtime.sources.capture import Capture, Reconnect
from protoad_edge.runtime.sources.source import CSI_PIPELINE, OpenCVSource, SourceSpec, open_source, parse_source

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- sources


def test_parse_source_kinds(tmp_path: Path) -> None:
    assert parse_source("camera0") == SourceSpec("camera", 0, "camera0", live=True)
    assert parse_source("2").target == 2 and parse_source("2").name == "camera2"
    csi = parse_source("csi1")
    assert csi.kind == "csi" and csi.live
    assert csi.target.startswith("nvarguscamerasrc sensor-id=1 !") and csi.target.endswith(
        "appsink drop=true max-buffers=1"
    )
    assert CSI_PIPELINE.count("!") == csi.target.count("!")
    assert parse_source("rtsp://10.0.0.5/stream").kind == "stream"
    assert parse_source("https://cam.local/mjpg").kind == "stream"
    assert parse_source("videotestsrc ! videoconvert ! appsink").kind == "gstreamer"
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "a.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    folder = parse_source(str(tmp_path))
    assert folder.kind == "folder" and not folder.live
    assert [p.name for p in folder.target] == ["a.JPG", "b.png"]
    assert parse_source(str(tmp_path / "b.png")).kind == "image"
    assert parse_source(str(tmp_path / "notes.txt")).kind == "video"


def test_parse_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtoADError, match="source not found: .*nope.mp4"):
        parse_source(str(tmp_path / "nope.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtoADError, match="no images .* in folder .*empty"):
        parse_source(str(tmp_path / "empty"))


class Plan:
    """A script for FakeCapture: ``reads`` is consumed across reopens (True: a frame, False: none);
    once used up every read fails. ``opens`` says whether each (re)open succeeds (default: yes)."""

    def __init__(self, reads: list[bool], opens: list[bool] | None = None) -> None:
        self.reads = list(reads)
        self.opens = list(opens or [])
        self.open_calls = 0
        self.releases = 0
        self.served = 0

    def read(self) -> tuple[bool, np.ndarray | None]:
        ok = self.reads.pop(0) if self.reads else False
        if not ok:
            return False, None
        frame = np.zeros((8, 10, 3), np.uint8)
        frame[..., 0] = self.served  # blue (BGR) carries the frame number
        frame[..., 2] = 50  # red
        self.served += 1
        return True, frame


class FakeCapture:
    """cv2.VideoCapture stand-in; each instance is one (re)open of the same Plan."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        plan.open_calls += 1
        self.opened = plan.opens.pop(0) if plan.opens else True

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        return self.plan.read() if self.opened else (False, None)

    def get(self, prop: int) -> float:
        return 25.0

    def release(self) -> None:
        self.plan.releases += 1


def fake_source(plan: Plan, live: bool) -> OpenCVSource:
    spec = SourceSpec("camera" if live else "video", 0 if live else "fake.mp4", "camera0" if live else "fake.mp4", live)
    return open_source(spec, open_capture=lambda target, api: FakeCapture(plan))


def wait_for(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_opencv_source_gives_rgb_and_fps() -> None:
    source = fake_source(Plan([True]), live=False)
    rgb, label = source.read()
    assert source.fps == 25.0 and label == "fake.mp4"
    assert rgb.shape == (8, 10, 3) and tuple(rgb[0, 0]) == (50, 0, 0) and source.read() is None
    plan = Plan([], opens=[False])
    with pytest.raises(ProtoADError, match="cannot open camera0 .*camera index 0"):
        fake_source(plan, live=True)
    assert plan.releases == 1


def test_file_source_never_drops_and_ends() -> None:
    plan = Plan([True] * 10)
    capture = Capture(fake_source(plan, live=False), queue_size=2).start()
    wait_for(lambda: plan.served >= 3)  # two frames queued, the third waits in the reader's hand
    time.sleep(0.05)
    assert plan.served == 3 and capture._queue.qsize() == 2  # and no more: a file source waits, never drops
    frames = []
    while (frame := capture.get()) is not None:
        frames.append(frame)
    assert [f.index for f in frames] == list(range(10))
    assert [int(f.rgb[0, 0, 2]) for f in frames] == list(range(10))  # BGR -> RGB: blue lands in channel 2
    assert capture.dropped == 0 and capture.get() is None
    capture.stop()
    assert plan.releases == 1


def test_file_without_frames_is_an_error() -> None:
    capture = Capture(fake_source(Plan([]), live=False)).start()
    with pytest.raises(ProtoADError, match="no frame could be read from fake.mp4"):
        capture.get()


class FakeClock:
    """Time that passes only when the capture sleeps between reconnects."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        self.now += seconds
        return False

    def __call__(self) -> float:
        return self.now


def test_live_source_drops_stale_frames_then_gives_up_after_the_reconnect_timeout() -> None:
    plan = Plan([True] * 10, opens=[True] + [False] * 5)
    clock = FakeClock()
    policy = Reconnect(first=0.5, factor=2.0, longest=2.0, give_up_after=7.5)
    capture = Capture(
        fake_source(plan, live=True), queue_size=2, reconnect=policy, sleep=clock.sleep, clock=clock
    ).start()
    wait_for(lambda: len(clock.pauses) == 5 and plan.open_calls == 6)
    got = [capture.get().index, capture.get().index]
    assert got == [8, 9]  # only the newest frames survive a slow consumer
    with pytest.raises(
        ProtoADError,
        match=r"camera0 stopped delivering frames: nothing for 8 s after 5 reconnect "
        r"attempts \(--reconnect-timeout 7.5 s\)",
    ):
        capture.get()
    assert clock.pauses == [0.5, 1.0, 2.0, 2.0, 2.0]  # growing, then capped, until 7.5 s without a frame
    assert capture.dropped == 8 and capture.reconnects == 0


def test_reconnect_resets_the_schedule_after_a_frame_and_keeps_the_gap() -> None:
    plan = Plan([True, True, True, False, False, True, True])
    clock = FakeClock()
    messages: list[str] = []
    capture = Capture(
        fake_source(plan, live=True),
        queue_size=16,
        sleep=clock.sleep,
        clock=clock,
        reconnect=Reconnect(first=0.5, longest=4.0, give_up_after=3.0),
        log=messages.append,
    ).start()
    frames = []
    with pytest.raises(ProtoADError, match="nothing for 3 s after 3 reconnect attempts"):
        while True:
            frames.append(capture.get())
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert clock.pauses == [0.5, 1.0, 0.5, 1.0, 1.5]  # starts again after frames; the last ends at the timeout
    assert capture.reconnects == 1 and capture.dropped == 0 and capture.gaps == [1.5]
    assert plan.open_calls == 1 + 5
    assert "camera0: no frame for 0.0 s, reconnect attempt 1 in 0.5 s" in messages
    assert "camera0: frames again after 1.5 s without frames (2 reconnect attempts)" in messages


def test_stop_during_a_reconnect_pause_ends_quietly() -> None:
    plan = Plan([True, True])
    capture = Capture(fake_source(plan, live=True), reconnect=Reconnect(first=30.0, longest=30.0)).start()
    assert capture.get().index == 0 and capture.get().index == 1
    wait_for(lambda: plan.open_calls == 1 and not plan.reads)
    t0 = time.monotonic()
    capture.stop()  # the default sleep is the stop event: no 30 s wait
    assert time.monotonic() - t0 < 2.0
    assert not capture._thread.is_alive() and plan.releases == 1


def test_stop_unblocks_a_reader_waiting_on_a_full_queue() -> None:
    plan = Plan([True] * 100)
    capture = Capture(fake_source(plan, live=False), queue_size=1).start()
    wait_for(lambda: plan.served == 2)
    capture.stop(timeout=2.0)
    assert not capture._thread.is_alive() and plan.releases == 1


# ---------------------------------------------------------------- models


def test_sidecar_must_match_the_onnx(tiny_model: Path, tmp_path: Path) -> None:
    info = OrtBackend(tiny_model, providers=["CPUExecutionProvider"]).info
    assert Bundle.of(tiny_model).in_force(info, tiny_model) == info  # the pair the build wrote
    model = tmp_path / "tiny.onnx"
    model.symlink_to(tiny_model)
    assert Bundle.of(model).in_force(info, model) is info  # no sidecar: the embedded metadata
    side = json.loads(tiny_model.with_suffix(".json").read_text())
    side.update(crop=96, num_prototypes=7, gpu_name="another GPU", build={"note": "informative only"})
    (tmp_path / "tiny.json").write_text(json.dumps(side))
    with pytest.raises(
        ProtoADError, match=r"sidecar .*tiny.json does not match .*tiny.onnx \(crop 96 vs 64; num_prototypes 7 vs 48\)"
    ):
        OrtBackend(model, providers=["CPUExecutionProvider"])
    (tmp_path / "tiny.json").write_text("{not json")
    with pytest.raises(ProtoADError, match="cannot read model sidecar .*tiny.json"):
        Bundle.of(model).in_force(info, model)


# ---------------------------------------------------------------- overlay and outputs


def test_overlay_shows_the_frame_as_it_is_with_the_judged_area_and_the_heat_where_it_matters() -> None:
    rgb = np.full((360, 640, 3), 120, np.uint8)
    pre = Preprocess(72, 64, roi=(200, 100, 200, 200), fit="resize")
    geometry = pre.geometry(640, 360)
    amap = np.full((64, 64), 0.1, np.float32)  # a good part: far below the pixel threshold
    amap[20:30, 20:30] = 1.0
    ok = render(
        rgb,
        np.full((64, 64), 0.1, np.float32),
        geometry,
        score=0.1,
        anomalous=False,
        threshold=0.5,
        pixel_threshold=0.4,
        fps=30.0,
    )
    bad = render(rgb, amap, geometry, score=1.0, anomalous=True, threshold=0.5, pixel_threshold=0.4)
    assert ok.shape == bad.shape == (360, 640, 3)  # the frame's own size: the header is drawn inside it
    view, defect = ok, bad
    assert (view[150:250, 250:350] == 120).all()  # inside the judged area a good part looks like itself
    assert (view[HEADER:90, 10:190] == round(120 * DIM)).all()  # outside it is dimmed, not hidden
    assert tuple(view[100, 300]) == JUDGED_BGR and tuple(view[299, 300]) == JUDGED_BGR  # the judged area outlined
    band = view[:HEADER, 400:]  # the header's band, right of its text: the frame shows through, darkened
    assert (band == int(round(120 * DIM) * (1 - HEADER_SHADE))).all() and band.max() > 0
    ys, xs = np.nonzero(np.all(defect == 255, axis=2))  # the white outline of the defect, in frame pixels
    assert (
        200 + 20 * 200 / 64 - 4 <= xs.min()
        and xs.max() <= 200 + 30 * 200 / 64 + 4
        and 100 + 20 * 200 / 64 - 4 <= ys.min()
    )
    assert not np.array_equal(defect[170:190, 270:290], view[170:190, 270:290])  # heat on the defect
    assert (defect[250:290, 350:390] == 120).all()  # and none on the rest of the part
    assert not np.array_equal(ok[:HEADER], bad[:HEADER])  # the verdict is written in the header
    small = render(rgb, amap, geometry, score=1.0, anomalous=True, threshold=0.5, pixel_threshold=0.4, view_width=320)
    assert small.shape == (180, 320, 3)  # --view-width: the frame scaled, nothing added


def test_pending_file_commit_and_discard(tmp_path: Path) -> None:
    pending = PendingFile(tmp_path / "sub" / "out.mp4")
    assert pending.tmp.parent == tmp_path / "sub" and pending.tmp.suffix == ".mp4"
    pending.tmp.write_bytes(b"data")
    assert not (tmp_path / "sub" / "out.mp4").exists()
    assert pending.commit().read_bytes() == b"data"
    other = PendingFile(tmp_path / "other.jsonl")
    other.discard()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.mp4"]
    with pytest.raises(ProtoADError, match="sub is a folder"):
        PendingFile(tmp_path / "sub")


def frame_count(path: Path) -> int:
    """Frames OpenCV reads back from a video file."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    return count


def frame_result(index: int, timestamp: float, anomalous: bool = False) -> FrameResult:
    pre = Preprocess(36, 32)
    return FrameResult(
        index,
        timestamp,
        "camera0",
        0.5,
        anomalous,
        1.0,
        np.zeros((32, 48, 3), np.uint8),
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((32, 32), np.float32),
        pre.geometry(48, 32),
        RunContext("m.onnx", "m", 0.4, "rule"),
    )


def test_video_of_a_live_source_is_padded_to_real_time(tmp_path: Path) -> None:
    video = VideoSink(tmp_path / "live.mp4", fps=10.0, live=True)
    view = np.zeros((32, 48, 3), np.uint8)
    for i, t in enumerate((100.0, 100.35, 100.36)):  # a slow model: the 2nd view covers 0.1-0.3 s too
        assert video.write(frame_result(i, t), view)
    assert video.close(keep=True) == str(tmp_path / "live.mp4")
    assert video.frames == frame_count(tmp_path / "live.mp4") == 5


def test_video_of_a_file_source_has_one_frame_per_frame(tmp_path: Path) -> None:
    video = VideoSink(tmp_path / "file.mp4", fps=10.0, live=False)
    view = np.zeros((32, 48, 3), np.uint8)
    for i, t in enumerate((100.0, 100.35, 109.0)):
        video.write(frame_result(i, t), view)
    assert video.close(keep=True) == str(tmp_path / "file.mp4")
    assert video.frames == frame_count(tmp_path / "file.mp4") == 3


def test_no_display_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    problem = display_problem()
    if sys.platform.startswith("linux"):
        assert problem is not None and "DISPLAY" in problem


# ---------------------------------------------------------------- the run loop


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: Path) -> OrtBackend:
    return OrtBackend(tiny_model, BackendOptions(threads=2), providers=["CPUExecutionProvider"])


def colour_source(n: int, live: bool, size: tuple[int, int] = (80, 96)) -> tuple[OpenCVSource, Plan]:
    class Coloured(Plan):
        def read(self) -> tuple[bool, np.ndarray | None]:
            ok, _ = super().read()
            if not ok:
                return False, None
            rng = np.random.default_rng(self.served)
            return True, rng.integers(0, 255, (*size, 3), dtype=np.uint8)

    plan = Coloured([True] * n, opens=[True] + [False] * 8)
    return fake_source(plan, live), plan


def test_run_scores_every_frame_with_the_build_preprocessing(tiny_backend: OrtBackend, tmp_path: Path) -> None:
    source, _ = colour_source(4, live=False)
    seen = []
    summary = run(
        source,
        tiny_backend,
        RunOptions(threshold=-1.0, on_frame=seen.append, save_masks=tmp_path / "m", log=lambda m: None),
    )
    assert summary.frames == summary.anomalies == 4 and summary.stopped == "end of source"
    pre = tiny_backend.info.preprocess
    for result in seen:
        rgb = cv2.cvtColor(
            np.random.default_rng(result.index + 1).integers(0, 255, (80, 96, 3), dtype=np.uint8), cv2.COLOR_BGR2RGB
        )
        np.testing.assert_array_equal(result.crop, pre(rgb))
        expected = tiny_backend.infer(to_batch(pre(rgb)))[1][0]
        assert result.score == pytest.approx(float(expected), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert set(summary.percentiles()) == {"p50", "p90", "p99"} and summary.fps > 0


def test_a_score_equal_to_the_threshold_is_normal(tiny_backend: OrtBackend) -> None:
    """The run applies the verdict score > threshold: a frame scoring exactly the threshold passes."""
    first, _ = colour_source(3, live=False)
    scores: list[float] = []
    run(first, tiny_backend, RunOptions(threshold=1.0, on_frame=lambda r: scores.append(r.score), log=lambda m: None))
    middle = sorted(scores)[1]
    again, _ = colour_source(3, live=False)
    seen: list = []
    summary = run(again, tiny_backend, RunOptions(threshold=middle, on_frame=seen.append, log=lambda m: None))
    assert [r.score for r in seen] == scores  # the same frames, the same scores
    assert [r.anomalous for r in seen] == [s > middle for s in scores] and summary.anomalies == 1
    assert [r.anomalous for r in seen if r.score == middle] == [False]


def test_masks_use_the_pixel_threshold_capped_at_the_threshold_in_force(
    tiny_backend: OrtBackend, tmp_path: Path
) -> None:
    """With --threshold below the model's pixel threshold, the mask outlines map > --threshold."""
    info = tiny_backend.info
    source, _ = colour_source(2, live=False)
    seen: list = []
    low = 0.75 * info.pixel_threshold  # maps are 1 - cosine >= 0
    run(source, tiny_backend, RunOptions(threshold=low, on_frame=seen.append, save_masks=tmp_path, log=lambda m: None))
    assert all(r.anomalous for r in seen)
    for r in seen:
        with Image.open(tmp_path / f"{r.index:06d}.png") as im:
            mask = np.asarray(im)
        assert mask.shape == r.frame.shape[:2]  # frame pixels
        expected = r.geometry.to_frame(np.where(r.anomaly_map > low, 255, 0).astype(np.uint8))
        np.testing.assert_array_equal(mask, expected)
        uncapped = r.geometry.to_frame(np.where(r.anomaly_map > info.pixel_threshold, 255, 0).astype(np.uint8))
        assert (uncapped == 255).sum() < (mask == 255).sum()  # the cap made a difference


def test_a_headless_run_shows_it_is_alive(tiny_backend: OrtBackend) -> None:
    source, _ = colour_source(3, live=False)
    notes: list[str] = []
    run(source, tiny_backend, RunOptions(threshold=-1.0, status_every=1e-9, log=notes.append))
    status = [n for n in notes if n.startswith("status: ")]
    assert len(status) == 3 and status[-1].startswith("status: 3 frames in ")
    assert "3 anomalies, 0 dropped, 0 reconnects" in status[-1] and "FPS" in status[-1]
    quiet: list[str] = []
    run(colour_source(3, live=False)[0], tiny_backend, RunOptions(status_every=0, log=quiet.append))
    assert not [n for n in quiet if n.startswith("status: ")]


def test_ctrl_c_finalises_every_output(tiny_backend: OrtBackend, tmp_path: Path) -> None:
    source, plan = colour_source(50, live=False)

    def interrupt(result) -> None:
        if result.index == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    summary = run(
        source,
        tiny_backend,
        RunOptions(jsonl=out / "log.jsonl", save=out / "view.mp4", on_frame=interrupt, log=lambda m: None),
    )
    assert summary.stopped == "interrupted" and summary.frames == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert frame_count(out / "view.mp4") == 3
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "view.mp4"]  # no temporary files left
    assert plan.releases == 1


def test_a_stop_request_ends_the_run_between_frames_even_while_it_waits(
    tiny_backend: OrtBackend, tmp_path: Path
) -> None:
    """What protoad-run's SIGINT/SIGTERM handlers do: the run ends after whole frames, also when the
    source has nothing to give (a live camera that went quiet is still being waited for)."""
    source, _ = colour_source(3, live=True)  # three frames, then the camera delivers nothing
    stop = StopRequest()
    log = tmp_path / "log.jsonl"

    def after_last_frame(result) -> None:
        if result.index == 2:
            threading.Timer(0.3, stop.request, args=("terminated",)).start()

    started = time.monotonic()
    summary = run(
        source,
        tiny_backend,
        RunOptions(
            jsonl=log,
            stop=stop,
            on_frame=after_last_frame,
            reconnect=Reconnect(first=30.0, longest=30.0),
            queue_size=8,
            log=lambda m: None,
        ),
    )
    assert summary.stopped == "terminated" and summary.frames == 3
    assert time.monotonic() - started < 10  # not the 30 s reconnect pause
    assert [json.loads(line)["frame"] for line in log.read_text().splitlines()] == [0, 1, 2]
    stop.request("interrupted")
    assert stop.reason == "terminated"  # the first request names the ending


def test_source_dying_mid_run_keeps_the_outputs(tiny_backend: OrtBackend, tmp_path: Path) -> None:
    source, plan = colour_source(3, live=True)
    log = tmp_path / "log.jsonl"
    with pytest.raises(RunAborted, match="camera0 stopped delivering frames") as caught:
        run(
            source,
            tiny_backend,
            RunOptions(
                jsonl=log, reconnect=Reconnect(first=0.01, give_up_after=0.05), queue_size=8, log=lambda m: None
            ),
        )
    assert caught.value.summary.frames == 3 and caught.value.summary.stopped == "failed"
    assert [json.loads(line)["frame"] for line in log.read_text().splitlines()] == [0, 1, 2]
    assert plan.open_calls >= 2  # reopened at least once before giving up


def test_a_source_failing_mid_run_does_not_stop_the_others(tiny_backend: OrtBackend, tmp_path: Path) -> None:
    dying, _ = colour_source(3, live=True)  # three frames, then a camera that never comes back
    steady, _ = colour_source(12, live=False)
    log = tmp_path / "log.jsonl"
    first, second = run_many(
        [dying, steady],
        tiny_backend,
        RunOptions(
            jsonl=log,
            reconnect=Reconnect(first=0.01, give_up_after=0.05),
            queue_size=8,
            status_every=0,
            log=lambda m: None,
        ),
    )
    assert (first.frames, first.stopped) == (3, "failed") and "camera0 stopped delivering frames" in first.error
    assert (second.frames, second.stopped, second.error) == (12, "end of source", "")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["frame"] for r in records if r["source"] == "camera0"] == [0, 1, 2]
    assert [r["frame"] for r in records if r["source"] == "fake.mp4"] == list(range(12))


def test_frames_of_several_sources_share_one_backend_call(tiny_backend: OrtBackend) -> None:
    class Counting(OrtBackend):
        def __init__(self, inner: OrtBackend) -> None:
            self.__dict__.update(inner.__dict__)
            self.batches: list[int] = []

        def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.batches.append(len(batch))
            return super().infer(batch)

    counting = Counting(tiny_backend)
    sources = [colour_source(6, live=False)[0] for _ in range(3)]
    summaries = run_many(sources, counting, RunOptions(status_every=0, log=lambda m: None))
    assert [s.frames for s in summaries] == [6, 6, 6]
    assert max(counting.batches[1:]) > 1 and sum(counting.batches[1:]) == 18  # after the warm-up, batched
    counting.max_batch = 2
    counting.batches.clear()
    run_many(
        [colour_source(6, live=False)[0] for _ in range(3)], counting, RunOptions(status_every=0, log=lambda m: None)
    )
    assert max(counting.batches[1:]) <= 2  # never more than the backend's largest batch


def test_a_backend_answering_for_fewer_frames_than_it_was_given_stops_the_run(tiny_backend: OrtBackend) -> None:
    """Results are paired with frames by position: a batch answered short would leave a frame without a record in
    silence, so it is an error naming the model instead."""

    class Short(OrtBackend):
        def __init__(self, inner: OrtBackend) -> None:
            self.__dict__.update(inner.__dict__)

        def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            maps, scores = super().infer(batch)
            return (maps[:-1], scores[:-1]) if len(batch) > 1 else (maps, scores)

    sources = [colour_source(4, live=False)[0] for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"tiny.* 1 scores for a batch of 2 frames"):
        run_many(sources, Short(tiny_backend), RunOptions(status_every=0, log=lambda m: None))


def test_error_before_the_first_frame_leaves_no_files(tiny_backend: OrtBackend, tmp_path: Path) -> None:
    source = fake_source(Plan([]), live=False)
    with pytest.raises(ProtoADError, match="no frame could be read") as caught:
        run(source, tiny_backend, RunOptions(jsonl=tmp_path / "log.jsonl", save=tmp_path / "v.mp4"))
    assert not isinstance(caught.value, RunAborted)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- no torch


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError('torch is blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_without_torch(tiny_model: Path, tmp_path: Path) -> None:
    image = tmp_path / "part.png"
    Image.fromarray(np.full((70, 90, 3), 100, np.uint8)).save(image)
    code = (
        BLOCK_TORCH
        + f"""
import protoad_edge.runtime, protoad_edge.runtime.loop, protoad_edge.runtime.backends.ort
import protoad_edge.cli.run
assert 'torch' not in sys.modules
sys.argv = ['protoad-run', {str(image)!r}, '--model', {str(tiny_model)!r}, '--jsonl', '-']
protoad_edge.cli.run.main()
"""
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["source"] == str(image) and record["verdict"] in ("ok", "anomaly")


# ---------------------------------------------------------------- sources: one clear line


def test_a_folder_with_images_only_in_subfolders_names_them(tmp_path: Path) -> None:
    for sub in ("test/good", "test/crack", "train/good", "train/more"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "000.png").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"")
    with pytest.raises(ProtoADError) as caught:
        parse_source(str(tmp_path))
    message = str(caught.value)
    shown = ", ".join(str(tmp_path / sub) for sub in ("test/crack", "test/good", "train/good"))
    assert message.endswith(f"only in its subfolders ({shown}, ...): pass one of them"), message
    with pytest.raises(ProtoADError) as caught:
        parse_source(str(tmp_path / "test"))
    assert str(caught.value).endswith(f"({tmp_path / 'test/crack'}, {tmp_path / 'test/good'}): pass one of them")


def test_opening_keeps_the_video_libraries_quiet_and_quotes_them_in_the_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """An absent camera printed a dozen OpenCV WARN/ERROR lines (and FFmpeg its own, on fd 2) before our error."""
    levels = []

    def noisy_open(target: object, api: int) -> FakeCapture:
        levels.append(cv2.utils.logging.getLogLevel())
        os.write(2, b"[ WARN:0@0.019] global cap_v4l.cpp:914 open VIDEOIO(V4L2:/dev/video7): can't open camera\n")
        os.write(2, b"[tcp @ 0x5608f82fa340] Connection to tcp://10.0.0.5:554 failed: Connection refused\n")
        return FakeCapture(Plan([], opens=[False]))

    before = cv2.utils.logging.getLogLevel()
    spec = SourceSpec("stream", "rtsp://10.0.0.5/x", "rtsp://10.0.0.5/x", live=True)
    with pytest.raises(ProtoADError) as caught:
        open_source(spec, open_capture=noisy_open)
    assert str(caught.value) == (
        "cannot open stream rtsp://10.0.0.5/x: unreachable, or a format OpenCV cannot "
        "decode? (OpenCV's backend: Connection to tcp://10.0.0.5:554 failed: Connection "
        "refused)"
    )
    assert levels == [cv2.utils.logging.LOG_LEVEL_SILENT] and cv2.utils.logging.getLogLevel() == before
    assert capfd.readouterr().err == ""
    opened = open_source(spec, open_capture=lambda target, api: FakeCapture(Plan([True])))
    assert opened.read() is not None and capfd.readouterr().err == ""  # what it said on success is dropped
    sys.stderr.write("stderr is back\n")
    assert capfd.readouterr().err == "stderr is back\n"
