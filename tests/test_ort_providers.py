"""onnxruntime's GPU providers where they cannot load: stdout stays JSON, the fallback is said on stderr.

onnxruntime-gpu lists its TensorRT and CUDA providers even where their libraries cannot load (TensorRT 11
instead of the libnvinfer.so.10 it links, CUDA 12 libraries instead of 13); it then prints an "EP Error ...
Falling back" banner to stdout. No machine of this project has onnxruntime-gpu, so onnxruntime's side is
stood in for: a provider library needing what is missing here, and a session that prints such a banner.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from protoad_edge.errors import ProtoADError  # noqa: E402
from protoad_edge.evaluation.bench import describe, header_lines  # noqa: E402
from protoad_edge.runtime.backends import ort as ort_backend  # noqa: E402
from protoad_edge.runtime.backends.base import BackendOptions  # noqa: E402

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
# What onnxruntime-gpu 1.31's TensorRT provider links (readelf -d), less the system libraries.
TRT_PROVIDER_NEEDS = ["libcublas.so.13", "libnvinfer.so.10", "libnvonnxparser.so.10", "libcudart.so.13", "libc.so.6"]


def write_elf(path: Path, needed: list[str]) -> Path:
    """A minimal ELF64 shared-object header with a dynamic section listing ``needed`` (all the reader looks at)."""
    dynstr = b"\0" + b"".join(name.encode() + b"\0" for name in needed)
    offsets = [1 + sum(len(n) + 1 for n in needed[:i]) for i in range(len(needed))]
    dynamic = b"".join(struct.pack("<qQ", 1, off) for off in offsets) + struct.pack("<qQ", 0, 0)
    str_at, dyn_at = 64, 64 + len(dynstr)
    sh_at = dyn_at + len(dynamic)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 3, 62, 1, 0, 0, sh_at, 0, 64, 0, 0, 64, 3, 0
    )
    sections = (
        bytes(64)
        + struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, str_at, len(dynstr), 0, 0, 1, 0)
        + struct.pack("<IIQQQQIIQQ", 0, 6, 0, 0, dyn_at, len(dynamic), 1, 0, 8, 16)
    )
    path.write_bytes(header + dynstr + dynamic + sections)
    return path


def loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


@pytest.fixture
def trt_provider_library(tmp_path: Path) -> Path:
    if loads("libnvinfer.so.10"):
        pytest.skip("TensorRT 10 is installed here: the provider's libraries would load")
    return write_elf(tmp_path / "libonnxruntime_providers_tensorrt.so", TRT_PROVIDER_NEEDS)


def test_needed_libraries_of_an_elf_file(tmp_path: Path) -> None:
    assert ort_backend.needed_libraries(write_elf(tmp_path / "a.so", TRT_PROVIDER_NEEDS)) == TRT_PROVIDER_NEEDS
    (tmp_path / "b.so").write_bytes(b"not a library")
    assert ort_backend.needed_libraries(tmp_path / "b.so") == []
    truncated = (tmp_path / "a.so").read_bytes()[:80]
    (tmp_path / "c.so").write_bytes(truncated)
    assert ort_backend.needed_libraries(tmp_path / "c.so") == []
    (tmp_path / "d.so").write_bytes(b"")
    assert ort_backend.needed_libraries(tmp_path / "d.so") == []


def test_needed_libraries_match_readelf() -> None:
    readelf = shutil.which("readelf")
    library = next(Path(ort.__file__).parent.joinpath("capi").glob("onnxruntime_pybind11_state*.so"), None)
    if readelf is None or library is None:
        pytest.skip("needs readelf and onnxruntime's native module")
    dump = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    expected = [line.split("[", 1)[1].split("]", 1)[0] for line in dump.splitlines() if "(NEEDED)" in line]
    assert expected and ort_backend.needed_libraries(library) == expected


def test_provider_problem_names_the_missing_library(
    monkeypatch: pytest.MonkeyPatch, trt_provider_library: Path
) -> None:
    monkeypatch.setattr(ort_backend, "provider_library", lambda module, p: trt_provider_library if p == TRT else None)
    why = ort_backend.provider_problem(ort, TRT)
    # The first of its needs that does not load: libcublas.so.13 unless something loaded it already (torch does).
    assert why is not None and why.startswith("needs lib") and ".so." in why and "cannot open shared object file" in why
    assert why.endswith(f"onnxruntime {ort.__version__} built it for TensorRT 10 and CUDA 13")
    assert ort_backend.provider_problem(ort, CUDA) is None and ort_backend.provider_problem(ort, CPU) is None


def stand_in_gpu_onnxruntime(monkeypatch: pytest.MonkeyPatch, library: Path | None, asked: list[list[str]]) -> None:
    """onnxruntime-gpu as seen here: TensorRT and CUDA listed; the session runs on the CPU provider only."""
    real = ort.InferenceSession

    def session(path: str, options: Any = None, providers: Any = None) -> Any:
        asked.append([p[0] for p in providers])
        return real(path, options, providers=[CPU])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort_backend, "provider_library", lambda module, p: library if p == TRT else None)


def test_fallback_is_one_line_on_stderr_and_in_the_bench_header(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, trt_provider_library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[list[str]] = []
    stand_in_gpu_onnxruntime(monkeypatch, trt_provider_library, asked)
    backend = ort_backend.OrtBackend(tiny_model)
    assert asked == [[CUDA, CPU]]  # TensorRT's provider was never asked for: its library cannot load
    note = backend.describe().details["note"]
    assert note.startswith(f"onnxruntime: {TRT} unavailable (needs lib") and "built it for TensorRT 10" in note
    assert f"; {CUDA} unavailable (onnxruntime could not create it" in note and note.endswith(f", using {CPU}")
    out, err = capsys.readouterr()
    assert err.splitlines() == [note] and not out
    assert backend.describe().providers == [CPU] and backend.describe().precision == "fp32"
    assert any(line.startswith("backend ") and note in line for line in header_lines(describe(backend)))


def test_device_cuda_refuses_to_fall_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    asked: list[list[str]] = []
    stand_in_gpu_onnxruntime(monkeypatch, None, asked)
    with pytest.raises(ProtoADError, match=f"--device cuda: .*tiny.onnx would run on the CPU .*{CUDA} unavailable"):
        ort_backend.OrtBackend(tiny_model, BackendOptions(device="cuda"))
    assert asked == [[TRT, CUDA]]


def test_no_fallback_no_note(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = ort_backend.OrtBackend(tiny_model, BackendOptions(device="cpu"))
    assert "note" not in backend.describe().details and capsys.readouterr().err == ""


RUN = """
import ctypes, json, os, sys
from pathlib import Path
import onnxruntime as ort
from protoad_edge.runtime.backends import ort as ort_backend

