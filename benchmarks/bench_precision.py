"""Reduced precision that keeps the accuracy (issue 17): speed and AUROC of each backend x precision on one bundle.

For existing bundles (build each once: ``protoad-export --category bottle --data-root ../shared/data/mvtec
--weights none --out /tmp/pe_bottle``, then ``protoad-export --from-onnx /tmp/pe_bottle/bottle.onnx --int8
--category bottle --data-root ../shared/data/mvtec``), every configuration runs the whole labelled test split at
batch 1 (its AUROC, its agreement with onnxruntime FP32 and the accuracy gate's verdict, and its ms/image), then
times batch 8 and one thread on ``--speed-images`` test images. One table per ``--model`` (e.g. two prototype
counts); the section goes to benchmarks/RESULTS.md.

    python benchmarks/bench_precision.py --model /tmp/pe_bottle/bottle.onnx --data-root ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_common import DEFAULT_DATA, command_line, machine_text, update_results

from protoad_edge.bundle import Bundle
from protoad_edge.decision import image_scores
from protoad_edge.evaluation.accuracy_gate import judge
from protoad_edge.evaluation.evaluate import LabelledSplit, Metrics, compute_metrics, gate_figures, load_test_set
from protoad_edge.metrics import spearman
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import Backend, BackendOptions
from protoad_edge.runtime.backends.registry import REGISTRY

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


def measure(model: Path, args: argparse.Namespace) -> tuple[list[Row], list[str], LabelledSplit]:
    """Every configuration of ``CONFIGS`` that exists for the bundle ``model``, and those skipped (why)."""
    bundle = Bundle.of(model)
    test = load_test_set(args.category, args.data_root, "mvtec", bundle.info().preprocess)
    rows: list[Row] = []
    skipped: list[str] = []
    speed = test.crops[: max(8, args.speed_images)]
    for label, name, kind, precision in CONFIGS:
        path = bundle.file(kind)
        if not path.is_file() or not REGISTRY[name].available():
            skipped.append(f"{label} (no {path.name})" if not path.is_file() else f"{label} ({name} not installed)")
            continue
        ms: dict[str, float] = {}
        for threads in (args.threads, 1):
            with REGISTRY[name].load()(path, BackendOptions(device="cpu", threads=threads, precision=precision)) as b:
                ran = b.describe()
                if precision and ran.precision != precision:
                    break
                if threads == args.threads:
                    maps, ms[f"b1 t{threads}"] = timed(b, test.crops, 1)
                else:
                    _, ms[f"b1 t{threads}"] = timed(b, speed, 1)
                _, ms[f"b8 t{threads}"] = timed(b, speed, 8)
        if not ms:
            skipped.append(f"{label} (this CPU runs {ran.precision})")
            continue
        rows.append(Row(label, ran.line(), compute_metrics(test, maps), maps, ms))
        print(
            f"{model.name} {label}: {ran.line()}, image AUROC {100 * rows[-1].metrics.image_auroc:.2f}, {ms}",
            file=sys.stderr,
        )
    return rows, skipped, test


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="a bundle's NAME.onnx (NAME.int8.onnx beside it); repeatable, one table each",
    )
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2, help="threads of the AUROC pass (batch 1)")
    parser.add_argument("--speed-images", type=int, default=8, help="test images timed at batch 8 and at 1 thread")
    parser.add_argument("--note", type=Path, help="a file whose text goes after the tables: how the bundles were made")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv[1:])
    load = os.getloadavg()[0]
    tables = [table(model, args, *measure(model, args)) for model in args.model]
    note = args.note.read_text(encoding="utf-8") if args.note else ""
    update = "\n\n".join([header(args, load), *tables, note]).strip()
    if args.no_write:
        print(update)
    else:
        print(f"wrote {update_results('bench_precision', update)}")


def header(args: argparse.Namespace, load: float) -> str:
    return "\n".join(
        [
            "## Reduced precision on bottle: speed and accuracy per backend x precision (issue 17)",
            "",
            f"`{command_line(sys.argv)}` on {machine_text()}; load average {load:.1f} when it started, "
            f"{os.getloadavg()[0]:.1f} when it ended (a shared machine: read speeds as ratios within one table).",
            f"All test images of {args.category}; AUROC at batch 1 with {args.threads} threads; batch 8 and 1 thread "
            f"timed on {max(8, args.speed_images)} test images. Each cell: median ms/image (speed-up against "
            "onnxruntime "
            "FP32 in the same column). Gate: image/pixel AUROC within 0.5 pt of onnxruntime FP32 and Spearman >= 0.99 "
            "(reduced precisions only).",
        ]
    )


def table(model: Path, args: argparse.Namespace, rows: list[Row], skipped: list[str], test: LabelledSplit) -> str:
    """One bundle's rows: speed per batch x threads, accuracy, agreement with FP32 and the gate's verdict."""
    ref = rows[0]
    keys = list(ref.ms)
    info = Bundle.of(model).info()
    lines = [
        f"### {model}: K = {info.num_prototypes:,} prototypes; {_int8_text(info.build.get('int8'))}",
        "",
        "| backend x precision | what ran | "
        + " | ".join(f"ms/image {k}" for k in keys)
        + " | image AUROC | pixel AUROC | PRO | max abs map diff | Spearman | gate |",
        "| --- | --- | " + " | ".join("---:" for _ in keys) + " | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        reduced = row is not ref and ("FP32" not in row.label)
        rank = spearman(image_scores(ref.maps), image_scores(row.maps))
        verdict = judge(gate_figures(row.label, test, ref.metrics, row.metrics, rank)) if reduced else None
        m = row.metrics
        lines.append(
            f"| {row.label} | {row.ran} | "
            + " | ".join(f"{row.ms[k]:.0f} ({ref.ms[k] / row.ms[k]:.2f}x)" for k in keys)
            + f" | {100 * m.image_auroc:.2f} | {_pct(m.pixel_auroc)} | {_pct(m.pro)} | "
            f"{np.abs(row.maps.astype(np.float64) - ref.maps).max():.1e} | {rank:.4f} | "
            + ("-" if verdict is None else "pass" if verdict.passed else "FAIL: " + "; ".join(verdict.failures))
            + " |"
        )
    if skipped:
        lines += ["", "Not measured: " + ", ".join(skipped) + "."]
    return "\n".join(lines)


def _int8_text(record: dict | None) -> str:
    """What the sidecar says the INT8 model quantized."""
    if not record:
        return "no INT8 model"
    total = record["quantized"] + len(record["kept_fp32"])
    share = record.get("int8_share_of_backbone_macs")
    return (
        f"INT8 model: {record['quantized']} of {total} backbone convs"
        + ("" if share is None else f" ({100 * share:.0f} % of the backbone's multiply-adds)")
        + f", search error {record['search']['score_error']:.3f} of the FP32 spread "
        f"(tolerance {record['search']['tolerance']})"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


if __name__ == "__main__":
    main(sys.argv)
