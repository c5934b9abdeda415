"""The GPU checks that are not unit tests, with the figures they measure; run by ``gpu_check.sh``.

Each check prints its figures or says why it could not run on this machine; the summary lists
every check as ran / skipped / FAILED, so a GPU session shows at a glance what it did not cover.
Run from the repository root: ``python benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the package, the tests' bundle builder (make_bundle), the benchmarks' vector maker (make_synthetic)
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from protoad_edge.errors import ProtoADError  # noqa: E402
from protoad_edge.gpu import cuda as cm  # noqa: E402
from protoad_edge.preprocess import to_batch  # noqa: E402


class Skipped(Exception):
    """The check cannot run here (missing package or device); the message says which."""


class Failed(Exception):
    """The check ran and its result is wrong."""


def per_image_ms(run: Callable[[], object], batch: int, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``run()`` per image, after warm-up (``run`` must synchronise)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def require_gpu() -> str:
    try:
        return cm.device_name()
    except ProtoADError as exc:
        raise Skipped(str(exc)) from None


def check_cuda_memory() -> str:
    """Pinned round trip of 64 MiB through the runtime's cuda-python layer; copy bandwidth from CUDA events."""
    gpu = require_gpu()
    n = (64 << 20) // 4
    buf, stream = cm.HostDeviceBuffer((n,)), cm.Stream()
    events = [cm.Event() for _ in range(3)]
    try:
        data = np.random.default_rng(0).random(n, dtype=np.float32)
        buf.host[:] = data
        stream.record(events[0])
        stream.to_device(buf)
        stream.record(events[1])
        stream.synchronize()
        buf.host[:] = 0
        stream.to_host(buf)
        stream.record(events[2])
        stream.synchronize()
        if not np.array_equal(buf.host, data):
            raise Failed("device round trip changed the data")
        h2d, d2h = events[1].ms_since(events[0]), events[2].ms_since(events[1])
    finally:
        buf.free()
        stream.close()
        for e in events:
            e.close()
    return (
        f"{gpu}: 64 MiB pinned round trip exact; H2D {buf.nbytes / h2d / 1e6:.1f} GB/s, "
        f"D2H {buf.nbytes / d2h / 1e6:.1f} GB/s"
    )


def torch_network(crop: int, k: int, seed: int = 0):  # -> ProtoADNet
    """Random-weight backbone, K prototypes drawn from its normalised features of two synthetic images."""
    import torch
    from conftest import normal_crops

    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.network import L2Norm, ProtoADNet

    features = PatchFeatures(build_backbone("none", seed)[0], crop)
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(normal_crops(2, crop, seed)))))
    vectors = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    pick = torch.randint(len(vectors), (k,), generator=torch.Generator().manual_seed(seed))
    return ProtoADNet(features, vectors[pick], crop).eval()


