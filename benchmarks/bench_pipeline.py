"""The exported graph through onnxruntime against the authors' evaluation pipeline, side by side in one run.

    python benchmarks/bench_pipeline.py --k 3680 --k 1000 --threads 2 --threads 1

Same backbone weights (``--weights none``, seed 0), same prototypes, same crops, batch 1, the
same number of CPU threads for both (each thread count in turn):

(a) ours: the exported ONNX (normalisation, backbone, L2 norm, prototypes, upsample, blur and
    score in one graph) through onnxruntime, from the preprocessed crop to map and score;
(b) the authors' style: eager PyTorch wide_resnet50_2 (the full model, features taken by
    forward hooks) under ``inference_mode``, L2 norm and cosine similarity as a torch 1x1
    convolution and channel max, then per image on the host ``cv2.resize`` and
    ``scipy.ndimage.gaussian_filter(sigma=4)``.

The two run in turns, image by image, and the figures are medians. The maps must agree to
1e-4 (max abs difference). Prints the figures and updates its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from bench_common import (
    DEFAULT_DATA,
    RESULTS,
    command_line,
    crops,
    export_model,
    frames,
    interleaved,
    machine_text,
    median_ms,
    sample_prototypes,
    update_results,
)
from reference import ReferencePipeline
from scipy.ndimage import gaussian_filter

from protoad_edge.builder.features import PatchFeatures, build_backbone
from protoad_edge.builder.network import ProtoADNet
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.ort import OrtBackend

TOLERANCE = 1e-4
TARGET = 1.5  # (a) must be at least this much faster than (b), end to end
SECTION = "bench_pipeline"


class AuthorsPipeline:
    """The authors' evaluation loop at its best on a CPU: eager torch for the network, host post-processing."""

    def __init__(self, backbone: torch.nn.Module, prototypes: np.ndarray, sigma: float = 4.0) -> None:
        self.reference = ReferencePipeline(backbone, prototypes, "bilinear", sigma)  # full model + hooks
        self.kernels = torch.from_numpy(prototypes)[:, :, None, None].contiguous()
        self.sigma = sigma

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = self.reference.embedding(crops)  # normalised [N,1792,56,56]
        patch = (1.0 - F.conv2d(emb, self.kernels).amax(dim=1)).numpy()
        size = crops.shape[1]
        maps = np.stack([gaussian_filter(cv2.resize(p, (size, size)), sigma=self.sigma) for p in patch])
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def compare(ours: OrtBackend, authors: AuthorsPipeline, test: np.ndarray, rounds: int) -> dict:
    """Agreement on every image, then both pipelines in turns on each image; medians."""
    worst_map = worst_score = 0.0
    times: dict[str, list[float]] = {"ours": [], "authors": []}
    for i in range(len(test)):
        crop = test[i : i + 1]
        a_maps, a_scores = ours.infer(to_batch(crop))
        b_maps, b_scores = authors(crop)
        worst_map = max(worst_map, float(np.abs(a_maps - b_maps).max()))
        worst_score = max(worst_score, float(np.abs(a_scores - b_scores).max()))
        t = interleaved(
            {"ours": lambda crop=crop: ours.infer(to_batch(crop)), "authors": lambda crop=crop: authors(crop)},
            rounds=rounds,
            warmup=1 if i == 0 else 0,
        )
        for name in times:
            times[name] += t[name]
    a, b = median_ms(times["ours"]), median_ms(times["authors"])
    pairs = [tb / ta for ta, tb in zip(times["ours"], times["authors"])]
    return {
        "ours_ms": a,
        "authors_ms": b,
        "speedup": b / a,
        "speedup_pairs": statistics.median(pairs),
        "max_map_diff": worst_map,
        "max_score_diff": worst_score,
        "runs": len(times["ours"]),
        "provider": ours.providers[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--k", type=int, action="append", help="number of prototypes (repeatable; default 3680 and 1000)"
    )
    parser.add_argument("--images", type=int, default=4, help="test images (each timed --rounds times per pipeline)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, action="append", help="CPU threads for both pipelines (repeatable; default 2, then 1)"
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-results", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args()
    ks = args.k or [3680, 1000]
    thread_counts = args.threads or [2, 1]

    backbone, weights = build_backbone("none", seed=0)
    features = PatchFeatures(backbone, 224, "bilinear")
    train_frames, train_src = frames("train", -(-max(ks) // 3136) + 1, args.data_root)
    test_frames, test_src = frames("test", args.images, args.data_root)
    train, test = crops(train_frames), crops(test_frames)
    print(f"machine: {machine_text()}")
    print(f"images: {len(test)} test crops 224x224 from {test_src}; prototypes sampled from {train_src}")
    print(f"backbone weights: {weights}; batch 1; {args.rounds} rounds per image\n")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline.") as tmp:
        for k in ks:
            prototypes = sample_prototypes(features, train, k)
            net = ProtoADNet(features, torch.from_numpy(prototypes), crop=test.shape[1]).eval()
            path = export_model(net, k, Path(tmp), f"bench_k{k}")
            authors = AuthorsPipeline(backbone, prototypes)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                ours = OrtBackend(path, BackendOptions(threads=threads), providers=["CPUExecutionProvider"])
                r = {"k": k, "threads": threads, **compare(ours, authors, test, args.rounds)}
                rows.append(r)
                verdict = "ok" if r["max_map_diff"] <= TOLERANCE else "DISAGREE"
                print(
                    f"K={k:>5}, {threads} thread(s): (a) ONNX/onnxruntime {r['ours_ms']:7.1f} ms   "
                    f"(b) authors' pipeline {r['authors_ms']:7.1f} ms   (a) is {r['speedup']:.2f}x faster "
                    f"(median of per-run pairs {r['speedup_pairs']:.2f}x; target {TARGET}x)   "
                    f"max |map diff| {r['max_map_diff']:.1e}, |score diff| {r['max_score_diff']:.1e} ({verdict})"
                )

    table = [
        "| K | threads (each) | (a) ONNX via onnxruntime, ms | (b) authors' pipeline, ms | speed-up (a) vs (b) | max "
        "abs map diff | runs each |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table.append(
            f"| {r['k']:,} | {r['threads']} | {r['ours_ms']:.0f} | {r['authors_ms']:.0f} | {r['speedup']:.2f}x "
            f"(pairs {r['speedup_pairs']:.2f}x) | {r['max_map_diff']:.1e} | {r['runs']} |"
        )
    verdicts = [
        f"- K = {r['k']:,}, {r['threads']} thread(s): {r['speedup']:.2f}x, target "
        f"{'met' if r['speedup'] >= TARGET else 'NOT met'}; maps agree to {r['max_map_diff']:.1e}"
        for r in rows
    ]
    body = f"""## Pipeline: exported graph vs the authors' pipeline (CPU, batch 1)

Measured {datetime.date.today().isoformat()} on a **2-core shared VM** ({machine_text()}), while other jobs
shared the CPU: absolute times are indicative only; the two pipelines ran in turns (a, b, b, a, ...) on
the same images, and the figures are medians, so the ratio is the meaningful figure.

Command: `{command_line(sys.argv)}`

- (a) the exported ONNX graph (everything from the raw crop to map and score) through onnxruntime
  ({rows[0]["provider"]}, graph optimisation ALL, intra-op threads as in the table).
- (b) the authors' style: eager PyTorch wide_resnet50_2 (full model, features by forward hooks) under
  `inference_mode` with `torch.set_num_threads` as in the table, cosine similarity as a torch 1x1 conv +
  channel max, then per image `cv2.resize` + `scipy.ndimage.gaussian_filter(sigma=4)` on the host.
- Same weights (`--weights none`, seed 0), same prototypes (real normalised patch vectors), same
  {len(test)} crops ({test_src}), {args.rounds} timed runs per image and pipeline, batch 1.

{chr(10).join(table)}

Target: (a) at least {TARGET}x faster than (b) end to end; maps must agree to {TOLERANCE:g}.
{chr(10).join(verdicts)}

Reading the figures: with 2 threads each on this shared VM, eager PyTorch suffers more from the other
jobs than onnxruntime (its OpenMP threads wait for each other whenever one is descheduled), which
inflates the 2-thread ratio; the 1-thread rows are the contention-robust comparison. Both pipelines
spend most of their time in the same 2 x 3136 x 1792 x K FLOP prototype product (41 GFLOP at K = 3,680),
which both run close to the CPU's FMA peak (see the cost split section), so on a CPU the exported graph
gains on everything else: the backbone without layer4 and without eager overhead, the post-processing
inside the graph, no host round trips. The gain therefore grows as K shrinks.
"""
    if not args.no_results:
        update_results(SECTION, body)
        print(f"\nupdated {RESULTS}")
    if any(r["max_map_diff"] > TOLERANCE for r in rows):
        raise SystemExit(f"maps disagree by more than {TOLERANCE:g}")


if __name__ == "__main__":
    main()
