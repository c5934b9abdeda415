"""protoad-bench: the report's fields and their consistency, the JSON file, the CLI's errors.

No speed goals here (they live in benchmarks/): only sanity of what is measured and reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner

from protoad_edge.cli.bench import main, parse_batches
from protoad_edge.evaluation.bench import (
    PAPER_FPS,
    STAGES,
    BenchReport,
    Latency,
    benchmark,
    make_frame,
    run_batch,
)
from protoad_edge.metadata import ModelInfo
from protoad_edge.runtime.backends.base import Backend, BackendFacts, BackendOptions
from protoad_edge.runtime.backends.registry import open_backend

ORDERED = ("min", "median", "p90", "p95", "p99", "max")


def _check_latency(lat: Latency) -> None:
    values = [getattr(lat, f) for f in ORDERED]
    assert values[0] > 0
    assert values == sorted(values)
    assert lat.min <= lat.mean <= lat.max


@pytest.fixture(scope="module")
def report(tiny_model: Path) -> BenchReport:
    frame = make_frame((320, 240))
    with open_backend(tiny_model, "ort", options=BackendOptions(threads=1)) as backend:
        return benchmark(backend, [1, 3], frame, warmup=1, iterations=4, frame_source="synthetic")


def test_report_has_every_field(report: BenchReport, tiny_model: Path) -> None:
    h = report.header
    assert h["machine"]["cpu"] and h["machine"]["logical_cores"] >= 1 and h["machine"]["physical_cores"] >= 1
    assert "gpu" in h["machine"] and "driver" in h["machine"]
    assert h["software"]["onnxruntime"] == onnxruntime.__version__
    assert h["model"]["num_prototypes"] == 48 and h["model"]["input"] == [3, 64, 64]
    assert h["model"]["path"] == str(tiny_model)
    assert h["backend"]["name"] == "ort" and h["backend"]["providers"][0] == "CPUExecutionProvider"
    assert h["backend"]["precision"] == "fp32" and h["backend"]["details"]["intra_op_threads"] == 1
    assert h["frame"] == {"width": 320, "height": 240, "source": "synthetic"}
    assert [r.batch for r in report.results] == [1, 3]
    for r in report.results:
        assert r.iterations >= 4
        # onnxruntime on the CPU has no H2D / D2H split: only what was measured is reported
        assert set(r.stages) == {"preprocess", "infer", "end_to_end"}


def test_latencies_positive_ordered_and_consistent(report: BenchReport) -> None:
    for r in report.results:
        for lat in r.stages.values():
            _check_latency(lat)
        pre, inf, e2e = (r.stages[s] for s in ("preprocess", "infer", "end_to_end"))
        # every end-to-end sample is its preprocessing plus its inference
        assert e2e.mean == pytest.approx(pre.mean + inf.mean, rel=1e-6)
        assert e2e.min >= inf.min and e2e.max >= inf.max
        assert r.throughput == pytest.approx(1000.0 * r.batch / e2e.mean)
        assert r.model_throughput == pytest.approx(1000.0 * r.batch / inf.mean)
        assert r.model_throughput >= r.throughput > 0


def test_text_report_names_machine_versions_k_and_paper(report: BenchReport) -> None:
    text = "\n".join(report.lines())
    assert f"onnxruntime {onnxruntime.__version__}" in text
    assert "K = 48 prototypes" in text
    assert "CPUExecutionProvider" in text and "precision fp32" in text
    for name, fps in PAPER_FPS.items():
        assert f"{name} {fps}" in text
    assert "RTX 2080 Ti" in text and "indicative only" in text
    for label in ("min", "mean", "median", "p90", "p95", "p99", "host preprocess", "inference", "end to end"):
        assert label in text


def test_json_is_written_and_valid(report: BenchReport, tmp_path: Path) -> None:
    path = report.save_json(tmp_path / "out" / "bench.json")
    data = json.loads(path.read_text())
    assert data["header"]["model"]["num_prototypes"] == 48
    assert data["paper"]["fps"] == PAPER_FPS
    first = data["results"][0]
    assert first["batch"] == 1 and set(first["latency_ms"]["end_to_end"]) == {
        "min",
        "mean",
        "median",
        "p90",
        "p95",
        "p99",
        "max",
    }
    assert first["paper_ratio"]["ProtoAD"] == pytest.approx(first["model_throughput_images_per_s"] / 72.45)
    assert not list(path.parent.glob(".*.tmp"))  # atomic: no temporary left behind


def test_latency_percentiles() -> None:
    lat = Latency.of(range(1, 101))
    assert (lat.min, lat.median, lat.max, lat.mean) == (1, 50.5, 100, 50.5)
    assert lat.p90 == pytest.approx(90.1) and lat.p99 == pytest.approx(99.01)


class _FakeGpuBackend(Backend):
    """Stands in for the TensorRT backend's timing hook (``stage_times``), which needs a GPU."""

    name = "trt"

    def __init__(self) -> None:
        self.info = ModelInfo(
            category="fake",
            resize=40,
            crop=32,
            backbone="wide_resnet50_2",
            weights="none",
            feature_upsample="bilinear",
            num_prototypes=5,
            image_threshold=0.1,
            pixel_threshold=0.1,
            tensorrt_precision="fp16",
        )
        self.last_times = None
        self.calls = 0

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        n = len(batch)
        self.last_times = SimpleNamespace(h2d_ms=0.5 * n, compute_ms=2.0 * n, d2h_ms=0.25 * n)
        return np.zeros((n, 32, 32), np.float32), np.zeros(n, np.float32)

    def describe(self) -> BackendFacts:
        return BackendFacts(self.name, "fake.plan", "fp16", "Fake GPU")

    def stage_times(self) -> dict[str, float] | None:
        t = self.last_times
        return None if t is None else {"h2d": t.h2d_ms, "compute": t.compute_ms, "d2h": t.d2h_ms}


