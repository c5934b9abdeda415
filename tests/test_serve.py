"""protoad-serve for real: Triton's server (PyTriton) on 127.0.0.1 in the serving environment, judged through by
protoad-run --server, against the same model run locally; a server restart in the middle of a run is survived;
ready means the model answers, and a line started with its server waits for it.

The serving environment is ``.venv-serve`` (PyTriton needs numpy < 2; .ci/run makes it). Where it is missing the
tests skip, except under ``PROTOAD_REQUIRE_SERVE=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import normal_crops
from processes import finish
from triton_server import Server, serve_python

from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError

FRAMES = 12
if serve_python() is None and os.environ.get("PROTOAD_REQUIRE_SERVE") == "1":
    raise RuntimeError(
        "PROTOAD_REQUIRE_SERVE=1 but there is no serving environment (.venv-serve or $PROTOAD_SERVE_PYTHON)"
    )
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


def write_images(folder: Path, frames: int, seed: int) -> Path:
    folder.mkdir()
    for i, rgb in enumerate(normal_crops(frames, 96, seed=seed)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


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
    from protoad_edge.runtime.backends.ort import OrtBackend
    from protoad_edge.runtime.serving.triton import TritonBackend

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
    lines = [
        line
        for line in server.metrics().splitlines()
        if line.startswith("nv_inference_request_success") and f'model="{server.name}"' in line
    ]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 3


def test_an_unknown_model_is_waited_for_then_named(server: Server, tmp_path: Path) -> None:
    """A model the server does not have may still be loading: waited for up to --reconnect-timeout, then named."""
    started = time.monotonic()
    result = CliRunner().invoke(
        run_main,
        [
            str(write_video(tmp_path / "v.avi", 2, seed=1)),
            "--server",
            server.url.replace(f"/{server.name}", "/cable"),
            "--reconnect-timeout",
            "1",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the server has no model 'cable'" in result.output and "waited" in result.output
    assert result.output.count("has no model 'cable' ready yet") == 1 and "waiting up to 1 s" in result.output
    assert time.monotonic() - started >= 1.0


def test_a_refused_request_fails_at_once(server: Server) -> None:
    """A request the server refuses (INVALID_ARGUMENT: more images than its max_batch_size) is not sent again."""
    from protoad_edge.preprocess import to_batch
    from protoad_edge.runtime.serving.triton import TritonBackend
    from protoad_edge.runtime.sources.capture import Reconnect

    with TritonBackend(server.url, retry=Reconnect(give_up_after=60.0)) as remote:
        remote.max_batch = 6  # the server's is 4: Triton refuses the request
        started = time.monotonic()
        with pytest.raises(ProtoADError, match=r"\(refused\): .*batch-size must be <= 4"):
            remote.infer(to_batch(normal_crops(6, 64, seed=3)))
        assert remote.retries == 0 and time.monotonic() - started < 10


def test_a_healthy_cpu_server_shows_no_error(server: Server) -> None:
    """Triton's lines about CUDA, NVML and DCGM on a host without a GPU are hidden; its other lines still show."""
    text = server.log.read_text()
    assert "successfully loaded 'tiny'" in text and "Started GRPCInferenceService" in text
    errors = [line for line in text.splitlines() if re.match(r"E\d{4} ", line) or "error" in line.lower()]
    assert errors == []


@pytest.mark.slow
def test_ready_means_the_model_answers(tiny_model: Path, tmp_path: Path) -> None:
    """/v2/health/ready, polled from the moment the process starts, first says 200 when an inference succeeds
    right then, and the model's own readiness agrees."""
    from protoad_edge.preprocess import to_batch
    from protoad_edge.runtime.serving.triton import TritonBackend
    from protoad_edge.runtime.sources.capture import Reconnect

    server = Server(tiny_model, tmp_path / "serve.log", max_batch=4).launch()
    try:
        seen = []
        while (status := server.http("/v2/health/ready")[0]) != 200:
            seen.append(status)
            assert server.process.poll() is None, server.log.read_text()[-3000:]
            time.sleep(0.02)
        with TritonBackend(server.url, retry=Reconnect(give_up_after=0.0)) as remote:  # no second chance
            _, scores = remote.infer(to_batch(normal_crops(2, 64, seed=1)))
        assert scores.shape == (2,) and remote.retries == 0
        assert server.http(f"/v2/models/{server.name}/ready")[0] == 200
        assert seen and set(seen) <= {0, 400}  # polled before it listened: never ready early
    finally:
        server.stop()


@pytest.mark.slow
def test_a_line_started_with_its_server_judges_every_frame(tiny_model: Path, tmp_path: Path) -> None:
    """protoad-serve and protoad-run --server started at the same moment: the line waits for the model (one line
    says so) and judges every frame, as a local run does."""
    frames = write_images(tmp_path / "frames", 5, seed=7)
    server = Server(tiny_model, tmp_path / "serve.log", max_batch=4)
    run_args = [
        sys.executable,
        "-c",
        "from protoad_edge.cli.run import main; main()",
        str(frames),
        "--server",
        server.url,
        "--jsonl",
        "-",
        "--status-every",
        "0",
        "--reconnect-timeout",
        "120",
    ]
    server.launch()
    try:
        run = subprocess.run(run_args, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    waits = [line for line in run.stderr.splitlines() if "retrying for up to 120 s" in line or "waiting up to" in line]
    assert len(waits) == 1, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    local = run_records(frames, "--model", tiny_model)
    assert [r["frame"] for r in records] == [r["frame"] for r in local] == list(range(5))
    np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in local], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_one_line_at_once(tiny_model: Path, tmp_path: Path) -> None:
    """Triton exits when the model fails to load (here: PyTriton's tracer asked for and not installed): protoad-serve
    says why in one line within seconds, not after PyTriton's two-minute start-up wait."""
    server = Server(tiny_model, tmp_path / "serve.log").launch(env={"PYTRITON_VIZTRACER": "1"})
    try:
        code = server.process.wait(90)
    finally:
        server.stop()
    text = server.log.read_text()
    assert code == 2 and "Traceback" not in text
    assert "error: Triton did not start model tiny: ModuleNotFoundError: No module named 'viztracer'" in text


def test_a_server_restart_mid_run_loses_and_repeats_nothing(tiny_model: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "long.avi", 150, seed=2)
    with Server(tiny_model, tmp_path / "serve.log", max_batch=4) as server:
        run = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from protoad_edge.cli.run import main; main()",
                str(video),
                "--server",
                server.url,
                "--jsonl",
                "-",
                "--status-every",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = [run.stdout.readline() for _ in range(5)]  # records stream as frames are judged
        assert server.stop() == 0  # SIGTERM: a clean stop, in the middle of the run
        time.sleep(1.0)  # the client now finds no server, and retries
        server.start()
        rest, stderr = finish(run, 300)
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
