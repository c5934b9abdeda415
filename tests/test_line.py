"""On the line: a part somewhere in a 1920x1080 frame. A bundle built with --roi judges exactly that
region, protoad-run reports defects in frame pixels inside it, and the overlay is the whole frame."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoad_edge.builder.demo import demo_image
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.export import main as export_main
from protoad_edge.cli.run import main as run_main
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import Preprocess, to_batch
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.outputs.overlay import JUDGED_BGR

FRAME = (1920, 1080)
PART_AT = (1100, 500)  # where the 256 x 256 part sits in every frame of the line camera
ROI = (*PART_AT, 256, 256)
TEST = {"test/good": 4, "test/scratch": 2, "test/crack": 2, "test/missing": 2}


def belt(seed: int) -> np.ndarray:
    """A dark conveyor belt filling the 16:9 frame, different in every frame."""
    rng = np.random.default_rng([7, seed])
    frame = np.full((FRAME[1], FRAME[0], 3), 45, np.int16) + rng.integers(-6, 7, (FRAME[1], FRAME[0], 1))
    return np.clip(frame, 0, 255).astype(np.uint8)


def on_belt(part: np.ndarray, seed: int, at: tuple[int, int] = PART_AT) -> np.ndarray:
    frame = belt(seed)
    frame[at[1] : at[1] + part.shape[0], at[0] : at[0] + part.shape[1]] = part
    return frame


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> dict:
    """A 1920x1080 MVTec-layout category of demo parts on a belt, and its bundle built with --roi."""
    root = tmp_path_factory.mktemp("line")
    truth: dict[str, tuple[int, int, int, int]] = {}
    for split, count in {"train/good": 20, **TEST}.items():
        for index in range(count):
            _, image, mask = demo_image(split, index)
            folder = root / "line" / split
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(on_belt(image, hash((split, index)) % 1000)).save(folder / f"{index:03d}.png")
            if mask is not None:
                truth_dir = root / "line" / "ground_truth" / split.split("/")[1]
                truth_dir.mkdir(parents=True, exist_ok=True)
                full = np.zeros((FRAME[1], FRAME[0]), np.uint8)
                full[PART_AT[1] : PART_AT[1] + 256, PART_AT[0] : PART_AT[0] + 256] = mask
                Image.fromarray(full).save(truth_dir / f"{index:03d}_mask.png")
                ys, xs = np.nonzero(mask)
                truth[f"{split}/{index:03d}"] = (
                    PART_AT[0] + xs.min(),
                    PART_AT[1] + ys.min(),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                )
    out = tmp_path_factory.mktemp("line_models")
    result = CliRunner().invoke(
        export_main,
        [
            "--category",
            "line",
            "--data-root",
            str(root),
            "--out",
            str(out),
            "--weights",
            "none",
            "--resize",
            "256",
            "--crop",
            "224",
            "--roi",
            ",".join(map(str, ROI)),
            "--no-cache",
        ],
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "model": out / "line.onnx", "truth": truth, "export": result.output}


@pytest.mark.slow
def test_the_bundle_judges_the_region_of_every_image(line: dict) -> None:
    info = ModelInfo.load_json(line["model"].with_suffix(".json"))
    assert info.roi == list(ROI) and info.fit == "crop"
    assert info.build["test"]["image_auroc"] > 0.6  # the part, not the belt: 0.5 would mean it saw nothing
    # Maps inside the region equal those of the region cut out by hand through the whole-image path (1e-5).
    backend = OrtBackend(line["model"], providers=["CPUExecutionProvider"])
    frames = [
        np.asarray(Image.open(p).convert("RGB")) for p in sorted((line["root"] / "line/test/crack").glob("*.png"))
    ]
    by_region = backend.infer(to_batch([backend.info.preprocess(f) for f in frames]))[0]
    old_path = Preprocess(256, 224)
    by_hand = backend.infer(to_batch([old_path(f[500:756, 1100:1356]) for f in frames]))[0]
    assert np.abs(by_region - by_hand).max() <= 1e-5


@pytest.mark.slow
def test_eval_uses_the_bundles_region(line: dict) -> None:
    result = CliRunner().invoke(
        eval_main,
        [
            "--model",
            str(line["model"]),
            "--category",
            "line",
            "--data-root",
            str(line["root"]),
            "--json",
            str(line["root"] / "eval.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    got = json.loads((line["root"] / "eval.json").read_text())["categories"]["line"]
    info = ModelInfo.load_json(line["model"].with_suffix(".json"))
    assert got["image_auroc"] == pytest.approx(info.build["test"]["image_auroc"], abs=1e-9)
    assert got["pixel_auroc"] == pytest.approx(info.build["test"]["pixel_auroc"], abs=1e-9)


@pytest.fixture(scope="module")
def line_video(line: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The test parts passing the camera, as a 1920x1080 video; returns the path and each frame's test image."""
    names = [f"{split}/{i:03d}" for split, count in TEST.items() for i in range(count)]
    path = tmp_path_factory.mktemp("video") / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, FRAME)
    for name in names:
        rgb = np.asarray(Image.open(line["root"] / "line" / f"{name}.png").convert("RGB"))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path, names