def check_torch_cuda() -> str:
    """The PyTorch network on the GPU: FP32 equal to the CPU's; speed of FP32 and FP16 (autocast) at crop 224."""
    import torch

    if not torch.cuda.is_available():
        raise Skipped("torch: no CUDA device")
    from conftest import normal_crops

    from protoad_edge.export.onnx import PARITY_TOLERANCE

    torch.backends.cudnn.allow_tf32 = False  # TF32 keeps 10 mantissa bits: compare real FP32
    torch.backends.cuda.matmul.allow_tf32 = False
    net = torch_network(64, 48)
    x = torch.from_numpy(to_batch(normal_crops(4, 64, seed=1)))
    with torch.no_grad():
        cpu_maps = net(x)[0]
        gpu_maps = copy.deepcopy(net).cuda()(x.cuda())[0].cpu()
    diff = float((cpu_maps - gpu_maps).abs().max())
    if diff > PARITY_TOLERANCE:
        raise Failed(f"CUDA maps differ from CPU maps by {diff:.2e} (tolerance {PARITY_TOLERANCE:g})")
    big = torch_network(224, 10_000).cuda()
    batch = torch.from_numpy(to_batch(normal_crops(8, 224, seed=2))).cuda()

    def forward(fp16: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                out = big(batch)
            torch.cuda.synchronize()
            return out

        return run

    fp32_ms, fp16_ms = per_image_ms(forward(False), 8), per_image_ms(forward(True), 8)
    half_diff = float((forward(True)()[0].float() - forward(False)()[0]).abs().max())
    return (
        f"tiny CPU vs CUDA max |map diff| {diff:.1e} (tolerance {PARITY_TOLERANCE:g}); crop 224, K 10,000, batch 8: "
        f"FP32 {fp32_ms:.2f} ms/image, FP16 autocast {fp16_ms:.2f} ms/image ({fp32_ms / fp16_ms:.1f}x), "
        f"FP16 vs FP32 max |map diff| {half_diff:.1e}"
    )


def check_tensorrt() -> str:
    """Engine builds of the tiny model (FP32, FP16) and of a crop-224 model (FP16): build time, ms/image, parity."""
    from protoad_edge.gpu.tensorrt import import_tensorrt

    try:
        tensorrt = import_tensorrt()  # says whether it is missing or installed but unable to load, and why
    except ProtoADError as exc:
        raise Skipped(f"TensorRT: {exc}") from None
    require_gpu()
    from conftest import make_bundle, normal_crops

    from protoad_edge.export.tensorrt import build_engine
    from protoad_edge.metadata import ModelInfo
    from protoad_edge.runtime.backends.base import BackendOptions
    from protoad_edge.runtime.backends.ort import OrtBackend
    from protoad_edge.runtime.backends.trt import TrtBackend

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    lines = [f"TensorRT {tensorrt.__version__}"]
    try:
        for name, crop, resize, k, precisions in (
            ("tiny", 64, 72, 48, ("fp32", "fp16")),
            ("c224", 224, 256, 1000, ("fp16",)),
        ):
            onnx = make_bundle(work / name, name=name, crop=crop, resize=resize, k=k)
            batch = to_batch(normal_crops(8, crop, seed=3))
            ref_maps, _ = OrtBackend(onnx, providers=["CPUExecutionProvider"]).infer(batch)
            for precision in precisions:
                build = build_engine(onnx, precision=precision, max_batch=8, log=lambda line: None)
                with TrtBackend(build.plan, BackendOptions(timing=True)) as backend:
                    maps, _ = backend.infer(batch)
                    ms8 = per_image_ms(lambda b=batch: backend.infer(b), 8)
                    stages = backend.last_times
                    ms1 = per_image_ms(lambda b=batch: backend.infer(b[:1]), 1)
                diff = float(np.abs(maps - ref_maps).max())
                facts = ModelInfo.load_json(build.sidecar).build["tensorrt"]
                how = "strongly typed" if facts["strongly_typed"] else "weakly typed"
                if "fp32_layers" in facts:
                    how = f"FP16 flag, {facts['fp32_layers']} layers pinned to FP32"
                lines.append(
                    f"{name} (crop {crop}, K {k}) {precision} ({how}, from {facts['onnx']}): "
                    f"built in {build.seconds:.1f} s; batch 1 "
                    f"{ms1:.2f} ms/image, batch 8 {ms8:.2f} ms/image (H2D {stages.h2d_ms:.2f}, compute "
                    f"{stages.compute_ms:.2f}, D2H {stages.d2h_ms:.2f} ms per batch); max |map - ORT FP32| {diff:.1e}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return "\n    ".join(lines)


def check_finch_gpu(n: int = 627_200, sample: int = 2000) -> str:
    """FINCH of a category's worth of vectors (627,200 x 1792 FP16, 200 images) on the GPU: the issue asks
    for about a minute on an RTX-class GPU. Level-0 search in FP16 (checked) and FP32, and its answers
    for sampled rows against the CPU's exact FP32 search."""
    import torch

    if not torch.cuda.is_available():
        raise Skipped("torch: no CUDA device")
    from bench_finch_scale import exact_rows, make_synthetic

    from protoad_edge.builder.finch import finch
    from protoad_edge.builder.gpu_neighbours import gpu_first_neighbours
    from protoad_edge.builder.neighbours import make_search

    work = Path(tempfile.mkdtemp(prefix="gpu_check_finch_"))
    try:
        path = work / "x.npy"
        start = time.perf_counter()
        make_synthetic(path, n, clusters=20_000)
        x = np.load(path, mmap_mode="r")
        made = time.perf_counter() - start
        notes: list[str] = []
        timings = {}
        for precision in ("fp16", "fp32"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            found = gpu_first_neighbours(x, precision=precision, log=notes.append)
            timings[precision] = time.perf_counter() - start
            if precision == "fp16":
                fp16 = found
        start = time.perf_counter()
        result = finch(x, search=make_search("cuda", log=notes.append), log=notes.append)
        total = time.perf_counter() - start
        rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
        truth, truth_sim = exact_rows(path, n, rows)
        hit = (fp16.index[rows] == truth) | (np.abs(fp16.similarity[rows] - truth_sim) <= 1e-6)
        if not hit.all():
            raise Failed(
                f"FP16-checked search differs from the CPU's exact FP32 one on {int((~hit).sum())} of "
                f"{sample} sampled rows"
            )
        diff = float(np.abs(fp16.similarity[rows] - truth_sim).max())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    retried = next((line for line in notes if "searched again" in line), "")
    return (
        f"{n:,} x 1792 synthetic vectors (made in {made:.0f} s): level-0 search "
        f"FP16+check {timings['fp16']:.1f} s, "
        f"FP32 {timings['fp32']:.1f} s ({timings['fp32'] / timings['fp16']:.1f}x); {retried.split('; ')[-1]}; "
        f"all FINCH levels {total:.1f} s -> {result.counts} (target: about 60 s on an RTX-class GPU); "
        f"{sample} sampled rows equal the CPU's exact search (max |similarity diff| {diff:.1e})"
    )


# One entry per GPU check.
CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("cuda_memory", check_cuda_memory),
    ("torch_cuda", check_torch_cuda),
    ("tensorrt", check_tensorrt),
    ("finch_gpu", check_finch_gpu),
]


def main(selected: list[str]) -> int:
    results = []
    for name, check in CHECKS:
        if selected and name not in selected:
            continue
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            results.append(("ran", name, check()))
        except Skipped as exc:
            results.append(("skipped", name, str(exc)))
        except Exception as exc:  # a failed check must not hide the others
            traceback.print_exc()
            results.append(("FAILED", name, f"{type(exc).__name__}: {exc}"))
        print(f"   {results[-1][0]} in {time.perf_counter() - started:.1f} s", flush=True)
    print("\n== summary")
    for status, name, text in results:
        print(f"{status:8} {name:12} {text}")
    return 1 if any(status == "FAILED" for status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