library, asked_file, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
real = ort.InferenceSession

def banner_session(path, options=None, providers=None):
    with open(asked_file, "w") as f:
        json.dump([p[0] for p in providers], f)
    os.write(1, b"*************** EP Error ***************\\nEP Error when using TensorrtExecutionProvider\\n")
    print("Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.")
    ctypes.CDLL(None).printf(b"C stdio banner\\n")
    return real(path, options, providers=["CPUExecutionProvider"])

ort.InferenceSession = banner_session
ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
ort_backend.provider_library = lambda module, p: library if p == "TensorrtExecutionProvider" else None
from protoad_edge.cli.run import main
main(argv)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="C stdio and ELF provider libraries: Linux")
def test_jsonl_stdout_stays_json_while_onnxruntime_prints(
    tiny_model: Path, tmp_path: Path, trt_provider_library: Path
) -> None:
    """``protoad-run IMAGE --jsonl -``: banners written to fd 1 by Python and C during session creation go to stderr."""
    import cv2

    image = tmp_path / "part.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    asked = tmp_path / "asked.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: Python and C buffer it
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN,
            str(trt_provider_library),
            str(asked),
            str(image),
            "--model",
            str(tiny_model),
            "--jsonl",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is JSON
    assert len(records) == 1 and records[0]["source"] == str(image)
    for banner in ("EP Error when using", "Falling back to", "C stdio banner"):
        assert banner in result.stderr and banner not in result.stdout
    assert json.loads(asked.read_text()) == [CUDA, CPU]
    fallback = [line for line in result.stderr.splitlines() if line.startswith("onnxruntime: ")]
    assert len(fallback) == 1 and f"{TRT} unavailable (needs lib" in fallback[0]
    assert fallback[0].endswith(f", using {CPU}") and f"backend ort ({CPU}, fp32)" in result.stderr
