"""protoad-serve for real: Triton's server (PyTriton) on 127.0.0.1 in the serving environment, judged through by
protoad-run --server, against the same model run locally; a server restart in the middle of a run is survived.

The serving environment is ``.venv-serve`` (PyTriton needs numpy < 2; .ci/run makes it). Where it is missing the
tests skip, except under ``PROTOAD_REQUIRE_SERVE=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import normal_crops
from protoad_edge.cli.run import main as run_main
from triton_server import Server, serve_python

FRAMES = 12
if serve_python() is None and os.environ.get("PROTOAD_REQUIRE_SERVE") == "1":
    raise RuntimeError("PROTOAD_REQUIRE_SERVE=1 but there is no serving environment (.venv-serve or $PROTOAD_SERVE_PYTHON)")
pytestmark = pytest.mark.skipif(serve_python() is None, reason="no serving environment: .ci/run makes .venv-serve")


def write_video(path: Path, frames: int, seed: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 80))
    for i, rgb in enumerate(normal_crops(frames, 96, seed=seed)):
        rgb = np.ascontiguousarray(rgb[:80])
        if i % 5 == 3:
            cv2.line(rgb, (20, 30), (76, 60), (255, 250, 240), 3)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run_records(*args: str | Path) -> list[dict]:
    result = CliRunner().invoke(run_main, [str(a) for a in args] + ["--jsonl", "-", "--status-every", "0"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    with Server(tiny_model, tmp_path_factory.mktemp("serve") / "serve.log", max_batch=4) as served:
        yield served


def test_served_scores_equal_a_local_run(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.avi", FRAMES, seed=4)
    local = run_records(video, "--model", tiny_model)
    served = run_records(video, "--server", server.url)
    assert len(local) == len(served) == FRAMES
    assert [r["frame"] for r in served] == list(range(FRAMES))
    np.testing.assert_allclose([r["score"] for r in served], [r["score"] for r in local], rtol=0, atol=1e-5)
    assert [r["verdict"] for r in served] == [r["verdict"] for r in local]
    assert {r["threshold"] for r in served} == {r["threshold"] for r in local}  # the bundle's, from the server
    assert served[0]["model"] == server.url


def test_a_batch_larger_than_the_servers_goes_as_several_requests(server: Server, tiny_model: Path) -> None:
    from protoad_edge.preprocess import to_batch
    from protoad_edge.runtime.ort_backend import OrtBackend
    from protoad_edge.runtime.triton import TritonBackend

    batch = to_batch(normal_crops(11, 64, seed=3))
    with TritonBackend(server.url) as remote, OrtBackend(tiny_model) as local:
        assert remote.max_batch == 4 and remote.info == local.info
        maps, scores = remote.infer(batch)  # 4 + 4 + 3
        expected_maps, expected_scores = local.infer(batch)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)


def test_two_sources_through_one_server(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    a, b = write_video(tmp_path / "a.avi", FRAMES, seed=4), write_video(tmp_path / "b.avi", FRAMES, seed=6)
    both = run_records(a, b, "--server", server.url)
    assert len(both) == 2 * FRAMES
    for video in (a, b):
        local = run_records(video, "--model", tiny_model)
        mine = [r for r in both if r["source"] == str(video)]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in local], rtol=0, atol=1e-5)


def test_preview_draws_the_served_models_region(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "p.avi", 2, seed=1)
    for args, name in ((["--model", str(tiny_model)], "local.png"), (["--server", server.url], "served.png")):
        result = CliRunner().invoke(run_main, [str(video), *args, "--preview", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "served.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    default = CliRunner().invoke(run_main, [str(video), "--preview", str(tmp_path / "none.png")])
    assert default.exit_code == 0 and (tmp_path / "none.png").read_bytes() != (tmp_path / "local.png").read_bytes()


def test_readiness_and_prometheus_metrics(server: Server, tmp_path: Path) -> None:
    assert server.http("/v2/health/ready")[0] == 200
    status, body = server.http(f"/v2/models/{server.name}")
    assert status == 200 and json.loads(body)["name"] == server.name
    run_records(write_video(tmp_path / "m.avi", 3, seed=1), "--server", server.url)
    lines = [line for line in server.metrics().splitlines()
             if line.startswith("nv_inference_request_success") and f'model="{server.name}"' in line]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 3


def test_an_unknown_model_names_the_served_ones(server: Server, tmp_path: Path) -> None:
    result = CliRunner().invoke(run_main, [str(write_video(tmp_path / "v.avi", 2, seed=1)), "--server",
                                           server.url.replace(f"/{server.name}", "/cable")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the server has no model 'cable'" in result.output


def test_a_server_restart_mid_run_loses_and_repeats_nothing(tiny_model: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "long.avi", 150, seed=2)
    with Server(tiny_model, tmp_path / "serve.log", max_batch=4) as server:
        run = subprocess.Popen([sys.executable, "-c", "from protoad_edge.cli.run import main; main()", str(video),
                                "--server", server.url, "--jsonl", "-", "--status-every", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [run.stdout.readline() for _ in range(5)]  # records stream as frames are judged
        assert server.stop() == 0  # SIGTERM: a clean stop, in the middle of the run
        time.sleep(1.0)  # the client now finds no server, and retries
        server.start()
        rest, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "not answering" in stderr and "retrying" in stderr
    records = [json.loads(line) for line in lines + rest.splitlines()]
    assert [r["frame"] for r in records] == list(range(150))  # every frame judged once, in order
    local = run_records(video, "--model", tiny_model, "--max-frames", "150")
    np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in local], rtol=0, atol=1e-5)
    assert "stopped (SIGTERM)" in (tmp_path / "serve.log").read_text()


def test_the_load_benchmark_counts_every_answer(server: Server, tiny_model: Path) -> None:
    """bench_serve.py's load phase, short: concurrent clients, every answer checked against the local scores."""
    from bench_serve import load, reference

    frames, scores = reference(tiny_model)
    result = load(server, frames, scores, clients=3, seconds=2.0)
    assert result.ok() and result.requests >= 3, result
    wrong = load(server, frames, scores[::-1].copy(), clients=1, seconds=1.0)  # the check can fail
    assert wrong.mismatched > 0 and not wrong.ok()
