"""``protoad-run`` end to end on CPU (onnxruntime): a generated video, an image folder, an image file.

Scores in the JSON lines must equal the build stage's path for the same pixels (Pillow decoding +
Preprocess + to_batch + OrtBackend), and every bad input must end in one 'error:' line that names
the culprit, a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import normal_crops, read_jsonl
from PIL import Image
from processes import finish

from protoad_edge.cli.run import main
from protoad_edge.preprocess import load_rgb, to_batch
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.sources.source import has_gstreamer

FRAMES = 12
DEFECT_FRAMES = (3, 7, 11)


def invoke(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def video_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> OrtBackend:
    return OrtBackend(tiny_model, providers=["CPUExecutionProvider"])


def reference_scores(backend: OrtBackend, rgb_images: list[np.ndarray]) -> np.ndarray:
    pre = backend.info.preprocess
    return backend.infer(to_batch([pre(rgb) for rgb in rgb_images]))[1]


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 frames of 96x96 'parts'; frames 3, 7 and 11 carry a bright scratch."""
    path = tmp_path_factory.mktemp("video") / "demo.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 96))
    for i, rgb in enumerate(normal_crops(FRAMES, 96, seed=5)):
        rgb = rgb.copy()
        if i in DEFECT_FRAMES:
            cv2.line(rgb, (20, 30 + i), (76, 60), (255, 250, 240), 3)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    crops = normal_crops(4, 100, seed=9)
    for i, rgb in enumerate(crops):
        image = Image.fromarray(rgb[:, : 80 + 5 * i])  # non-square, each a different size
        image.save(folder / (f"part_{i}.jpg" if i == 2 else f"part_{i}.png"))
    (folder / "README.txt").write_text("not an image")
    return folder


def test_video_end_to_end(tiny_model: Path, backend: OrtBackend, demo_video: Path, tmp_path: Path) -> None:
    decoded = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in video_frames(demo_video)]
    assert len(decoded) == FRAMES
    expected = reference_scores(backend, decoded)
    threshold = float(np.median(expected))  # forces about half the frames to be anomalous
    out = tmp_path / "out"
    result = invoke(
        demo_video,
        "--model",
        tiny_model,
        "--threshold",
        repr(threshold),
        "--jsonl",
        out / "run.jsonl",
        "--save",
        out / "overlay.mp4",
        "--save-masks",
        out / "masks",
    )
    assert result.exit_code == 0, result.output
    records = read_jsonl(out / "run.jsonl")
    assert [r["frame"] for r in records] == list(range(FRAMES))
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=0, atol=1e-5)
    anomalous = [i for i, s in enumerate(expected) if s > threshold]
    assert 0 < len(anomalous) < FRAMES
    assert [r["verdict"] for r in records] == ["anomaly" if i in anomalous else "ok" for i in range(FRAMES)]
    assert all(r["source"] == str(demo_video) and r["latency_ms"] > 0 and r["timestamp"] > 0 for r in records)
    masks = sorted((out / "masks").iterdir())
    assert [p.name for p in masks] == [f"{i:06d}.png" for i in anomalous]
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}  # frame pixels
    assert [r.get("mask") for r in records] == [f"{i:06d}.png" if i in anomalous else None for i in range(FRAMES)]
    assert all(
        (r["model"], r["category"], r["threshold"], r["threshold_rule"])
        == (str(tiny_model), "tiny", threshold, "--threshold")
        for r in records
    )
    assert [r["pos_ms"] for r in records] == [100.0 * i for i in range(FRAMES)]  # 10 frames/s
    for r in records:
        assert bool(r["regions"]) == (r["verdict"] == "anomaly")
        areas = [region["area"] for region in r["regions"]]
        assert areas == sorted(areas, reverse=True) and all(p["peak"] > 0 for p in r["regions"])
        for region in r["regions"]:
            x, y, w, h = region["bbox"]
            jx, jy, jw, jh = r["roi"]
            assert jx <= x and jy <= y and x + w <= jx + jw and y + h <= jy + jh and 0 < region["area"] <= w * h
    frames = video_frames(out / "overlay.mp4")
    assert len(frames) == FRAMES and {f.shape for f in frames} == {(96, 96, 3)}  # the whole frame, at its own size
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlay.mp4", "run.jsonl"]  # no temporary files
    assert f"frames      {FRAMES}, anomalies {len(anomalous)}" in result.stdout
    assert "p50" in result.stdout and "p90" in result.stdout and "p99" in result.stdout and "FPS" in result.stdout


def test_image_folder_matches_the_build_stage(
    tiny_model: Path, backend: OrtBackend, image_folder: Path, tmp_path: Path
) -> None:
    log = tmp_path / "folder.jsonl"
    result = invoke(image_folder, "--model", tiny_model, "--jsonl", log)
    assert result.exit_code == 0, result.output
    paths = sorted(p for p in image_folder.iterdir() if p.suffix != ".txt")
    pre = backend.info.preprocess
    expected = backend.infer(to_batch([pre.pil(load_rgb(p)) for p in paths]))[1]  # exactly the build stage's path
    records = read_jsonl(log)
    assert [r["source"] for r in records] == [str(p) for p in paths]
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=0, atol=1e-5)


