"""Speed of a deployed model, reported the way trtexec users read it.

One timed iteration follows a frame all the way: decoded camera frame -> the model's own
``Preprocess`` (resize + centre crop) -> network input batch -> backend -> anomaly maps and
scores. Each stage's latency is kept, plus the backend's own H2D / compute / D2H split where it
measures one (the TensorRT backend with ``timing=True``). The loop is sequential on one stream,
so throughput is batch / mean latency.

No torch here: ``protoad-bench --backend ort|trt`` runs on camera images that lack it; only the
``torch`` backend (the eager PyTorch yardstick) imports it, through the backend registry.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_text_atomic
from ..errors import ProtoADError
from ..preprocess import load_rgb, to_batch
from ..runtime.backends.base import Backend

# The paper's inference speed (section 4, 224x224 input, WRN50 backbone), measured on one GPU.
PAPER_GPU = "NVIDIA GeForce RTX 2080 Ti"
PAPER_FPS = {"ProtoAD": 72.45, "PaDiM": 60.32, "PatchCore-1%": 26.17}
DEFAULT_FRAME = (1280, 720)  # width, height: a common industrial camera mode
# Stage order in reports. "infer" is the backend call (batch in, maps and scores out); the TensorRT
# backend splits it further into h2d / compute / d2h.
STAGES = ("preprocess", "h2d", "compute", "d2h", "infer", "end_to_end")
STAGE_LABELS = {
    "preprocess": "host preprocess",
    "h2d": "H2D copy",
    "compute": "GPU compute",
    "d2h": "D2H copy",
    "infer": "inference",
    "end_to_end": "end to end",
}


@dataclass(frozen=True)
class Latency:
    """trtexec's latency summary, in milliseconds."""

    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, ms: Iterable[float]) -> Latency:
        a = np.asarray(list(ms), dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        p = np.percentile(a, [50, 90, 95, 99])
        return cls(float(a.min()), float(a.mean()), float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(a.max()))


@dataclass
class BatchResult:
    """One batch size: latency per stage (ms per batch) and throughput (images per second)."""

    batch: int
    iterations: int
    warmup: int
    stages: dict[str, Latency]

    @property
    def throughput(self) -> float:
        """End to end images/s: a frame in, its score out (sequential, one stream)."""
        return 1000.0 * self.batch / self.stages["end_to_end"].mean

    @property
    def model_throughput(self) -> float:
        """Images/s of the backend call alone (the figure the paper's FPS is closest to)."""
        return 1000.0 * self.batch / self.stages["infer"].mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "iterations": self.iterations,
            "warmup": self.warmup,
            "throughput_images_per_s": self.throughput,
            "model_throughput_images_per_s": self.model_throughput,
            "latency_ms": {name: asdict(lat) for name, lat in self.stages.items()},
            "paper_ratio": {name: self.model_throughput / fps for name, fps in PAPER_FPS.items()},
        }


