"""The build stage as named steps: load and split -> extract -> cluster -> calibrate and check -> write
(-> the TensorRT engine where one can be built).

``build(BuildConfig(...))`` is the Python API behind ``protoad-export``. It writes ``OUT/NAME.onnx``,
``OUT/NAME.json`` and ``OUT/NAME.prototypes.npy`` (and ``OUT/NAME.projection.npz`` with ``--project-dims``,
after comparing the projected network with the paper's) only after every step, including the onnxruntime
parity check, has passed; each file is renamed into place atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bundle import Bundle
from ..constants import BACKBONE, FEATURE_CHANNELS, feature_size
from ..decision import image_scores
from ..errors import ProtoADError
from ..export.engine import engine_for_bundle
from ..export.onnx import PARITY_TOLERANCE, export_onnx, parity_gate
from ..export.tensorrt import EngineBuild
from ..metadata import TRAINING, ModelInfo
from ..metrics import auroc, f1_optimal_threshold, pro_area, pro_curve
from ..preprocess import Preprocess, to_batch
from ..progress import progress_bar
from ..runtime.backends.base import run_maps
from ..runtime.backends.ort import OrtBackend
from .config import PROJECTIONS, BuildConfig
from .datasets import Dataset, Sample, load_crops, load_masks, open_dataset
from .device import resolve_device
from .feature_cache import cached_features, default_cache_dir, features_key
from .features import PatchFeatures, build_backbone
from .finch import FinchResult, finch
from .memory import DEFAULT_SHARE, MemoryBudget, arrays_within, available_bytes, default_limit, format_size
from .neighbours import make_search
from .network import L2Norm, ProtoADNet
from .projection import FittedProjection, check_dims, fit_projection, sample_rows, stage_flops
from .reference import built_on
from .thresholds import Thresholds, from_normal_maps

Log = Callable[[str], None]
PARITY_IMAGES = 4  # held-out and test images each that the parity gate runs
TIMED_IMAGES, TIMING_ROUNDS = 2, 3  # test images (batch 1) and rounds timing the paper's and the projected network


@dataclass
class Split:
    """The category's images, decoded and cropped: training, held-out normal and test."""

    data: Dataset
    fit: list[Sample]
    val: list[Sample]
    fit_crops: np.ndarray
    val_crops: np.ndarray
    test_crops: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        return {"train": len(self.fit), "held_out": len(self.val), "test": len(self.data.test)}


@dataclass
class Calibration:
    """What the calibrate-and-check step found on the draft graph."""

    parity: float
    thresholds: Thresholds
    held_out: bool  # False: no held-out images, thresholds set on training images (optimistic)
    test_metrics: dict[str, float]
    normal_scores: np.ndarray  # the image scores the thresholds were set on


@dataclass
class NetworkFigures:
    """One network's row in the side-by-side of a ``--project-dims`` build: the paper's, or the projected one."""

    network: str
    image_auroc: float
    pixel_auroc: float | None  # None: no masks in the test split
    pro: float | None
    ms_per_image: float  # onnxruntime, CPU, batch 1
    gflop_per_image: float  # the prototype stage, with its projection

    @classmethod
    def of(cls, network: str, metrics: dict[str, float], ms: float, flops: int) -> NetworkFigures:
        return cls(network, metrics["image_auroc"], metrics.get("pixel_auroc"), metrics.get("pro"), ms, flops / 1e9)


@dataclass
class BuildReport:
    info: ModelInfo
    files: list[Path]
    images: dict[str, int]
    vectors: int
    features_cached: bool  # the training features came from the cache (extraction skipped)
    finch_counts: list[int]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    parity: float = 0.0
    test_metrics: dict[str, float] = field(default_factory=dict)
    engine: EngineBuild | None = None
    comparison: list[NetworkFigures] = field(default_factory=list)  # --project-dims with a labelled test split