def test_image_file_to_stdout(tiny_model: Path, backend: OrtBackend, image_folder: Path) -> None:
    image = image_folder / "part_1.png"
    result = invoke(image, "--model", tiny_model, "--jsonl", "-")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # stdout carries only the JSON lines; the summary went to stderr
    record = json.loads(lines[0])
    expected = backend.infer(to_batch(backend.info.preprocess.pil(load_rgb(image))))[1][0]
    assert record["frame"] == 0 and record["score"] == pytest.approx(float(expected), abs=1e-5)
    assert "frames      1" in result.stderr


def test_max_frames_and_no_display(
    tiny_model: Path, demo_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    log = tmp_path / "five.jsonl"
    result = invoke(demo_video, "--model", tiny_model, "--max-frames", 5, "--jsonl", log, "--show")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(log)) == 5
    assert "notice: --show ignored" in result.stderr and "(max frames)" in result.stdout


def test_default_model_is_found_in_models(
    tiny_model: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(image_folder / "part_0.png")
    assert result.exit_code != 0 and "no --model given and no models/ folder" in result.stderr
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.onnx").symlink_to(tiny_model)
    (models / "tiny.json").symlink_to(tiny_model.with_suffix(".json"))
    result = invoke(image_folder / "part_0.png")
    assert result.exit_code == 0, result.output
    assert "model models/tiny.onnx" in result.stderr
    (models / "screw.onnx").symlink_to(tiny_model)
    result = invoke(image_folder / "part_0.png")
    assert result.exit_code != 0
    assert (
        "several models in models/" in result.stderr and "tiny.onnx" in result.stderr and "screw.onnx" in result.stderr
    )


def foreign_onnx(path: Path) -> Path:
    """A valid ONNX model that is not ours (no protoad metadata)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["anomaly_map"])],
        "foreign",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 3, 64, 64])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def bad(tiny_model: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    (root / "random.onnx").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with open(tiny_model, "rb") as f:
        (root / "truncated.onnx").write_bytes(f.read(200_000))
    foreign_onnx(root / "foreign.onnx")
    (root / "stale").mkdir()
    (root / "stale" / "tiny.onnx").symlink_to(tiny_model)
    side = json.loads(tiny_model.with_suffix(".json").read_text())
    side.update(category="screw", crop=96)
    (root / "stale" / "tiny.json").write_text(json.dumps(side))
    (root / "not_a_video.mp4").write_text("just text")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    mixed = root / "mixed"
    mixed.mkdir()
    Image.open(image_folder / "part_0.png").save(mixed / "a_good.png")
    (mixed / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "empty").mkdir()
    return {"root": root, "image": image_folder / "part_0.png"}


BAD_CASES = {
    # id: (arguments with {root}/{model}/{image} placeholders, text the error line must contain)
    "missing source": (["{root}/nothing.mp4"], "nothing.mp4"),
    "not a video": (["{root}/not_a_video.mp4"], "not_a_video.mp4"),
    "corrupt image": (["{root}/broken.png"], "broken.png"),
    "unreadable frame in folder": (["{root}/mixed"], "b_broken.png"),
    "empty folder": (["{root}/empty"], "empty"),
    "missing model": (["{image}", "--model", "{root}/absent.onnx"], "absent.onnx"),
    "random bytes model": (["{image}", "--model", "{root}/random.onnx"], "random.onnx"),
    "truncated model": (["{image}", "--model", "{root}/truncated.onnx"], "truncated.onnx"),
    "foreign onnx": (["{image}", "--model", "{root}/foreign.onnx"], "not a protoad-edge model"),
    "stale sidecar": (["{image}", "--model", "{root}/stale/tiny.onnx"], "tiny.json does not match"),
    "plan on ort": (
        ["{image}", "--model", "{root}/lonely.plan", "--backend", "ort"],
        "ort runs {root}/lonely.onnx beside",
    ),
    "bad video type": (["{image}", "--model", "{model}", "--save", "{root}/out.mov"], "out.mov"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_input_is_one_clear_line(case: str, bad: dict[str, Path], tiny_model: Path) -> None:
    args, culprit = BAD_CASES[case]
    root = bad["root"]
    if case == "plan on ort":
        (root / "lonely.plan").write_bytes(b"\x00" * 64)
    fill = {"root": root, "model": tiny_model, "image": bad["image"]}
    argv = [a.format(**fill) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit.format(root=root) in errors[0], result.output
    assert "Traceback" not in result.output


def test_csi_without_gstreamer_is_explained(tiny_model: Path) -> None:
    if has_gstreamer():
        pytest.skip("this OpenCV has GStreamer: csi0 would try to open a real camera")
    result = invoke("csi0", "--model", tiny_model)
    assert result.exit_code != 0 and "csi0 needs OpenCV built with GStreamer" in result.stderr


# --- signals: what systemd, docker stop and Ctrl-C send to a running inspection ------------------


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 frames: minutes of work for the run, so a signal always arrives mid-run."""
    path = tmp_path_factory.mktemp("long") / "long.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (72, 72))
    frames = normal_crops(8, 72, seed=4)
    for i in range(2000):
        writer.write(frames[i % 8])
    writer.release()
    return path


@pytest.mark.parametrize(
    "signum, code, ending", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_mid_run_finalises_every_output(
    signum: int, code: int, ending: str, long_video: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from protoad_edge.cli.run import main; main()",
            str(long_video),
            "--model",
            str(tiny_model),
            "--jsonl",
            "-",
            "--save",
            str(out / "view.avi"),
            "--save-masks",
            str(out / "masks"),
            "--threshold",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stdout.readline()  # a frame was judged: the run is in its loop
        assert json.loads(first)["frame"] == 0
        time.sleep(0.3)
        process.send_signal(signum)
        rest, stderr = finish(process, 60)
    finally:
        process.kill()
    records = [json.loads(line) for line in (first + rest).splitlines()]  # every stdout line is a JSON record
    assert process.returncode == code, stderr
    assert f"({ending})" in stderr and "Traceback" not in stderr
    assert 1 <= len(records) < 2000 and [r["frame"] for r in records] == list(range(len(records)))
    assert len(video_frames(out / "view.avi")) == len(records)  # the video was finalised, every frame in it
    assert len(list((out / "masks").iterdir())) == len(records)  # threshold 0: every frame has a mask
    assert sorted(p.name for p in out.iterdir()) == ["masks", "view.avi"]  # no temporary file left


# --- several cameras in one run ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_videos_in_one_run_equal_two_single_runs(tiny_model: Path, demo_video: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.avi"
    writer = cv2.VideoWriter(str(other), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 112))
    for rgb in normal_crops(FRAMES, 112, seed=8):
        writer.write(cv2.cvtColor(np.ascontiguousarray(rgb[:, :80]), cv2.COLOR_RGB2BGR))
    writer.release()
    singles = []
    for video in (demo_video, other):
        result = invoke(video, "--model", tiny_model, "--jsonl", "-", "--threshold", "0.03")
        assert result.exit_code == 0, result.output
        singles.append([json.loads(line) for line in result.stdout.splitlines()])
    out = tmp_path / "out"
    result = invoke(
        demo_video,
        other,
        "--model",
        tiny_model,
        "--threshold",
        "0.03",
        "--jsonl",
        out / "both.jsonl",
        "--save",
        out / "view.avi",
        "--save-masks",
        out / "masks",
    )
    assert result.exit_code == 0, result.output
    records = read_jsonl(out / "both.jsonl")
    assert len(records) == 2 * FRAMES
    for video, single in zip((demo_video, other), singles):
        mine = [r for r in records if r["source"] == str(video)]
        assert [r["frame"] for r in mine] == list(range(FRAMES))  # every frame of each source, in order
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in single], rtol=0, atol=1e-5)
        assert [r["verdict"] for r in mine] == [r["verdict"] for r in single]
    assert sorted(p.name for p in out.iterdir()) == ["both.jsonl", "masks", "view.0.avi", "view.1.avi"]
    for index, (single, size) in enumerate(zip(singles, [(96, 96, 3), (112, 80, 3)])):
        assert [f.shape for f in video_frames(out / f"view.{index}.avi")] == [size] * FRAMES  # each its source's size
        flagged = [f"{r['frame']:06d}.png" for r in single if r["verdict"] == "anomaly"]
        assert sorted(p.name for p in (out / "masks" / str(index)).iterdir()) == flagged
    assert f"total       {2 * FRAMES} frames from 2 sources" in result.stdout
    assert result.stdout.count("source      ") == 2


