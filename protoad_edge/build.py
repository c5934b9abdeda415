"""The build stage: normal images -> patch features -> FINCH prototypes -> network -> ONNX bundle.

``build(BuildConfig(...))`` is the Python API behind ``protoad-export``. It writes
``OUT/NAME.onnx``, ``OUT/NAME.json`` and ``OUT/NAME.prototypes.npy`` only after every step,
including the onnxruntime parity check, has passed; each file is renamed into place atomically.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .datasets import Dataset, Sample, load_crops, load_masks, open_dataset
from .errors import ProtoADError
from .export.onnx import PARITY_TOLERANCE, export_onnx, onnx_parity
from .feature_cache import cached_features, default_cache_dir, features_key
from .features import BACKBONE, EMBED_DIM, PatchFeatures, build_backbone
from .finch import finch
from .metadata import ModelInfo
from .metrics import auroc, f1_optimal_threshold
from .neighbours import make_search
from .network import L2Norm, ProtoADNet
from .preprocess import Preprocess, to_batch
from .progress import progress_bar
from .runtime.backend import run_maps
from .runtime.ort_backend import OrtBackend
from .thresholds import from_normal_maps

Log = Callable[[str], None]


@dataclass
class BuildConfig:
    category: str
    data_root: Path | None = None
    dataset: str = "mvtec"
    out: Path = Path("models")
    weights: str = "imagenet"
    feature_upsample: str = "bilinear"
    max_prototypes: int = 10_000
    val_split: float = 0.1
    device: str = "auto"
    seed: int = 0
    resize: int = 256
    crop: int = 224
    batch_size: int = 8
    progress: bool = True
    cache_dir: Path | None = None  # None: default_cache_dir()
    cache: bool = True  # False: extract into a temporary file in ``out``, reuse nothing
    exact_neighbours: bool = False  # False: approximate first neighbours on the CPU for large levels


@dataclass
class BuildReport:
    info: ModelInfo
    files: list[Path]
    images: dict[str, int]
    vectors: int
    finch_counts: list[int]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    parity: float = 0.0
    test_metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProtoADError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ProtoADError(f"bad --device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


def split_train(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_split`` of the normal training images (seeded) to set thresholds on unseen parts."""
    if not 0.0 <= val_split < 1.0:
        raise ProtoADError(f"bad --val-split {val_split}: must be in [0, 1)")
    n_val = int(round(val_split * len(samples)))
    if val_split > 0 and len(samples) >= 2:
        n_val = max(n_val, 1)
    if len(samples) - n_val < 1:
        raise ProtoADError(f"--val-split {val_split} leaves no training image (only {len(samples)} normal images)")
    order = np.random.default_rng(seed).permutation(len(samples))
    val_idx = set(order[:n_val].tolist())
    fit = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return fit, val