class StageClock:
    """Wall time per named stage, for the report and the sidecar."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


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


def load_split(cfg: BuildConfig, pre: Preprocess, log: Log) -> Split:
    """Step 1: read the category, hold out normal images for the thresholds, decode and crop everything."""
    data = open_dataset(cfg.category, cfg.data_root, cfg.dataset)
    fit, val = split_train(data.train, cfg.val_split, cfg.seed)
    log(
        f"data: {data.kind} {data.category} at {data.root}: {len(fit):,} training, {len(val):,} held-out, "
        f"{len(data.test):,} test images"
    )
    return Split(
        data,
        fit,
        val,
        fit_crops=load_crops(fit, pre, "load train", cfg.progress),
        val_crops=load_crops(val, pre),
        test_crops=load_crops(data.test, pre, "load test", cfg.progress),
    )


@torch.no_grad()
def extract_vectors(
    features: PatchFeatures, crops: np.ndarray, device: torch.device, batch_size: int, progress: bool, out: np.ndarray
) -> None:
    """Write the L2-normalised patch vectors [N * h * w, 1792] into ``out`` (float16/32, may be a memmap),
    batch by batch - exactly the network's own features."""
    features = features.to(device).eval()
    l2norm = L2Norm().to(device)
    h = w = features.size
    starts = list(range(0, len(crops), batch_size))
    sizes = [min(batch_size, len(crops) - start) for start in starts]
    for start in progress_bar(starts, "features", progress, unit="images", sizes=sizes):
        x = torch.from_numpy(to_batch(crops[start : start + batch_size])).to(device)
        f = l2norm(features(x)).permute(0, 2, 3, 1).reshape(-1, FEATURE_CHANNELS)
        out[start * h * w : start * h * w + f.shape[0]] = f.float().cpu().numpy()


def extract(
    cfg: BuildConfig, split: Split, features: PatchFeatures, weights: str, device: torch.device, log: Log
) -> tuple[np.ndarray, bool]:
    """Step 2: the training patch vectors (a read-only FP16 memmap) and whether the cache already had them."""
    key = features_key(
        dataset=split.data.kind,
        category=split.data.category,
        images=[s.path for s in split.fit],
        weights=weights,
        resize=cfg.resize,
        crop=cfg.crop,
        feature_upsample=cfg.feature_upsample,
        region=None if cfg.roi is None and cfg.fit == "crop" else [cfg.roi, cfg.fit],
    )
    vectors, cached = cached_features(
        features_dir(cfg),
        key,
        (len(split.fit) * features.size**2, FEATURE_CHANNELS),
        lambda out: extract_vectors(features, split.fit_crops, device, cfg.batch_size, cfg.progress, out),
        keep=cfg.cache,
        log=log,
    )
    log(
        f"features: {len(vectors):,} patch vectors x {FEATURE_CHANNELS} channels ({BACKBONE}, {cfg.feature_upsample}, "
        f"{device.type})"
    )
    return vectors, cached


def features_dir(cfg: BuildConfig) -> Path:
    """Where the training features are written: the feature cache, or with ``--no-cache`` the output folder."""
    return (cfg.cache_dir or default_cache_dir()) if cfg.cache else Path(cfg.out)


def memory_budget(cfg: BuildConfig, log: Log) -> MemoryBudget:
    """The budget of FINCH's large arrays: ``--memory-limit``, else a share of the available memory. What does
    not fit spills beside the features, which that disk already holds. A limit too small fails here, before
    the images are read."""
    if cfg.memory_limit is not None:
        limit, why = cfg.memory_limit, "--memory-limit"
    else:
        available = available_bytes()
        limit = default_limit(available)
        why = f"{DEFAULT_SHARE:.2f} of the {format_size(available)} available; --memory-limit to set it"
    budget = MemoryBudget(arrays_within(limit), features_dir(cfg), log)
    log(f"memory: limit {format_size(limit)} ({why}); FINCH's arrays beyond it spill to {budget.spill_dir}")
    return budget


def cluster(
    cfg: BuildConfig, vectors: np.ndarray, device: torch.device, log: Log, budget: MemoryBudget | None = None
) -> FinchResult:
    """Step 3: FINCH prototypes of the training vectors, their large arrays within ``budget`` (default:
    ``memory_budget``)."""
    budget = budget or memory_budget(cfg, log)
    search = make_search(device.type, exact=cfg.exact_neighbours, budget=budget, log=log)
    return finch(vectors, cfg.max_prototypes, search=search, progress=cfg.progress, budget=budget, log=log)


def project(cfg: BuildConfig, vectors: np.ndarray, k: int, log: Log) -> FittedProjection:
    """Step 3b (``--project-dims``): the PCA the network compares in, fitted on a seeded sample of the training
    patch vectors (builder/projection.py says why); D at most the K prototypes."""
    check_dims(cfg.project_dims, prototypes=k)
    fitted = fit_projection(sample_rows(vectors, seed=cfg.seed), cfg.project_dims, centred=cfg.projection == "centred")
    hw = feature_size(cfg.crop) ** 2
    log(
        f"projection: {fitted.dims} dims ({cfg.projection}), fitted on {fitted.rows:,} training patch vectors "
        f"({100 * fitted.variance_kept:.1f}% of their variance); prototype stage "
        f"{stage_flops(hw, k) / 1e9:.2f} -> {stage_flops(hw, k, fitted.dims) / 1e9:.2f} GFLOP per image"
    )
    return fitted


