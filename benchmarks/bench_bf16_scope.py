"""Where openvino:bf16's error comes from (issue 29): the mixed model with more, or less, of it kept in FP32.

``openvino:bf16`` keeps the input's scaling and every node from the L2 normalisation's input to the score in FP32
and runs the backbone in BF16. This asks whether one part carries the error - the input scaling (lowered right after
the input, as openvino:bf16 did before 2026-12-06), the stem, the last blocks of layer3, the feature resize and
concat - by moving that part in or out of FP32 and measuring, on the bundle's labelled test split, the gate's
figures against onnxruntime FP32 and the speed (batch 1, every model in turn, medians). Each variant's FP32 nodes
are read back from the compiled model: a variant whose FP32 nodes did not run in FP32 is an error, not a row.

    python benchmarks/bench_bf16_scope.py --model /tmp/demo256/demo.onnx --category demo --data-root data
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import DEFAULT_DATA, command_line, machine_text, median_ms, network_key, update_results

from protoad_edge.decision import image_scores
from protoad_edge.evaluation.accuracy_gate import judge
from protoad_edge.evaluation.evaluate import compute_metrics, gate_figures, load_test_set
from protoad_edge.metadata import ModelInfo
from protoad_edge.metrics import spearman
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.openvino_precision import kept_fp32, lower_outside, read_back

# (label, regular expression over OpenVINO's friendly node names, whether those join openvino:bf16's FP32 nodes or
# leave them; None: openvino:bf16 as it is)
VARIANTS = (
    ("openvino:bf16", None, True),
    ("- input scaling (lowered right after the input)", r"^/features/(Mul|Add)$", False),
    ("+ feature resize and concat", r"^/features/(Resize|Concat|Shape|Slice)", True),
    ("+ stem", r"/backbone/(conv1|bn1|relu|maxpool)/", True),
    ("+ layer3's last block", r"/layer3\.5/", True),
    ("+ layer3's last two blocks", r"/layer3\.[45]/", True),
    ("+ all of layer3", r"/layer3/", True),
)


def named_nodes(model: Any, pattern: str | None) -> set[str]:
    """The computing nodes ``pattern`` names (none for None); a pattern naming none is an error, not a row equal to
    the scope alone."""
    if pattern is None:
        return set()
    named = re.compile(pattern)
    nodes = {
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() not in ("Constant", "Parameter", "Result") and named.search(op.get_friendly_name())
    }
    if not nodes:
        sys.exit(f"{pattern!r} names no node of the graph: the backbone's node names changed")
    return nodes


def compiled(path: Path, pattern: str | None, threads: int, keep: bool = True) -> Any:
    """openvino:bf16 with the nodes ``pattern`` names kept in FP32 too (``keep``) or lowered, read back to prove that
    the FP32 nodes ran FP32."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    fp32 = kept_fp32(model)
    scope = fp32 | named_nodes(model, pattern) if keep else fp32 - named_nodes(model, pattern)
    lower_outside(model, "bf16", scope)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    result = core.compile_model(model, "CPU", config)
    read = read_back(result, scope)
    if read.scope_not_fp32:
        sys.exit(f"{pattern}: {len(read.scope_not_fp32)} node(s) kept in FP32 ran in BF16")
    return result


def timed(calls: dict[str, Any], image: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each model, in turns with the order rotated each round; each turn starts with one
    untimed call, as in bench_peers: the first call after another model ran pays for the switch (cold caches, the
    other runtime's threads), which a line running one model does not."""
    labels, out = list(calls), {label: [] for label in calls}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            calls[label](image)
            start = time.perf_counter()
            calls[label](image)
            out[label].append(time.perf_counter() - start)
    return out


def closest_pairs(scores: np.ndarray, labels: np.ndarray, count: int = 3) -> np.ndarray:
    """The ``count`` smallest score gaps between a normal and an anomalous image: what decides a gate on few images."""
    gaps = np.abs(scores[~labels][:, None] - scores[labels][None, :]).ravel()
    return np.sort(gaps)[:count]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the bundle's NAME.onnx")
    parser.add_argument("--category", required=True)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="rounds; each times one call of every model")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv[1:])
    import onnxruntime as ort

    info = ModelInfo.load_json(args.model.with_suffix(".json"))
    test = load_test_set(args.category, args.data_root, args.dataset, info.preprocess)
    images = [to_batch(test.crops[i : i + 1]) for i in range(len(test.crops))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    calls: dict[str, Any] = {"onnxruntime FP32": lambda x: session.run(["anomaly_map"], {name: x})[0]}
    for label, pattern, keep in VARIANTS:
        model = compiled(args.model, pattern, args.threads, keep)
        request, output = model.create_infer_request(), model.output("anomaly_map")
        calls[label] = lambda x, r=request, o=output: np.array(r.infer({0: x})[o])
    maps = {label: np.concatenate([call(x) for x in images])[:, 0] for label, call in calls.items()}
    ms = timed(calls, images[0], args.rounds)
    network = f"D {info.projection['dims']}" if info.projection else f"paper network, K {info.num_prototypes:,}"
    reference = compute_metrics(test, maps["onnxruntime FP32"])
    base = median_ms(ms["onnxruntime FP32"])
    rows = [
        "| FP32 nodes | image / pixel AUROC | Spearman | max abs score error | gate | ms/image b1 | "
        "vs onnxruntime FP32 |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
        f"| onnxruntime FP32 (reference) | {100 * reference.image_auroc:.2f} / {100 * reference.pixel_auroc:.2f} "
        f"| - | - | - | {base:.0f} | 1.00x |",
    ]
    ref_scores = image_scores(maps["onnxruntime FP32"])
    for label, _, _ in VARIANTS:
        metrics, scores = compute_metrics(test, maps[label]), image_scores(maps[label])
        verdict = judge(gate_figures(label, test, reference, metrics, spearman(ref_scores, scores)))
        rows.append(
            f"| {label} | {100 * metrics.image_auroc:.2f} / {100 * metrics.pixel_auroc:.2f} "
            f"| {verdict.figures.spearman:.4f} | {np.abs(scores - ref_scores).max():.1e} "
            f"| {'passes' if verdict.passed else 'fails: ' + '; '.join(verdict.failures)} "
            f"| {median_ms(ms[label]):.0f} | {base / median_ms(ms[label]):.2f}x |"
        )
    section = "\n".join(
        [
            f"## Where openvino:bf16's error comes from: {args.category}, {network} (issue 29)",
            "",
            f"`{command_line(argv)}` on {machine_text()}; {len(test.labels)} labelled test images, "
            f"{args.threads} threads, batch 1, {args.rounds} rounds of every model in turn (rotating order, each turn "
            "one untimed call and one timed), medians.",
            "",
            *rows,
            "",
            f"The closest normal/anomalous pairs under FP32 (of {int((~test.labels).sum() * test.labels.sum())}): "
            f"score gaps {', '.join(f'{g:.1e}' for g in closest_pairs(ref_scores, test.labels))} - a variant whose "
            "max score error exceeds them can reorder them.",
        ]
    )
    print(section)
    if not args.no_write:
        print(f"wrote {update_results(f'bench_bf16_scope_{args.category}_{network_key(info)}', section)}")


if __name__ == "__main__":
    main(sys.argv)