@torch.no_grad()
def extract_vectors(
    features: PatchFeatures, crops: np.ndarray, device: torch.device, batch_size: int, progress: bool,
    out: np.ndarray,
) -> None:
    """Write the L2-normalised patch vectors [N * h * w, 1792] into ``out`` (float16/32, may be a memmap),
    batch by batch - exactly the network's own features."""
    features = features.to(device).eval()
    l2norm = L2Norm().to(device)
    h = w = features.size
    starts = list(range(0, len(crops), batch_size))
    for start in progress_bar(starts, "features", progress):
        x = torch.from_numpy(to_batch(crops[start : start + batch_size])).to(device)
        f = l2norm(features(x)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        out[start * h * w : start * h * w + f.shape[0]] = f.float().cpu().numpy()


def build(cfg: BuildConfig, log: Log = print) -> BuildReport:
    if cfg.max_prototypes < 2:
        raise ProtoADError(f"bad --max-prototypes {cfg.max_prototypes}: must be at least 2")
    device = resolve_device(cfg.device)
    pre = Preprocess(resize=cfg.resize, crop=cfg.crop)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    data: Dataset = open_dataset(cfg.category, cfg.data_root, cfg.dataset)
    fit, val = split_train(data.train, cfg.val_split, cfg.seed)
    log(f"data: {data.kind} {data.category} at {data.root}: {len(fit)} training, {len(val)} held-out, {len(data.test)} test images")
    fit_crops = load_crops(fit, pre, "load train", cfg.progress)
    val_crops = load_crops(val, pre)
    lap("load")

    backbone, weights_desc = build_backbone(cfg.weights, cfg.seed)
    features = PatchFeatures(backbone, cfg.crop, cfg.feature_upsample)
    key = features_key(dataset=data.kind, category=data.category, images=[s.path for s in fit], weights=weights_desc,
                       resize=cfg.resize, crop=cfg.crop, feature_upsample=cfg.feature_upsample)
    vectors = cached_features(
        (cfg.cache_dir or default_cache_dir()) if cfg.cache else Path(cfg.out), key,
        (len(fit) * features.size**2, EMBED_DIM),
        lambda out: extract_vectors(features, fit_crops, device, cfg.batch_size, cfg.progress, out),
        keep=cfg.cache, log=log)
    log(f"features: {len(vectors):,} patch vectors of {EMBED_DIM} ({BACKBONE}, {cfg.feature_upsample}, {device.type})")
    lap("features")

    clusters = finch(vectors, cfg.max_prototypes, search=make_search(device.type, exact=cfg.exact_neighbours, log=log),
                     progress=cfg.progress, log=log)
    prototypes = clusters.prototypes.astype(np.float32)
    del vectors
    lap("finch")

    net = ProtoADNet(features.cpu(), torch.from_numpy(prototypes), cfg.crop).eval()
    info = ModelInfo(
        category=cfg.category,
        resize=cfg.resize,
        crop=cfg.crop,
        backbone=BACKBONE,
        weights=cfg.weights,
        feature_upsample=cfg.feature_upsample,
        num_prototypes=len(prototypes),
        image_threshold=float("nan"),
        pixel_threshold=float("nan"),
        seed=cfg.seed,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{cfg.category}.", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        # Export once to run the graph and set thresholds; re-export with the final metadata below.
        export_onnx(net, info, tmp / "draft.onnx")
        lap("export")

        test_crops = load_crops(data.test, pre, "load test", cfg.progress) if data.test else val_crops[:0]
        parity_batch = to_batch(np.concatenate([val_crops[:4], test_crops[:4]]) if len(val_crops) + len(test_crops) else fit_crops[:4])
        parity = onnx_parity(tmp / "draft.onnx", net, parity_batch)
        if not parity <= PARITY_TOLERANCE:
            raise ProtoADError(f"ONNX parity check failed: max abs difference {parity:.2e} > {PARITY_TOLERANCE:.0e} against PyTorch")
        lap("parity")

        backend = OrtBackend(tmp / "draft.onnx", providers=["CPUExecutionProvider"])
        normal_crops, held_out = (val_crops, True) if len(val_crops) else (fit_crops, False)
        thresholds = from_normal_maps(run_maps(backend, normal_crops, cfg.batch_size, "thresholds", cfg.progress))
        info.image_threshold, info.pixel_threshold = thresholds.image, thresholds.pixel
        info.threshold_rule = thresholds.rule + ("" if held_out else " (no held-out images: set on training images, optimistic)")
        test_metrics = _evaluate(data, backend, test_crops, pre, cfg, log)
        lap("thresholds+test")

        info.build = {
            "weights": weights_desc,
            "dataset": data.kind,
            "images": {"train": len(fit), "held_out": len(val), "test": len(data.test)},
            "patch_vectors": len(fit) * features.size**2,
            "finch_levels": clusters.counts,
            "onnx_parity_max_abs": parity,
            "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
            **({"test": test_metrics} if test_metrics else {}),
        }
        export_onnx(net, info, tmp / "model.onnx")
        np.save(tmp / "prototypes.npy", prototypes)
        info.save_json(tmp / "model.json")
        files = []
        for src, suffix in (("model.onnx", ".onnx"), ("model.json", ".json"), ("prototypes.npy", ".prototypes.npy")):
            dst = out / f"{cfg.category}{suffix}"
            os.replace(tmp / src, dst)
            files.append(dst)
        lap("write")

    return BuildReport(
        info=info,
        files=files,
        images={"train": len(fit), "held_out": len(val), "test": len(data.test)},
        vectors=len(fit) * features.size**2,
        finch_counts=clusters.counts,
        stage_seconds=seconds,
        parity=parity,
        test_metrics=test_metrics,
    )


def _evaluate(data: Dataset, backend: OrtBackend, crops: np.ndarray, pre: Preprocess, cfg: BuildConfig, log: Log) -> dict[str, float]:
    """Image/pixel AUROC and F1-optimal thresholds of the exported graph on a labelled test split."""
    labels = np.array([s.label for s in data.test], dtype=bool)
    if len(crops) == 0 or labels.all() or not labels.any():
        return {}
    maps = run_maps(backend, crops, cfg.batch_size, "test", cfg.progress)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    result = {"image_auroc": auroc(labels, scores)}
    result["image_f1_threshold"], result["image_f1"] = f1_optimal_threshold(labels, scores)
    masks = load_masks(data.test, pre)
    if masks.any():
        result["pixel_auroc"] = auroc(masks, maps)
        result["pixel_f1_threshold"], result["pixel_f1"] = f1_optimal_threshold(masks, maps)
    return result