@dataclass
class BenchReport:
    header: dict[str, Any]
    results: list[BatchResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "results": [r.to_dict() for r in self.results],
            "paper": {"gpu": PAPER_GPU, "fps": PAPER_FPS, "input": "224x224", "backbone": "wide_resnet50_2"},
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def lines(self) -> list[str]:
        return (
            header_lines(self.header)
            + [line for r in self.results for line in result_lines(r)]
            + paper_lines(self.results)
        )


def run_batch(
    backend: Backend,
    frame: np.ndarray,
    batch: int,
    warmup: int = 5,
    iterations: int = 10,
    duration: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchResult:
    """Time ``batch`` copies of ``frame`` through preprocessing and ``backend``.

    Runs ``warmup`` untimed iterations, then at least ``iterations`` timed ones and at least
    ``duration`` seconds (trtexec's ``--iterations`` / ``--duration``).
    """
    if batch < 1 or iterations < 1 or warmup < 0 or duration < 0:
        raise ProtoADError(
            f"bad benchmark settings: batch {batch}, iterations {iterations}, warm-up {warmup}, "
            f"duration {duration} (need batch >= 1, iterations >= 1, warm-up >= 0, duration >= 0)"
        )
    preprocess = backend.info.preprocess
    frames = [frame] * batch
    samples: dict[str, list[float]] = {name: [] for name in STAGES}
    start = None
    for i in itertools.count():
        t0 = clock()
        x = to_batch([preprocess(f) for f in frames])
        t1 = clock()
        _, scores = backend.infer(x)
        float(scores.max())  # the verdict needs the scores on the host
        t2 = clock()
        if i < warmup:
            continue
        start = t0 if start is None else start
        samples["preprocess"].append(1000.0 * (t1 - t0))
        samples["infer"].append(1000.0 * (t2 - t1))
        samples["end_to_end"].append(1000.0 * (t2 - t0))
        for name, ms in (backend.stage_times() or {}).items():
            samples[name].append(ms)
        if len(samples["infer"]) >= iterations and t2 - start >= duration:
            break
    stages = {name: Latency.of(v) for name, v in samples.items() if v}
    return BatchResult(batch=batch, iterations=len(samples["infer"]), warmup=warmup, stages=stages)


def make_frame(
    size: tuple[int, int] = DEFAULT_FRAME, image: str | os.PathLike | None = None, seed: int = 0
) -> np.ndarray:
    """A decoded camera frame: ``image`` read from disk, or seeded noise of ``size`` (width, height).

    Resize cost depends on the frame's size, not its content, so noise is a fair stand-in.
    """
    if image is not None:
        return np.asarray(load_rgb(image))
    w, h = size
    if w < 1 or h < 1:
        raise ProtoADError(f"bad --frame-size {w}x{h}: both sides must be positive")
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def benchmark(
    backend: Backend,
    batches: Iterable[int],
    frame: np.ndarray,
    warmup: int = 5,
    iterations: int = 10,
    duration: float = 0.0,
    frame_source: str = "",
) -> BenchReport:
    """Benchmark every batch size in ``batches`` on ``backend``; the header describes the run."""
    batches = list(batches)
    header = describe(backend, frame=frame, frame_source=frame_source)
    header["run"] = {"warmup": warmup, "iterations": iterations, "duration_s": duration, "batches": batches}
    report = BenchReport(header)
    for b in batches:
        report.results.append(run_batch(backend, frame, b, warmup=warmup, iterations=iterations, duration=duration))
    return report


# -- what ran where ---------------------------------------------------------------------------------


def describe(backend: Backend, frame: np.ndarray | None = None, frame_source: str = "") -> dict[str, Any]:
    """The report header: machine, software versions, the backend's own description and the model's input and K."""
    info = backend.info
    facts = backend.describe()
    header: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "software": software_versions(),
        "model": {
            "path": facts.model,
            "category": info.category,
            "num_prototypes": info.num_prototypes,
            "input": [3, info.crop, info.crop],
            "resize": info.resize,
            "crop": info.crop,
            "feature_upsample": info.feature_upsample,
        },
        "backend": facts.to_dict(),
    }
    if frame is not None:
        header["frame"] = {"width": int(frame.shape[1]), "height": int(frame.shape[0]), "source": frame_source}
    return header


def machine() -> dict[str, Any]:
    """CPU model and cores from /proc/cpuinfo; the NVIDIA GPU and driver, if any, from nvidia-smi."""
    cpu, physical = _cpuinfo()
    out: dict[str, Any] = {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu or platform.processor() or "unknown",
        "logical_cores": os.cpu_count() or 0,
        "physical_cores": physical or os.cpu_count() or 0,
    }
    out.update(gpu())
    return out


def _cpuinfo() -> tuple[str, int]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", 0
    model, cores, phys = "", set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model") and not model:  # x86 / Jetson (ARM) spelling
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return model, len(cores)


def gpu() -> dict[str, Any]:
    """``gpu`` and ``driver`` of the first NVIDIA GPU ('' where there is none). nvidia-smi first (it
    needs no Python package), then cuda-python (Jetsons have no nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run(
                [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            first = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
            if first:
                name, _, driver = first.partition(",")
                return {"gpu": name.strip(), "driver": driver.strip()}
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from ..gpu import cuda as cm

        rt = cm.cudart()
        name = cm.device_name(0)
        version = int(cm.check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        return {"gpu": name, "driver": f"CUDA driver API {version // 1000}.{version % 1000 // 10}"}
    except (ProtoADError, ImportError, AttributeError):
        return {"gpu": "", "driver": ""}


def software_versions() -> dict[str, str]:
    """Versions of the inference stack that are installed (read from package metadata: importing
    torch or TensorRT only to print a version would cost seconds and, for torch, is not allowed here)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in (
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
        "tensorrt-cu12",
        "tensorrt-cu13",
        "cuda-python",
        "cuda-bindings",
        "opencv-python",
        "pillow",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "tensorrt" not in out and "tensorrt" in sys.modules:  # JetPack's TensorRT is a system package
        out["tensorrt"] = getattr(sys.modules["tensorrt"], "__version__", "")
    torch = sys.modules.get("torch")
    if torch is not None:  # only where torch is in use (--torch, the benchmarks), never imported for this
        out["torch"] = torch.__version__
        if getattr(torch.version, "cuda", None):
            out["torch_cuda"] = torch.version.cuda
    try:
        from ..gpu import cuda as cm

        version = int(cm.check(cm.cudart().cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        out["cuda_runtime"] = f"{version // 1000}.{version % 1000 // 10}"
    except (ProtoADError, ImportError, AttributeError):
        pass
    return out


# -- text report -----------------------------------------------------------------------------------


def header_lines(h: dict[str, Any]) -> list[str]:
    m, s, mod, b = h["machine"], h["software"], h["model"], h["backend"]
    gpu_text = f"{m['gpu']} (driver {m['driver']})" if m.get("gpu") else "no NVIDIA GPU"
    soft = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("python", "numpy", "opencv-python", "pillow"))
    details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in b["details"].items())
    where = ", ".join(b["providers"]) if b["providers"] else b["device"]
    lines = [
        "=== protoad-bench ===",
        f"date        {h['date']}",
        f"machine     {m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical), {gpu_text}",
        f"software    python {s['python']}, {soft or 'no inference library found'}",
        (
            f"model       {mod['path']}: {mod['category']}, K = {mod['num_prototypes']:,} prototypes, "
            f"input Nx3x{mod['crop']}x{mod['crop']} (resize {mod['resize']} px, crop {mod['crop']} px)"
        ),
        f"backend     {b['name']} on {where}, precision {b['precision']}" + (f"; {details}" if details else ""),
    ]
    if "frame" in h:
        f = h["frame"]
        lines.append(
            f"frame       {f['width']}x{f['height']} RGB uint8 ({f['source']}) -> the model's preprocessing "
            f"-> batch -> network -> maps and scores"
        )
    if "run" in h:
        r = h["run"]
        lines.append(
            f"run         warm-up {r['warmup']:,} iterations, then >= {r['iterations']:,} iterations and "
            f">= {r['duration_s']:g} s per batch size; sequential, one stream"
        )
    return lines


def result_lines(r: BatchResult) -> list[str]:
    lines = [
        "",
        f"=== batch {r.batch} ({r.iterations:,} iterations) ===",
        f"Throughput: {r.throughput:,.2f} images/s end to end, {r.model_throughput:,.2f} images/s inference",
        f"Latency per batch (ms) {'min':>9} {'mean':>9} {'median':>9} {'p90':>9} {'p95':>9} {'p99':>9} {'max':>9}",
    ]
    for name in STAGES:
        lat = r.stages.get(name)
        if lat is not None:
            values = (lat.min, lat.mean, lat.median, lat.p90, lat.p95, lat.p99, lat.max)
            lines.append(f"  {STAGE_LABELS[name]:<20}" + "".join(f" {v:9,.2f}" for v in values))
    return lines


def paper_lines(results: list[BatchResult]) -> list[str]:
    refs = ", ".join(f"{name} {fps}" for name, fps in PAPER_FPS.items())
    lines = ["", f"=== against the paper ({refs} FPS; 224x224, wide_resnet50_2) ==="]
    for r in results:
        ratios = ", ".join(f"{r.model_throughput / fps:.3g}x {name}" for name, fps in PAPER_FPS.items())
        lines.append(f"  batch {r.batch}: inference {r.model_throughput:,.2f} images/s = {ratios}")
    lines.append(
        f"  The paper's figures were measured on an {PAPER_GPU}; a ratio from another machine is indicative only."
    )
    return lines
