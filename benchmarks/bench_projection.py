"""Accuracy and cost of the projection before the prototype stage (``protoad-export --project-dims``, issue 18).

    python benchmarks/bench_projection.py

For the built-in demo category (generated) and MVTec AD bottle (``../shared/data/mvtec``, where present),
with random backbone weights (``--weights none``, seed 0) and the build's own split (10% of the normal
training images held out, seed 0), it measures, on the labelled test split:

1. accuracy (image AUROC, pixel AUROC, PRO) of the paper's network and of the projected one for every D
   in ``--dims``, centred and not, with the projection fitted on a sample of the training patch vectors
   (what the build does) or on the prototypes, at K near 1,000 and 7,000 prototypes (FINCH levels);
2. whether FINCH should cluster in the projected space (for ``--chosen`` D, fitted on a patch sample,
   which is the only fit available before clustering);
3. ms per image through onnxruntime (whole exported graphs, batch 1, in turns) and the prototype
   stage's FLOPs per image (with the projection);
4. the FP16 graph (``export.fp16.convert_to_mixed_fp16``) of the chosen D: its maps against FP32 and
   its accuracy.

Features are extracted once per category through the build's feature cache (``$PROTOAD_CACHE``; a
build of the same category and weights reuses them, and so does a rerun), FINCH runs once (its levels
give the two K: the coarsest level with at least 0.9 K clusters, sampled down to K where it has more
than 1.1 K), and each projection is evaluated at patch level in torch, then upsampled and blurred as
the network does. The onnxruntime maps of the timed images are checked against that computation.
Prints its figures and updates its section of RESULTS.md (``--no-results``: do not).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from bench_common import DEFAULT_DATA, RESULTS, command_line, interleaved, machine_text, median_ms, update_results

from protoad_edge.builder.config import BuildConfig
from protoad_edge.builder.datasets import load_masks
from protoad_edge.builder.feature_cache import cached_features, default_cache_dir, features_key
from protoad_edge.builder.features import PatchFeatures, build_backbone
from protoad_edge.builder.finch import FinchResult, finch, first_neighbours
from protoad_edge.builder.neighbours import EXACT_UP_TO, approximate_first_neighbours
from protoad_edge.builder.network import GaussianBlur, ProtoADNet
from protoad_edge.builder.pipeline import Split, cluster, extract, extract_vectors, load_split
from protoad_edge.builder.projection import FIT_ROWS, FittedProjection, fit_projection, sample_rows, stage_flops
from protoad_edge.constants import BACKBONE, FEATURE_CHANNELS
from protoad_edge.export.fp16 import convert_to_mixed_fp16
from protoad_edge.export.onnx import export_onnx
from protoad_edge.metadata import ModelInfo
from protoad_edge.metrics import auroc, pro_area, pro_curve
from protoad_edge.preprocess import Preprocess, to_batch
from protoad_edge.runtime.backends.base import run_maps
from protoad_edge.runtime.backends.ort import OrtBackend

SECTION = "bench_projection"
CROP = 224
ROW_CHUNK = 4096
NO_PROJECTION = "paper (1792)"


@dataclass
class Category:
    """One category's data as the build sees it: features of the training and test crops, labels, masks."""

    name: str
    source: str
    split: Split
    train: np.ndarray  # FP16 memmap [N*h*w, 1792], the build's cached training features
    test: torch.Tensor  # float32 [T*h*w, 1792]
    labels: np.ndarray  # bool [T]
    masks: np.ndarray  # bool [T,S,S]
    size: int  # patch map side (56 at crop 224)
    sample: np.ndarray  # FP16 [FIT_ROWS, 1792]: the training patch vectors the build fits its projection on
    finch: FinchResult
    finch_seconds: float


