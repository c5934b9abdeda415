"""Reduced precision that keeps the accuracy (issue 17): speed and AUROC of each backend x precision on one bundle.

For an existing bundle (build it once: ``protoad-export --category bottle --data-root ../shared/data/mvtec
--weights none --out /tmp/pe_bottle``, then ``protoad-export --from-onnx /tmp/pe_bottle/bottle.onnx --int8
--category bottle --data-root ../shared/data/mvtec``), every configuration runs the whole labelled test split at
batch 1 (its AUROC, its agreement with onnxruntime FP32 and the accuracy gate's verdict, and its ms/image), then
times batch 8 and one thread on ``--speed-images`` test images. The section goes to benchmarks/RESULTS.md.

    python benchmarks/bench_precision.py --model /tmp/pe_bottle/bottle.onnx --data-root ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench_common import DEFAULT_DATA, command_line, machine_text, update_results
from protoad_edge.backends import REGISTRY
from protoad_edge.bundle import Bundle
from protoad_edge.decision import image_scores
from protoad_edge.evaluation.accuracy_gate import judge
from protoad_edge.evaluation.evaluate import Metrics, compute_metrics, gate_figures, load_test_set
from protoad_edge.metrics import spearman
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backend import Backend, BackendOptions

# (label, backend, bundle file, precision); the first is the reference.
CONFIGS = (
    ("onnxruntime FP32", "ort", "onnx", None),
    ("OpenVINO FP32", "openvino", "onnx", None),
    ("OpenVINO BF16", "openvino", "onnx", "bf16"),
    ("onnxruntime INT8", "ort", "int8_onnx", None),
    ("OpenVINO INT8", "openvino", "int8_onnx", None),
)


@dataclass
class Row:
    label: str
    ran: str
    metrics: Metrics
    maps: np.ndarray
    ms: dict[str, float]  # "b1 t2" -> median ms/image


def timed(backend: Backend, crops: np.ndarray, batch: int) -> tuple[np.ndarray, float]:
    """Maps of ``crops`` at ``batch`` images a call, after a warm-up call, and the median ms per image."""
    backend.infer(to_batch(crops[:batch]))
    maps, seconds = [], []
    for start in range(0, len(crops) - batch + 1, batch):
        x = to_batch(crops[start : start + batch])
        t = time.perf_counter()
        maps.append(backend.infer(x)[0])
        seconds.append((time.perf_counter() - t) / batch)
    return np.concatenate(maps), 1000.0 * statistics.median(seconds)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the bundle's NAME.onnx (NAME.int8.onnx beside it)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2, help="threads of the AUROC pass (batch 1)")
    parser.add_argument("--speed-images", type=int, default=8, help="test images timed at batch 8 and at 1 thread")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv[1:])
    bundle = Bundle.of(args.model)
    info = bundle.info()
    test = load_test_set(args.category, args.data_root, "mvtec", info.preprocess)
    rows: list[Row] = []
    skipped: list[str] = []
    for label, name, kind, precision in CONFIGS:
        path = bundle.file(kind)
        if not path.is_file() or not REGISTRY[name].available():
            skipped.append(f"{label} (no {path.name})" if not path.is_file() else f"{label} ({name} not installed)")
            continue
        ms: dict[str, float] = {}
        options = BackendOptions(device="cpu", threads=args.threads, precision=precision)
        with REGISTRY[name].load()(path, options) as backend:
            if precision and backend.describe().precision != precision:
                skipped.append(f"{label} (this CPU runs {backend.describe().precision})")
                continue
            maps, ms[f"b1 t{args.threads}"] = timed(backend, test.crops, 1)
            _, ms[f"b8 t{args.threads}"] = timed(backend, test.crops[: max(8, args.speed_images)], 8)
            ran = backend.describe().line()
        with REGISTRY[name].load()(path, BackendOptions(device="cpu", threads=1, precision=precision)) as backend:
            _, ms["b1 t1"] = timed(backend, test.crops[: args.speed_images], 1)
        rows.append(Row(label, ran, compute_metrics(test, maps), maps, ms))
        print(f"{label}: {ran}, image AUROC {100 * rows[-1].metrics.image_auroc:.2f}, {ms}", file=sys.stderr)
    update = body(args, rows, skipped, test)
    if args.no_write:
        print(update)
    else:
        print(f"wrote {update_results('bench_precision', update)}")


def body(args: argparse.Namespace, rows: list[Row], skipped: list[str], test: object) -> str:
    ref = rows[0]
    keys = list(ref.ms)
    lines = [
        "## Reduced precision on bottle: speed and accuracy per backend x precision (issue 17)",
        "",
        f"`{command_line(sys.argv)}` on {machine_text()}.",
        f"Bundle {args.model} ({ref.ran}); all {len(ref.maps)} test images of {args.category}; AUROC at batch 1 "
        f"with {args.threads} threads; batch 8 and 1 thread timed on {args.speed_images} test images. Speed-up: "
        f"against onnxruntime FP32 at batch 1, {args.threads} threads. Gate: image/pixel AUROC within 0.5 pt of "
        "onnxruntime FP32 and Spearman >= 0.99 (reduced precisions only).",
        "",
        "| backend x precision | what ran | " + " | ".join(f"ms/image {k}" for k in keys)
        + " | speed-up | image AUROC | pixel AUROC | PRO | max abs map diff | Spearman | gate |",
        "| --- | --- | " + " | ".join("---:" for _ in keys) + " | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        reduced = row is not ref and ("FP32" not in row.label)
        rank = spearman(image_scores(ref.maps), image_scores(row.maps))
        verdict = judge(gate_figures(row.label, test, ref.metrics, row.metrics, rank)) if reduced else None
        m = row.metrics
        lines.append(
            f"| {row.label} | {row.ran} | " + " | ".join(f"{row.ms[k]:.0f}" for k in keys)
            + f" | {ref.ms[keys[0]] / row.ms[keys[0]]:.2f}x | {100 * m.image_auroc:.2f} | {_pct(m.pixel_auroc)} | "
            f"{_pct(m.pro)} | {np.abs(row.maps.astype(np.float64) - ref.maps).max():.1e} | {rank:.4f} | "
            + ("-" if verdict is None else "pass" if verdict.passed else "FAIL: " + "; ".join(verdict.failures)) + " |")
    if skipped:
        lines += ["", "Not measured: " + ", ".join(skipped) + "."]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


if __name__ == "__main__":
    main(sys.argv)