def test_a_source_that_cannot_open_is_one_error_before_the_run(
    tiny_model: Path, demo_video: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    result = invoke(demo_video, broken, "--model", tiny_model, "--jsonl", tmp_path / "r.jsonl")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot open video" in errors[0] and "broken.mp4" in errors[0]
    assert not (tmp_path / "r.jsonl").exists()


# --- --threads: the same meaning as in every command that runs a model ---------------------------------


def test_threads_reach_the_backend(tiny_model: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads N is the ORT session's intra-op thread count, read back from the backend; 0 (the default) is
    every core, as in protoad-eval, protoad-bench and protoad-serve."""
    from protoad_edge.runtime.backends import registry as backends

    seen: list[object] = []
    real_open = backends.open_backend

    def open_backend(*args: object, **kwargs: object):
        opened = real_open(*args, **kwargs)
        seen.append(opened.describe().details["intra_op_threads"])
        return opened

    monkeypatch.setattr(backends, "open_backend", open_backend)
    for given in ([], ["--threads", "0"], ["--threads", "1"], ["--threads", "3"]):
        result = invoke(image_folder / "part_0.png", "--model", tiny_model, *given)
        assert result.exit_code == 0, result.output
    assert seen == [os.cpu_count(), os.cpu_count(), 1, 3]


def test_threads_with_a_server_is_one_clear_line(image_folder: Path) -> None:
    result = invoke(image_folder / "part_0.png", "--server", "grpc://127.0.0.1:1/tiny", "--threads", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --server judges with the server's model and threads" in result.stderr
    assert "drop --model, --backend and --threads" in result.stderr