@pytest.mark.slow
def test_run_reports_defects_in_frame_pixels_inside_the_region(
    line: dict, line_video: tuple[Path, list[str]], tmp_path: Path
) -> None:
    video, names = line_video
    info = ModelInfo.load_json(line["model"].with_suffix(".json"))
    judged = info.preprocess.geometry(*FRAME).judged
    result = CliRunner().invoke(
        run_main,
        [
            str(video),
            "--model",
            str(line["model"]),
            "--jsonl",
            str(tmp_path / "r.jsonl"),
            "--save",
            str(tmp_path / "overlay.avi"),
            "--save-masks",
            str(tmp_path / "masks"),
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == len(names) and all(r["roi"] == list(judged) for r in records)
    caught = 0
    for record, name in zip(records, names):
        for region in record["regions"]:
            x, y, w, h = region["bbox"]
            assert (
                judged[0] <= x and judged[1] <= y and x + w <= judged[0] + judged[2] and y + h <= judged[1] + judged[3]
            )
        if record["verdict"] == "anomaly" and name in line["truth"]:
            tx, ty, tw, th = line["truth"][name]
            x, y, w, h = record["regions"][0]["bbox"]  # the largest region
            assert x < tx + tw and tx < x + w and y < ty + th and ty < y + h, (
                name,
                record["regions"],
                line["truth"][name],
            )
            mask = np.asarray(Image.open(tmp_path / "masks" / record["mask"]))
            assert mask.shape == (FRAME[1], FRAME[0]) and mask[ty : ty + th, tx : tx + tw].any()
            caught += 1
    assert caught >= 2  # random-weight features: most defects, not all, pass the held-out threshold
    overlay = cv2.VideoCapture(str(tmp_path / "overlay.avi"))
    ok, view = overlay.read()
    assert ok and view.shape[:2] == (FRAME[1], FRAME[0])  # the frame at its own size, the header drawn inside it
    top = judged[1]
    edge = view[top, judged[0] + 10 : judged[0] + judged[2] - 10].astype(int)
    assert np.abs(edge.mean(axis=0) - JUDGED_BGR).max() < 40  # the judged area's outline (through MJPEG)


@pytest.mark.slow
def test_run_roi_follows_a_camera_mounted_differently(line: dict, tmp_path: Path) -> None:
    """The same part elsewhere in the frame scores the same with --roi pointing at it."""
    _, image, _ = demo_image("test/crack", 0)
    here = tmp_path / "here.png"
    there = tmp_path / "there.png"
    Image.fromarray(on_belt(image, 1)).save(here)
    Image.fromarray(on_belt(image, 2, at=(200, 120))).save(there)
    scores = []
    for path, extra in ((here, []), (there, ["--roi", "200,120,256,256"])):
        result = CliRunner().invoke(run_main, [str(path), "--model", str(line["model"]), "--jsonl", "-", *extra])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout.splitlines()[0])["score"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    outside = CliRunner().invoke(run_main, [str(there), "--model", str(line["model"]), "--roi", "1800,1000,256,256"])
    assert (
        outside.exit_code == 2
        and "reaches past the 1920x1080 image" in outside.stderr
        and "there.png" in outside.stderr
    )


def test_preview_draws_the_region_on_a_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./models here: the preview needs no model
    frame = tmp_path / "frame.png"
    Image.fromarray(on_belt(demo_image("test/good", 0)[1], 3)).save(frame)
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(run_main, [str(frame), "--preview", str(out), "--roi", "1000,400,500,400"])
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(out))
    assert picture.shape == (FRAME[1], FRAME[0], 3)
    assert picture[50, 50].max() < 45  # outside the judged area: dimmed
    geometry = Preprocess(roi=(1000, 400, 500, 400)).geometry(*FRAME)  # no model given: the default input
    x, y, w, h = geometry.judged
    assert tuple(picture[y, x + w // 2]) == JUDGED_BGR