def test_duration_and_stage_split_with_a_deterministic_clock() -> None:
    ticks = iter(range(10_000))
    backend = _FakeGpuBackend()
    # every clock call advances one second: preprocess 1 s, inference 1 s per iteration
    r = run_batch(
        backend, make_frame((50, 40)), batch=2, warmup=3, iterations=1, duration=5.0, clock=lambda: float(next(ticks))
    )
    assert r.iterations == 2 and backend.calls == 3 + 2  # 2 s, then 5 s since the first timed start
    assert r.stages["preprocess"].median == r.stages["infer"].median == 1000.0
    assert r.stages["end_to_end"].mean == 2000.0 and r.throughput == pytest.approx(1.0)
    assert (r.stages["h2d"].mean, r.stages["compute"].mean, r.stages["d2h"].mean) == (1.0, 4.0, 0.5)
    assert list(r.stages) == [s for s in STAGES if s in r.stages]


def test_parse_batches() -> None:
    assert parse_batches(("1", "8")) == [1, 8]
    assert parse_batches(("1,8", "8", " 4 ")) == [1, 8, 4]
    assert parse_batches(()) == [1]


def test_cli_writes_report_and_json(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        [
            "--onnx",
            str(tiny_model),
            "--batch",
            "1,2",
            "--warmup",
            "0",
            "--iterations",
            "2",
            "--frame-size",
            "200x100",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "=== batch 2 (2 iterations) ===" in result.stdout and "Throughput:" in result.stdout
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 2]
    assert data["header"]["frame"]["width"] == 200


def test_cli_torch_mode(tiny_model: Path, torch_threads: None) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--torch",
            str(tiny_model.with_suffix(".json")),
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--iterations",
            "1",
            "--frame-size",
            "80x80",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "backend     torch on cpu, precision fp32" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--onnx", "{onnx}", "--torch", "{json}"], "give one model"),
        (["--model", "{onnx}", "--engine", "{onnx}"], "give one model"),
        (["--onnx", "{onnx}", "--backend", "trt"], "--onnx runs backend ort, not --backend trt"),
        (["--onnx", "{dir}/missing.onnx"], "model not found"),
        (["--model", "{dir}/notes.txt"], "not a file of a model bundle"),
        (["--engine", "{onnx}"], "backend trt runs {dir}/tiny.plan beside {onnx}, and it does not exist"),
        (["--onnx", "{onnx}", "--batch", "0"], "bad --batch"),
        (["--onnx", "{onnx}", "--batch", "1,x"], "bad --batch"),
        (["--onnx", "{onnx}", "--frame-size", "big"], "bad --frame-size"),
        (["--onnx", "{onnx}", "--image", "{dir}/nope.png"], "image not found"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_model: Path, args: list[str], message: str) -> None:
    names = {"onnx": str(tiny_model), "json": str(tiny_model.with_suffix(".json")), "dir": str(tiny_model.parent)}
    (tiny_model.parent / "notes.txt").write_text("not a model")
    message = message.format(**names)
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_onnx_bench_does_not_import_torch(tiny_model: Path) -> None:
    code = (
        "import sys\n"
        "from protoad_edge.cli.bench import main\n"
        "try:\n"
        f"    main(['--onnx', {str(tiny_model)!r}, '--warmup', '0', '--iterations', '1', '--frame-size', '64x64'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "no torch" in res.stdout


def test_cli_threads_0_means_every_core(tiny_model: Path, tmp_path: Path) -> None:
    """0 was onnxruntime's default (one thread per physical core); it means all cores, as in every CLI."""
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        main,
        [
            "--onnx",
            str(tiny_model),
            "--warmup",
            "0",
            "--iterations",
            "1",
            "--frame-size",
            "80x80",
            "--threads",
            "0",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["header"]["backend"]["details"]["intra_op_threads"] == os.cpu_count()
