"""What the speed benchmarks share: the images, the prototypes, the exported model, fair timing, RESULTS.md.

The benchmarks build their model offline (``--weights none``, seed 0): speed and the agreement of
two pipelines do not depend on the backbone's weights, only on its shape and on K.
"""

from __future__ import annotations

import os
import re
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from protoad_edge.atomic import write_text_atomic
from protoad_edge.builder.demo import demo_image
from protoad_edge.evaluation.bench import machine, software_versions
from protoad_edge.preprocess import IMAGE_SUFFIXES, Preprocess, load_rgb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# The shared copy of MVTec AD beside the checkout (see ../shared/data/README.md); never copied in.
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mvtec"
CATEGORY = "bottle"


def frames(split: str, n: int, data_root: Path = DEFAULT_DATA) -> tuple[list[np.ndarray], str]:
    """``n`` decoded RGB frames of ``split`` (``train`` or ``test``), spread evenly over the sorted files.

    MVTec AD bottle (900x900) when present, else the built-in demo drawn in memory (256x256).
    """
    folder = data_root / CATEGORY / split
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if files:
        picks = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)]
        return [np.asarray(load_rgb(p)) for p in picks], f"MVTec AD {CATEGORY} {split} ({folder})"
    demo_split = "train/good" if split == "train" else "test/scratch"
    return [demo_image(demo_split, i)[1] for i in range(n)], f"built-in demo {demo_split} (no {folder})"


def crops(images: list[np.ndarray]) -> np.ndarray:
    """The model's preprocessing (resize 256, centre crop 224) of each image: uint8 [N,224,224,3]."""
    pre = Preprocess()
    return np.stack([pre(im) for im in images])


def sample_prototypes(features: object, train_crops: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` real normalised patch vectors of normal images (as FINCH means would be: unit, in-distribution).

    Needs ``ceil(k / patches per image)`` training crops; sampled without replacement.
    """
    import torch

    from protoad_edge.builder.network import L2Norm
    from protoad_edge.preprocess import to_batch

    with torch.inference_mode():
        f = L2Norm()(features(torch.from_numpy(to_batch(train_crops))))
    vectors = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()
    if k > len(vectors):
        raise SystemExit(f"K {k} needs more than {len(train_crops)} training images ({len(vectors)} patch vectors)")
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(vectors[rng.choice(len(vectors), k, replace=False)])


def export_model(net: object, k: int, out: Path, name: str = "bench", crop: int = 224, resize: int = 256) -> Path:
    """Export ``net`` (weights none, seed 0) as ``out/NAME.onnx`` with its metadata; returns the path."""
    from protoad_edge.constants import BACKBONE
    from protoad_edge.export.onnx import export_onnx
    from protoad_edge.metadata import ModelInfo

    info = ModelInfo(
        category=name,
        resize=resize,
        crop=crop,
        backbone=BACKBONE,
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=k,
        image_threshold=0.0,
        pixel_threshold=0.0,
        seed=0,
    )
    return export_onnx(net, info, out / f"{name}.onnx")


def interleaved(runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, timed in turns (a, b, c, then b, c, a, ...).

    On a shared machine the load drifts; taking turns, with the order rotated every round, lets
    every candidate meet the same conditions, and medians drop the runs a neighbour disturbed.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            out[name].append(time.perf_counter() - t)
    return out


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def machine_text() -> str:
    m, s = machine(), software_versions()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    libs = ", ".join(f"{k} {s[k]}" for k in ("onnxruntime", "torch") if k in s)
    return f"{m['cpu']}, {m['physical_cores']} cores ({m['logical_cores']} logical){gpu}; python {s['python']}, {libs}"


def update_results(key: str, body: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the section of RESULTS.md between ``<!-- key:start -->`` and ``<!-- key:end -->``.

    Each benchmark owns one section, so benchmarks can be rerun in any order without touching
    the others' figures.
    """
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    return write_text_atomic(path, text)


def network_key(info: object) -> str:
    """A bundle's network in a RESULTS.md section key: ``p256`` for ``--project-dims 256``, else ``paper``."""
    projection = getattr(info, "projection", None)
    return f"p{projection['dims']}" if projection else "paper"


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", os.path.relpath(argv[0], ROOT), *argv[1:]])