def load_category(name: str, data_root: Path, features: PatchFeatures, weights: str, smallest_k: int, log) -> Category:
    """The build's split, features (through its cache) and FINCH levels down to fewer than 0.9 x ``smallest_k``."""
    cfg = BuildConfig(
        category=name, data_root=data_root, weights="none", progress=False, max_prototypes=int(0.9 * smallest_k)
    )
    pre = Preprocess(resize=cfg.resize, crop=cfg.crop)
    split = load_split(cfg, pre, log)
    device = torch.device("cpu")
    train, _ = extract(cfg, split, features, weights, device, log)
    key = features_key(
        dataset=split.data.kind,
        category=split.data.category,
        images=[s.path for s in split.data.test],
        weights=weights,
        resize=cfg.resize,
        crop=cfg.crop,
        feature_upsample=cfg.feature_upsample,
    )
    test, _ = cached_features(
        default_cache_dir(),
        key,
        (len(split.test_crops) * features.size**2, FEATURE_CHANNELS),
        lambda out: extract_vectors(features, split.test_crops, device, cfg.batch_size, False, out),
        log=log,
    )
    start = time.perf_counter()
    levels = cluster(cfg, train, device, log)
    seconds = time.perf_counter() - start
    labels = np.array([s.label for s in split.data.test], dtype=bool)
    return Category(
        name,
        f"{split.data.kind} {split.data.category} at {split.data.root}",
        split,
        train,
        torch.from_numpy(np.asarray(test, dtype=np.float32)),
        labels,
        load_masks(split.data.test, pre),
        features.size,
        sample_rows(train, seed=cfg.seed),
        levels,
        seconds,
    )