def calibrate_and_check(
    cfg: BuildConfig, net: ProtoADNet, draft: Path, split: Split, pre: Preprocess, log: Log
) -> Calibration:
    """Step 4, on the exported draft graph: the parity gate against PyTorch, thresholds from the held-out
    normal images, and the metrics on a labelled test split."""
    probe = np.concatenate([split.val_crops[:PARITY_IMAGES], split.test_crops[:PARITY_IMAGES]])
    parity = parity_gate(
        draft, net, to_batch(probe if len(probe) else split.fit_crops[:PARITY_IMAGES]), PARITY_TOLERANCE
    )
    backend = OrtBackend(draft, providers=["CPUExecutionProvider"])
    held_out = len(split.val_crops) > 0
    normal = split.val_crops if held_out else split.fit_crops
    maps = run_maps(backend, normal, cfg.batch_size, "thresholds", cfg.progress)
    return Calibration(
        parity, from_normal_maps(maps), held_out, score_test_split(split, backend, pre, cfg), image_scores(maps)
    )


def score_test_split(split: Split, backend: OrtBackend, pre: Preprocess, cfg: BuildConfig) -> dict[str, float]:
    """Image/pixel AUROC and F1-optimal thresholds of the exported graph on a labelled test split."""
    labels = np.array([s.label for s in split.data.test], dtype=bool)
    if len(split.test_crops) == 0 or labels.all() or not labels.any():
        return {}
    maps = run_maps(backend, split.test_crops, cfg.batch_size, "test", cfg.progress)
    scores = image_scores(maps)
    result = {"image_auroc": auroc(labels, scores)}
    result["image_f1_threshold"], result["image_f1"] = f1_optimal_threshold(labels, scores)
    masks = load_masks(split.data.test, pre)
    if masks.any():
        result["pixel_auroc"] = auroc(masks, maps)
        result["pixel_f1_threshold"], result["pixel_f1"] = f1_optimal_threshold(masks, maps)
        if not masks.all():
            fpr, pro, _ = pro_curve(masks, maps)
            result["pro"] = pro_area(fpr, pro)
    return result


def side_by_side(
    cfg: BuildConfig,
    net: ProtoADNet,
    paper: ProtoADNet,
    info: ModelInfo,
    draft: Path,
    tmp: Path,
    split: Split,
    pre: Preprocess,
    projected: dict[str, float],
) -> list[NetworkFigures]:
    """The paper's network beside the projected draft: exported the same way, scored on the same test split by
    the same code, and both timed through onnxruntime in turns on the same images (the load drifts)."""
    export_onnx(paper, dataclasses.replace(info, projection=None), tmp / "paper.onnx")
    backends = {
        name: OrtBackend(path, providers=["CPUExecutionProvider"])
        for name, path in (("paper", tmp / "paper.onnx"), ("projected", draft))
    }
    paper_metrics = score_test_split(split, backends["paper"], pre, cfg)
    ms = ms_per_image(backends, split.test_crops[:TIMED_IMAGES], TIMING_ROUNDS)
    hw, k, p = feature_size(cfg.crop) ** 2, net.num_prototypes, net.projection
    return [
        NetworkFigures.of(f"paper ({FEATURE_CHANNELS})", paper_metrics, ms["paper"], stage_flops(hw, k)),
        NetworkFigures.of(
            f"projected ({p.dims}, {cfg.projection})", projected, ms["projected"], stage_flops(hw, k, p.dims)
        ),
    ]


