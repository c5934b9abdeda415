"""A running ``protoad-run`` picks up a new version of its bundle without stopping (issue 27): every frame judged
exactly once, the records naming the version that judged them, a broken version refused while the run goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from processes import finish
from teaching import changed_lamp, crops, demo_frames, teach_bundle
from triton_server import Server, serve_python

from protoad_edge import versions
from protoad_edge.bundle import Bundle
from protoad_edge.preprocess import Preprocess
from protoad_edge.runtime.sources.frames import Frames
from protoad_edge.teach.teach import teach

FRAMES = 1500


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    return teach_bundle(tmp_path_factory.mktemp("pristine")).parent


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A long video of the part (128 x 128): the run is still judging it while the bundle changes."""
    path = tmp_path_factory.mktemp("video") / "line.avi"
    images = [
        cv2.cvtColor(cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
        for f in demo_frames(range(100, 108))
    ]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (128, 128))
    for i in range(FRAMES):
        writer.write(images[i % len(images)])
    writer.release()
    return path


def start_run(model: Path | str, sources: list[Path], log: Path, server: bool = False) -> subprocess.Popen:
    where = ["--server", str(model)] if server else ["--model", str(model), "--threads", "1"]
    args = [
        sys.executable,
        "-c",
        "from protoad_edge.cli.run import main; main()",
        *map(str, sources),
        *where,
        "--jsonl",
        "-",
        "--reload-every",
        "0.2",
        "--status-every",
        "0",
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def read_records(process: subprocess.Popen, count: int) -> list[str]:
    return [process.stdout.readline() for _ in range(count)]


def wait_for(log: Path, text: str, process: subprocess.Popen, lines: list[str], timeout: float = 120.0) -> None:
    """Read records meanwhile (a full pipe would stall the run) until ``text`` is in the run's log."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"the run ended before {text!r}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        lines.append(process.stdout.readline())


@pytest.mark.slow
def test_a_run_switches_to_a_taught_version_between_two_frames(bundle_dir: Path, video: Path, tmp_path: Path) -> None:
    shutil.copytree(bundle_dir, tmp_path / "m")
    model = tmp_path / "m" / "part.onnx"
    second = shutil.copy(video, tmp_path / "line2.avi")
    log = tmp_path / "run.log"
    process = start_run(model, [video, second], log)  # two sources: one backend, switched for both
    try:
        lines = read_records(process, 40)
        teach_lamp(model)
        wait_for(log, "model: version 1 -> 2", process, lines)
        rest, _ = finish(process, 600)
    finally:
        process.kill()
    records = [json.loads(line) for line in "".join(lines).splitlines() + rest.splitlines()]
    assert process.returncode == 0, log.read_text()
    for source in (str(video), str(second)):
        mine = [r for r in records if r["source"] == source]
        assert [r["frame"] for r in mine] == list(range(FRAMES))  # none dropped, none judged twice
        versions = [r["model_version"] for r in mine]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2  # both, switched once
    text = log.read_text()
    assert text.count("model: version 1 -> 2") == 1 and "refused" not in text
    switched = [r for r in records if r["model_version"] == 2]
    assert all(r["threshold"] == records[0]["threshold"] for r in switched)  # teaching keeps the thresholds


@pytest.mark.slow
def test_a_broken_version_is_refused_and_the_run_goes_on(bundle_dir: Path, video: Path, tmp_path: Path) -> None:
    shutil.copytree(bundle_dir, tmp_path / "m")
    model = tmp_path / "m" / "part.onnx"
    sidecar = model.with_suffix(".json")
    good_model, good_sidecar = model.read_bytes(), sidecar.read_bytes()
    log = tmp_path / "run.log"
    process = start_run(model, [video], log)

    def replace(path: Path, data: bytes) -> None:  # as every writer does: a whole new file renamed over the old
        path.with_name(".new").write_bytes(data)
        os.replace(path.with_name(".new"), path)

    try:
        lines = read_records(process, 40)
        replace(model, good_model[: len(good_model) // 2])  # half a graph, the sidecar not yet written
        wait_for(log, "refused", process, lines)
        Bundle.of(model).reseal()  # a sidecar that vouches for the half graph: onnxruntime cannot load it
        wait_for(log, "cannot load ONNX model", process, lines)
        with versions.locked(Bundle.of(model)):  # both files put back as a writer of versions would: under the lock
            replace(model, good_model)
            time.sleep(0.5)  # the run looks meanwhile, and waits for the writer
            replace(sidecar, good_sidecar)
        wait_for(log, "model: version 1 -> 1", process, lines)
        rest, _ = finish(process, 600)
    finally:
        process.kill()
    records = [json.loads(line) for line in "".join(lines).splitlines() + rest.splitlines()]
    assert process.returncode == 0, log.read_text()
    assert [r["frame"] for r in records] == list(range(FRAMES)) and {r["model_version"] for r in records} == {1}
    refusals = [line for line in log.read_text().splitlines() if "refused" in line]
    assert len(refusals) == 2 and all("still judging with version 1" in line for line in refusals)
    assert "does not match" in refusals[0] and "Traceback" not in log.read_text()
    assert np.isfinite([r["score"] for r in records]).all()


def teach_lamp(model: Path) -> None:
    pre = Preprocess(72, 64)
    taught = changed_lamp(demo_frames(range(20, 26)))
    result = teach(
        Bundle.of(model),
        Frames(crops(taught), [f"t{i}" for i in range(len(taught))], [pre.geometry(256, 256)] * len(taught)),
    )
    assert result.version_after == 2


@pytest.mark.slow
@pytest.mark.skipif(serve_python() is None, reason="no serving environment: .ci/run makes .venv-serve")
def test_a_line_on_a_server_switches_when_the_server_serves_a_new_version(
    bundle_dir: Path, video: Path, tmp_path: Path
) -> None:
    """protoad-serve loads its bundle once: restarted after a teach it serves the new version, and a line on
    --server takes the new metadata (version, thresholds) from the served configuration between two frames,
    its requests waiting out the restart - none lost, none judged twice."""
    shutil.copytree(bundle_dir, tmp_path / "m")
    model = tmp_path / "m" / "part.onnx"
    log = tmp_path / "run.log"
    with Server(model, tmp_path / "serve.log", max_batch=4) as server:
        process = start_run(server.url, [video], log, server=True)
        try:
            lines = read_records(process, 40)
            teach_lamp(model)
            server.restart()
            wait_for(log, "model: version 1 -> 2", process, lines)
            rest, _ = finish(process, 600)
        finally:
            process.kill()
    records = [json.loads(line) for line in "".join(lines).splitlines() + rest.splitlines()]
    assert process.returncode == 0, log.read_text()
    assert [r["frame"] for r in records] == list(range(FRAMES))
    versions_seen = [r["model_version"] for r in records]
    assert versions_seen == sorted(versions_seen) and versions_seen[0] == 1 and versions_seen[-1] == 2