def level_prototypes(vectors: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """float32 [count, C]: the normalised means of the rows of ``vectors`` per label (as FINCH's prototypes)."""
    sums = torch.zeros(count, vectors.shape[1])
    index = torch.from_numpy(labels)
    for start in range(0, len(vectors), 65536):
        block = torch.from_numpy(np.asarray(vectors[start : start + 65536], dtype=np.float32))
        sums.index_add_(0, index[start : start + 65536], block)
    return F.normalize(sums, dim=1).numpy()


def prototypes_for(result: FinchResult, vectors: np.ndarray, target: int) -> tuple[np.ndarray, str]:
    """The prototypes of the FINCH level whose cluster count is nearest ``target`` (by ratio).

    Real levels rather than a sample of a finer one: sampling 1,000 of the demo's 2,064 prototypes
    left parts of the normal appearance uncovered (image AUROC 46 for the paper's network, against
    the level of 719's figures below), which says more about the sampling than about the projection.
    """
    level = int(np.argmin([abs(np.log(c / target)) for c in result.counts]))
    return level_prototypes(vectors, result.partitions[level], result.counts[level]), f"FINCH level {level}"


def max_cosine(rows: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[R] max over prototypes of the dot products (unit rows and prototypes: the cosine), in chunks."""
    out = torch.empty(len(rows))
    t = prototypes.t().contiguous()
    for start in range(0, len(rows), ROW_CHUNK):
        out[start : start + ROW_CHUNK] = torch.matmul(rows[start : start + ROW_CHUNK], t).amax(dim=1)
    return out


def project_rows(rows: torch.Tensor | np.ndarray, fit: FittedProjection) -> torch.Tensor:
    """[R, Dmax] rows (a tensor, or an FP16 memmap read in chunks) centred and projected, not normalised:
    the first D columns are the projection to D (the principal directions are nested)."""
    mean, matrix = torch.from_numpy(fit.mean), torch.from_numpy(fit.matrix)
    out = torch.empty(len(rows), fit.dims)
    for start in range(0, len(rows), 65536):
        block = rows[start : start + 65536]
        block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block, dtype=np.float32))
        out[start : start + 65536] = torch.matmul(block - mean, matrix.t())
    return out


class Maps:
    """Patch scores -> maps as the network computes them (bilinear to the crop, then the Gaussian blur)."""

    def __init__(self, images: int, size: int) -> None:
        self.images, self.size = images, size
        self.blur = GaussianBlur(4.0, CROP)

    @torch.inference_mode()
    def __call__(self, similarity: torch.Tensor) -> np.ndarray:
        patch = (1.0 - similarity).view(self.images, self.size, self.size, 1).permute(0, 3, 1, 2)
        out = np.empty((self.images, CROP, CROP), np.float32)
        for i in range(0, self.images, 16):
            amap = F.interpolate(patch[i : i + 16], size=(CROP, CROP), mode="bilinear", align_corners=False)
            out[i : i + 16] = self.blur(amap)[:, 0].numpy()
        return out


def figures(maps: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    fpr, pro, _ = pro_curve(masks, maps)
    return {
        "image_auroc": 100 * auroc(labels, maps.reshape(len(maps), -1).max(axis=1)),
        "pixel_auroc": 100 * auroc(masks, maps),
        "pro": 100 * pro_area(fpr, pro),
    }


@dataclass
class Settings:
    """Which projections to evaluate: D for each (fitted on, centred), and the D of the focused checks."""

    fits: dict[tuple[str, bool], list[int]]
    chosen: int


def space_name(d: int | None, centred: bool = True) -> str:
    return NO_PROJECTION if d is None else f"PCA {d}, {'centred' if centred else 'uncentred'}"


def variance_kept(rows: np.ndarray, fit: FittedProjection, d: int) -> float:
    """Share of the fitted ``rows``' (centred) sum of squares in the first ``d`` directions of ``fit``."""
    x = torch.from_numpy(np.asarray(rows, dtype=np.float32) - fit.mean)
    return float(torch.matmul(x, torch.from_numpy(fit.matrix[:d]).t()).square().sum() / x.square().sum())


def accuracy_rows(cat: Category, ks: list[int], settings: Settings, log) -> tuple[list[dict], dict, dict]:
    """Every (K, space, fit) setting's accuracy. Also returns, per K, the prototypes and the centred fit on
    them (for the timing step), and the maps of the chosen D (for the FP16 check)."""
    maps = Maps(len(cat.labels), cat.size)
    # The build's fit does not depend on K: one per centring.
    patch_fits = {
        centred: fit_projection(cat.sample, max(dims), centred=centred)
        for (fitted_on, centred), dims in settings.fits.items()
        if fitted_on == "patch vectors"
    }
    rows, kept, chosen_maps = [], {}, {}
    for target in ks:
        protos, how = prototypes_for(cat.finch, cat.train, target)
        k = len(protos)
        p = torch.from_numpy(protos)
        start = time.perf_counter()
        rows.append(
            {
                "k": k,
                "how": how,
                "space": NO_PROJECTION,
                "fit": "-",
                "dims": None,
                **figures(maps(max_cosine(cat.test, p)), cat.labels, cat.masks),
            }
        )
        log(f"{cat.name} K={k:,} {NO_PROJECTION}: {fmt(rows[-1])} ({time.perf_counter() - start:.0f} s)")
        for (fitted_on, centred), dims in settings.fits.items():
            fit = (
                patch_fits[centred]
                if fitted_on == "patch vectors"
                else fit_projection(protos, max(dims), centred=centred, fitted_on="prototypes")
            )
            if (fitted_on, centred) == ("patch vectors", True):
                kept[k] = (protos, how, fit)
            y, q = project_rows(cat.test, fit), project_rows(p, fit)
            for d in dims:
                start = time.perf_counter()
                m = maps(max_cosine(F.normalize(y[:, :d], dim=1), F.normalize(q[:, :d], dim=1)))
                rows.append(
                    {
                        "k": k,
                        "how": how,
                        "space": space_name(d, centred),
                        "fit": fitted_on,
                        "dims": d,
                        "kept": variance_kept(cat.sample if fitted_on == "patch vectors" else protos, fit, d),
                        **figures(m, cat.labels, cat.masks),
                    }
                )
                if (fitted_on, centred, d) == ("patch vectors", True, settings.chosen):
                    chosen_maps[k] = m
                log(
                    f"{cat.name} K={k:,} {rows[-1]['space']} fitted on {fitted_on}: {fmt(rows[-1])} "
                    f"({time.perf_counter() - start:.0f} s)"
                )
    return rows, kept, chosen_maps


def projected_finch_rows(cat: Category, ks: list[int], d: int, full: FittedProjection, log) -> list[dict]:
    """FINCH on the training vectors projected to ``d`` (centred, fitted on a patch sample: the only fit there
    is before clustering) against FINCH in 1792 dimensions, both compared in that projection. The prototypes
    are the clusters' normalised means in 1792 dimensions, projected the same way. FINCH's levels fall where
    the data puts them, so every level of either with 0.5 min(K) to 1.5 max(K) clusters is evaluated. ``full``:
    the build's fit (its first ``d`` directions are the projection)."""
    fit = FittedProjection(full.mean, full.matrix[:d], True, full.fitted_on, full.rows, 0.0)
    projected = F.normalize(project_rows(cat.train, fit), dim=1).numpy()
    approx = functools.partial(approximate_first_neighbours, dims=d // 2)

    def search(x: np.ndarray, *, progress: str | None = None, merged: np.ndarray | None = None):
        return (first_neighbours if len(x) <= EXACT_UP_TO else approx)(x, progress=progress)

    start = time.perf_counter()
    result = finch(projected, int(0.5 * min(ks)), search=search, log=lambda _: None)
    seconds = time.perf_counter() - start
    del projected
    log(
        f"{cat.name}: FINCH in the projected {d} dims: {' -> '.join(f'{c:,}' for c in result.counts)} ({seconds:.0f} "
        "s; "
        f"in 1792 dims: {' -> '.join(f'{c:,}' for c in cat.finch.counts)}, {cat.finch_seconds:.0f} s)"
    )
    maps = Maps(len(cat.labels), cat.size)
    y = F.normalize(project_rows(cat.test, fit), dim=1)
    rows = []
    for space, levels, secs in (("1792", cat.finch, cat.finch_seconds), (f"projected {d}", result, seconds)):
        for level, count in enumerate(levels.counts):
            if not 0.5 * min(ks) <= count <= 1.5 * max(ks):
                continue
            protos = level_prototypes(cat.train, levels.partitions[level], count)
            q = F.normalize(project_rows(torch.from_numpy(protos), fit), dim=1)
            rows.append(
                {
                    "k": count,
                    "level": level,
                    "finch": space,
                    "seconds": secs,
                    "counts": levels.counts,
                    **figures(maps(max_cosine(y, q)), cat.labels, cat.masks),
                }
            )
            log(
                f"{cat.name} FINCH in {space}, level {level} (K={count:,}), PCA {d} centred on patch vectors: "
                f"{fmt(rows[-1])}"
            )
    return rows


def export(net: ProtoADNet, k: int, path: Path) -> Path:
    info = ModelInfo(
        category="bench",
        resize=256,
        crop=CROP,
        backbone=BACKBONE,
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=k,
        image_threshold=0.0,
        pixel_threshold=0.0,
        seed=0,
    )
    return export_onnx(net, info, path)


def timing_rows(
    cat: Category, features: PatchFeatures, kept: dict, dims: list[int], images: int, rounds: int, tmp: Path, log
) -> tuple[list[dict], dict]:
    """ms per image through onnxruntime of the whole exported graphs (the paper's, and centred projections
    fitted on the prototypes: what the build exports), in turns, batch 1; and their maps against the torch
    computation of the accuracy table (same prototypes and fits)."""
    batch = to_batch(cat.split.test_crops[:images])
    maps = Maps(images, cat.size)
    test_rows = cat.test[: images * cat.size**2]
    rows, graphs = [], {}
    for k, (protos, _, fit) in kept.items():
        p = torch.from_numpy(protos)
        backends, diffs = {}, {}
        for d in [None, *dims]:
            if d is None:
                net, sim = ProtoADNet(features, p, CROP), max_cosine(test_rows, p)
            else:
                sub = FittedProjection(fit.mean, fit.matrix[:d], True, fit.fitted_on, fit.rows, 0.0)
                net = ProtoADNet(features, p, CROP, projection=sub.module())
                y, q = project_rows(test_rows, fit), project_rows(p, fit)
                sim = max_cosine(F.normalize(y[:, :d], dim=1), F.normalize(q[:, :d], dim=1))
            graphs[(k, d)] = export(net.eval(), k, tmp / f"{cat.name}_{k}_{d or 0}.onnx")
            backends[d] = OrtBackend(graphs[(k, d)], providers=["CPUExecutionProvider"])
            diffs[d] = float(np.abs(backends[d].infer(batch)[0] - maps(sim)).max())
        seconds = interleaved({d: functools.partial(infer_each, b, batch) for d, b in backends.items()}, rounds)
        for d in backends:
            rows.append(
                {
                    "k": k,
                    "dims": d,
                    "ms": median_ms(seconds[d]) / images,
                    "gflop": stage_flops(cat.size**2, k, d) / 1e9,
                    "diff": diffs[d],
                }
            )
            log(
                f"{cat.name} K={k:,} {space_name(d)}: {rows[-1]['ms']:.0f} ms/image, {rows[-1]['gflop']:.1f} GFLOP, "
                f"max |ORT map - torch computation| {diffs[d]:.1e}"
            )
    return rows, graphs


def infer_each(backend: OrtBackend, batch: np.ndarray) -> None:
    """Every image of ``batch`` on its own (batch 1, as on a line)."""
    for i in range(len(batch)):
        backend.infer(batch[i : i + 1])


def fp16_row(cat: Category, graphs: dict, chosen_maps: dict, k: int, d: int, tmp: Path, log) -> dict:
    """The FP16 graph of the chosen D at the largest K on the whole test split: its maps against the FP32
    computation (whose exported graph equals it within the timing table's difference), and its accuracy."""
    path16 = tmp / f"{graphs[(k, d)].stem}.fp16.onnx"
    onnx.save(convert_to_mixed_fp16(onnx.load(str(graphs[(k, d)]))), str(path16))
    start = time.perf_counter()
    maps16 = run_maps(OrtBackend(path16, providers=["CPUExecutionProvider"]), cat.split.test_crops, 8)
    row = {
        "k": k,
        "dims": d,
        "diff": float(np.abs(maps16 - chosen_maps[k]).max()),
        "fp32": figures(chosen_maps[k], cat.labels, cat.masks),
        "fp16": figures(maps16, cat.labels, cat.masks),
    }
    log(
        f"{cat.name} K={k:,} PCA {d} FP16 graph: max |FP16 - FP32 map| {row['diff']:.1e}; FP16 {fmt(row['fp16'])} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return row


def fmt(r: dict) -> str:
    return f"image AUROC {r['image_auroc']:.2f}, pixel AUROC {r['pixel_auroc']:.2f}, PRO {r['pro']:.2f}"


def section(
    cat: Category,
    acc: list[dict],
    fin: list[dict],
    timing: list[dict],
    fp16: dict,
    settings: Settings,
    command: str,
    minutes: float,
) -> str:
    t = {(r["k"], r["dims"]): r for r in timing}
    paper = {r["k"]: r for r in acc if r["dims"] is None}
    hw = cat.size**2
    lines = [
        f"### {cat.name} ({cat.source})",
        "",
        f"Command: `{command}` ({minutes:.0f} minutes)",
        "",
        f"{len(cat.split.fit)} training images ({len(cat.train):,} patch vectors), {len(cat.split.val)} held out, "
        f"{len(cat.labels)} test images ({int(cat.labels.sum())} anomalous). FINCH in 1792 dims: "
        f"{' -> '.join(f'{c:,}' for c in cat.finch.counts)} clusters ({cat.finch_seconds:.0f} s). "
        "K per row: " + "; ".join(sorted({f"{r['k']:,} = {r['how']}" for r in acc})) + ".",
        "",
        "| K | feature space for the cosine | fitted on | variance kept | image AUROC | pixel AUROC | PRO | "
        "GFLOP / image | ms / image (ORT) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in acc:
        exported = r["fit"] in ("-", "patch vectors") and "uncentred" not in r["space"]  # the graphs timed
        timed = t.get((r["k"], r["dims"])) if exported else None
        base = paper[r["k"]]
        delta = lambda key, r=r, base=base: "" if r["dims"] is None else f" ({r[key] - base[key]:+.2f})"  # noqa: E731
        kept = "" if r["dims"] is None else f"{100 * r['kept']:.2f} %"
        ms = f"{timed['ms']:.0f}" if timed else ""
        lines.append(
            f"| {r['k']:,} | {r['space']} | {r['fit']} | {kept} | {r['image_auroc']:.2f}{delta('image_auroc')} | "
            f"{r['pixel_auroc']:.2f}{delta('pixel_auroc')} | {r['pro']:.2f}{delta('pro')} | "
            f"{stage_flops(hw, r['k'], r['dims']) / 1e9:.2f} | {ms} |"
        )
    d = settings.chosen
    projected = next(r for r in fin if r["finch"] != "1792")
    lines += [
        "",
        f"FINCH in the projected space against FINCH in 1792 dims, both compared in PCA {d} centred, fitted on "
        f"{len(cat.sample):,} training patch vectors (as the build; the only fit available before clustering); "
        "the prototypes are "
        "the clusters' normalised means in 1792 dims, projected the same way; every level of either with "
        f"0.5 x {min(r['k'] for r in acc):,} to 1.5 x {max(r['k'] for r in acc):,} clusters. FINCH in the projected "
        f"space (approximate first neighbours in {d // 2} of its {d} dims above {EXACT_UP_TO:,} rows): "
        f"{' -> '.join(f'{c:,}' for c in projected['counts'])} clusters ({projected['seconds']:.0f} s, after the "
        "projection).",
        "",
        "| FINCH in | level | K | image AUROC | pixel AUROC | PRO |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['finch']} | {r['level']} | {r['k']:,} | {r['image_auroc']:.2f} | {r['pixel_auroc']:.2f} | "
        f"{r['pro']:.2f} |"
        for r in sorted(fin, key=lambda r: (r["k"], r["finch"]))
    ]
    worst = max(r["diff"] for r in timing)
    lines += [
        "",
        f"ms / image: whole exported graphs (the paper's, and centred PCA fitted on patch vectors: what the "
        "build exports), batch 1, "
        f"in turns; their maps equal the torch computation of this table within {worst:.1e}.",
        "",
        f"FP16 graph (`convert_to_mixed_fp16`, run by onnxruntime on the CPU) of PCA {fp16['dims']} centred at "
        f"K = {fp16['k']:,}, all {len(cat.labels)} test images: max |FP16 - FP32 map| {fp16['diff']:.1e}; "
        f"FP32 {fmt(fp16['fp32'])}; FP16 {fmt(fp16['fp16'])}.",
    ]
    return "\n".join(lines)


def parse_dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", choices=("demo", "bottle"), default="demo")
    parser.add_argument(
        "--dims",
        default="64,128,256,512",
        help=f"D of centred projections fitted on {FIT_ROWS:,} training patch vectors (as the build)",
    )
    parser.add_argument("--uncentred-dims", default="64,128,256,512", help="D of uncentred ones (empty: none)")
    parser.add_argument(
        "--prototype-fit-dims",
        default="64,128,256,512",
        help="D of centred projections fitted on the prototypes instead (empty: none)",
    )
    parser.add_argument("--k", default="1000,7000", help="comma-separated target K (the nearest FINCH levels)")
    parser.add_argument("--chosen", type=int, default=256, help="D of the FINCH-space and FP16 checks")
    parser.add_argument("--images", type=int, default=1, help="test images timed through onnxruntime")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per image and graph")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="holds bottle/ (MVTec AD layout)")
    parser.add_argument(
        "--demo-root",
        type=Path,
        default=Path(tempfile.gettempdir()) / "protoad-bench-demo",
        help="where the demo category is generated (kept, so reruns hit the feature cache)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-results", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args()
    ks = parse_dims(args.k)
    settings = Settings(
        {
            ("patch vectors", True): parse_dims(args.dims),
            ("patch vectors", False): parse_dims(args.uncentred_dims),
            ("prototypes", True): parse_dims(args.prototype_fit_dims),
        },
        args.chosen,
    )
    settings.fits = {key: dims for key, dims in settings.fits.items() if dims}
    if args.chosen not in settings.fits.get(("patch vectors", True), []):
        raise SystemExit(f"--chosen {args.chosen} must be one of --dims")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

    log(f"machine: {machine_text()}")
    root = args.demo_root if args.category == "demo" else args.data_root
    if args.category != "demo" and not (root / args.category).is_dir():
        raise SystemExit(f"{args.category} not found in {root} (see ../shared/data/README.md)")
    backbone, weights = build_backbone("none", 0)
    features = PatchFeatures(backbone, CROP, "bilinear").eval()
    with tempfile.TemporaryDirectory(prefix="bench_projection.") as tmp:
        cat = load_category(args.category, root, features, weights, min(ks), log)
        acc, kept, chosen_maps = accuracy_rows(cat, ks, settings, log)
        fin = projected_finch_rows(cat, ks, args.chosen, next(iter(kept.values()))[2], log)
        timing, graphs = timing_rows(
            cat, features, kept, settings.fits[("patch vectors", True)], args.images, args.rounds, Path(tmp), log
        )
        fp16 = fp16_row(cat, graphs, chosen_maps, max(kept), args.chosen, Path(tmp), log)
    text = section(cat, acc, fin, timing, fp16, settings, command_line(sys.argv), (time.perf_counter() - began) / 60)
    body = f"""## Projection before the prototype stage (`--project-dims`, issue 18): {args.category}

Measured {datetime.date.today().isoformat()} on a **2-core shared VM** ({machine_text()}). Backbone weights:
none (seeded random, seed 0): accuracy with ImageNet features cannot be measured here. GFLOP / image: the
prototype stage, 2 x h*w x 1792 x K, or with a projection 2 x h*w x D x (1792 + K) (the projection itself
included); the backbone, the same for every row, is not. ms / image: the whole exported graph through
onnxruntime (CPU, batch 1, graphs in turns, medians; the machine is shared: compare within a table).
Changes against the paper's network at the same K in brackets. Variance kept: the share of the fitted
rows' (centred) sum of squares in the D directions.

{text}
"""
    print("\n" + body)
    if not args.no_results:
        update_results(f"{SECTION}_{args.category}", body)
        log(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