def ms_per_image(backends: dict[str, OrtBackend], crops: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per image of each backend at batch 1, after a warm-up, timed in turns with the order rotated
    every round, so that each meets the same load on a shared machine."""
    batches = [to_batch(crops[i : i + 1]) for i in range(len(crops))]
    names = list(backends)
    for name in names:
        backends[name].infer(batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for batch in batches:
                start = time.perf_counter()
                backends[name].infer(batch)
                seconds[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(s) for name, s in seconds.items()}


def write(
    net: ProtoADNet,
    info: ModelInfo,
    prototypes: np.ndarray,
    tmp: Path,
    bundle: Bundle,
    projection: FittedProjection | None = None,
) -> list[Path]:
    """Step 5: the final graph (with the final metadata), prototypes, projection (if any) and the sidecar, which
    records their digests (``info.digests``), renamed into place, the sidecar last. A projection left by an
    earlier build of this name is removed: it describes another network."""
    staged = Bundle(tmp / "model")
    export_onnx(net, info, staged.onnx)
    np.save(staged.prototypes, prototypes)
    kinds = ["onnx", "prototypes"]
    if projection is not None:
        projection.save(staged.file("projection"))
        kinds.append("projection")
    else:
        bundle.file("projection").unlink(missing_ok=True)
    info.digests = staged.seal(info).digests
    info.save_json(staged.sidecar)
    files = []
    for kind in [*kinds, "sidecar"]:
        os.replace(staged.file(kind), bundle.file(kind))
        files.append(bundle.file(kind))
    return files


def build(cfg: BuildConfig, log: Log = print) -> BuildReport:
    if cfg.max_prototypes < 2:
        raise ProtoADError(f"bad --max-prototypes {cfg.max_prototypes}: must be at least 2")
    if cfg.projection not in PROJECTIONS:
        raise ProtoADError(f"bad --projection {cfg.projection!r}: choose one of {', '.join(PROJECTIONS)}")
    if cfg.project_dims is not None:
        check_dims(cfg.project_dims)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = resolve_device(cfg.device)
    budget = memory_budget(cfg, log)
    pre = Preprocess(resize=cfg.resize, crop=cfg.crop, roi=cfg.roi, fit=cfg.fit)
    clock = StageClock()
    with clock("load"):
        split = load_split(cfg, pre, log)
    with clock("features"):
        backbone, weights = build_backbone(cfg.weights, cfg.seed)
        features = PatchFeatures(backbone, cfg.crop, cfg.feature_upsample)
        vectors, cached = extract(cfg, split, features, weights, device, log)
    with clock("finch"):
        clusters = cluster(cfg, vectors, device, log, budget)
    prototypes = clusters.prototypes.astype(np.float32)
    projection = None
    if cfg.project_dims is not None:
        with clock("projection"):
            projection = project(cfg, vectors, len(prototypes), log)
    del vectors

    net = ProtoADNet(
        features.cpu(), torch.from_numpy(prototypes), cfg.crop, projection=projection.module() if projection else None
    ).eval()
    info = ModelInfo(
        category=cfg.category,
        resize=cfg.resize,
        crop=cfg.crop,
        roi=list(cfg.roi) if cfg.roi else None,
        fit=cfg.fit,
        backbone=BACKBONE,
        weights=cfg.weights,
        feature_upsample=cfg.feature_upsample,
        num_prototypes=len(prototypes),
        image_threshold=float("nan"),
        pixel_threshold=float("nan"),
        seed=cfg.seed,
        projection=projection.record if projection else None,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(out / cfg.category)
    with tempfile.TemporaryDirectory(prefix=f".{cfg.category}.", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        with clock("export"):
            # A draft to run the graph and set thresholds; the final export carries the final metadata.
            export_onnx(net, info, tmp / "draft.onnx")
        with clock("calibrate"):
            calibration = calibrate_and_check(cfg, net, tmp / "draft.onnx", split, pre, log)
        info.built_on = built_on(
            split.fit + split.val,
            [*split.fit_crops, *split.val_crops],
            pre,
            calibration.normal_scores,
            calibration.held_out,
        )
        comparison = []
        if projection is not None and calibration.test_metrics:
            with clock("compare"):
                paper = ProtoADNet(net.features, torch.from_numpy(prototypes), cfg.crop).eval()
                comparison = side_by_side(
                    cfg, net, paper, info, tmp / "draft.onnx", tmp, split, pre, calibration.test_metrics
                )
        t = calibration.thresholds
        info.image_threshold, info.pixel_threshold = t.image, t.pixel
        info.threshold_rule = t.rule if calibration.held_out else TRAINING
        info.threshold_detail = t.detail + (
            "" if calibration.held_out else " (no held-out images: set on training images, optimistic)"
        )
        info.build = {
            "weights": weights,
            "dataset": split.data.kind,
            "images": split.counts,
            "patch_vectors": len(split.fit) * features.size**2,
            "finch_levels": clusters.counts,
            "onnx_parity_max_abs": calibration.parity,
            "stage_seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
            **({"test": calibration.test_metrics} if calibration.test_metrics else {}),
            **({"comparison": [dataclasses.asdict(f) for f in comparison]} if comparison else {}),
        }
        with clock("write"):
            files = write(net, info, prototypes, tmp, bundle, projection)
    with clock("tensorrt"):
        engine = engine_for_bundle(
            bundle.onnx,
            cfg.tensorrt,
            precision=cfg.precision,
            opt_batch=cfg.opt_batch,
            max_batch=cfg.max_batch,
            log=log,
        )
    return BuildReport(
        info=info,
        files=files,
        images=split.counts,
        vectors=len(split.fit) * features.size**2,
        features_cached=cached,
        finch_counts=clusters.counts,
        stage_seconds=clock.seconds,
        parity=calibration.parity,
        test_metrics=calibration.test_metrics,
        engine=engine,
        comparison=comparison,
    )
