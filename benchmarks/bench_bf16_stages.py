"""Where openvino:bf16's time goes, stage by stage (issue 29), and what its 2x goal asks of the backbone.

The mixed model runs the backbone in BF16 and keeps the input scaling and everything from the L2 normalisation's
input to the score in FP32. Its speed against onnxruntime FP32 is then bounded by the FP32 part (Amdahl): this
measures each stage's time from OpenVINO's own per-node counters (``PERF_COUNT``) for OpenVINO FP32,
``openvino:bf16`` and ``openvino:bf16-all``, beside onnxruntime FP32's wall time, every model in turn (rotating
order, one untimed call per turn, medians), and each stage's multiply-adds from the graph's shapes. From those it
states how much faster than in FP32 the backbone would have to run for the mixed model to reach 2x onnxruntime
FP32, against what this CPU's BF16 units give it.

    python benchmarks/bench_bf16_stages.py --model /tmp/w29/models/p256/bottle.onnx
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import command_line, machine_text, network_key, update_results

from protoad_edge.metadata import ModelInfo
from protoad_edge.runtime.backends import openvino_precision as precision

# Stages in graph order: (label, test on a node's first original layer name). The input scaling counts with the
# backbone (the pixels' way into it); "the rest" takes 1 - x, the upsampling, the blur and the image score.
STAGES = ("backbone", "feature resize and concat", "L2 norm (and projection)", "prototypes", "the rest")
FP32_STAGES = ("L2 norm (and projection)", "prototypes", "the rest")
MODES = ("fp32", "bf16", "bf16-all")
GOAL = 2.0  # issue 29: the projected bundle in mixed BF16 at least 2x its onnxruntime FP32 speed


def stage_of(name: str, head: set[str]) -> str:
    """The stage a node belongs to, by the name of the first original layer it was made from (OpenVINO keeps the
    graph's names there; the Converts it is given are named after their source)."""
    if name in head or name.startswith("/features/backbone/"):
        return "backbone"
    if name.startswith("/features/"):
        return "feature resize and concat"
    if name.startswith("/l2norm/") or name.startswith("l2norm."):
        return "L2 norm (and projection)"
    if name.startswith("/prototypes/") or name.startswith("prototypes."):
        return "prototypes"
    return "the rest"


def multiply_adds(model: Any, head: set[str]) -> dict[str, float]:
    """Multiply-adds per image of each stage's convolutions and matrix products, from the model's static shapes."""
    out: Counter = Counter()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in precision.COMPUTE_OPS:
            continue
        result = list(op.output(0).get_partial_shape().get_min_shape())
        result[0] = max(result[0], 1)  # the batch: per image
        if kind == "MatMul":
            a = op.input(0).get_partial_shape().get_min_shape()
            inner = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
        else:
            weights = list(op.input(1).get_partial_shape().get_min_shape())
            inner = math.prod(weights[1:]) if kind == "Convolution" else math.prod(weights[2:])
        out[stage_of(op.get_friendly_name(), head)] += math.prod(result) * inner
    return dict(out)


def needed_backbone_speedup(ort_ms: float, fp32_backbone_ms: float, mixed_rest_ms: float) -> float:
    """How many times faster than in FP32 the backbone must run for the mixed model to take ``ort_ms / GOAL``,
    given what the rest of the mixed model takes (infinite when the rest alone exceeds the target)."""
    room = ort_ms / GOAL - mixed_rest_ms
    return fp32_backbone_ms / room if room > 0 else math.inf


def compiled(path: Path, mode: str, threads: int) -> Any:
    """OpenVINO's model in ``mode`` (as the backend compiles it), with per-node counters on."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    hint, low = precision.mode(mode)
    if low:
        precision.lower_outside(model, low, precision.kept_fp32(model))
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(model, "CPU", {**config, "PERF_COUNT": True})


def stage_ms(request: Any, head: set[str]) -> dict[str, float]:
    """Milliseconds of each stage in ``request``'s last call, from OpenVINO's per-node counters."""
    out: dict[str, float] = defaultdict(float)
    for node in request.profiling_info:
        out[stage_of(node.node_name, head)] += node.real_time.total_seconds() * 1000
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the bundle's NAME.onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="rounds; each times one call of every model")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv[1:])
    import onnxruntime as ort
    import openvino as ov

    info = ModelInfo.load_json(args.model.with_suffix(".json"))
    image = np.random.default_rng(0).uniform(0, 255, (1, 3, info.crop, info.crop)).astype(np.float32)
    model = ov.Core().read_model(str(args.model))
    model.reshape({model.inputs[0]: list(image.shape)})
    head = precision.input_scaling(model)
    macs = multiply_adds(model, head)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    models = {mode: compiled(args.model, mode, args.threads) for mode in MODES}
    requests = {mode: m.create_infer_request() for mode, m in models.items()}
    calls: dict[str, Any] = {"ort": lambda: session.run(None, {session.get_inputs()[0].name: image})}
    calls.update({mode: (lambda r=r: r.infer({0: image})) for mode, r in requests.items()})
    wall: dict[str, list[float]] = {label: [] for label in calls}
    stages: dict[str, dict[str, list[float]]] = {mode: defaultdict(list) for mode in MODES}
    labels = list(calls)
    for r in range(args.rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            calls[label]()
            start = time.perf_counter()
            calls[label]()
            wall[label].append((time.perf_counter() - start) * 1000)
            if label in requests:
                for stage, ms in stage_ms(requests[label], head).items():
                    stages[label][stage].append(ms)
    ms = {label: statistics.median(v) for label, v in wall.items()}
    st = {mode: {s: statistics.median(stages[mode][s]) if stages[mode][s] else 0.0 for s in STAGES} for mode in MODES}
    compute = {mode: dict(precision.read_back(m, set()).compute) for mode, m in models.items()}
    total_macs = sum(macs.values())
    rows = [
        "| stage | multiply-adds | OpenVINO FP32 ms | openvino:bf16 ms | FP32 / bf16 | openvino:bf16-all ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in STAGES:
        share = f"{macs.get(s, 0) / 1e9:.2f} G ({100 * macs.get(s, 0) / total_macs:.0f} %)" if macs.get(s) else "-"
        ratio = f"{st['fp32'][s] / st['bf16'][s]:.2f}x" if st["bf16"][s] > 0 else "-"
        kept = " (FP32)" if s in FP32_STAGES else ""
        rows.append(
            f"| {s}{kept} | {share} | {st['fp32'][s]:.1f} | {st['bf16'][s]:.1f} | {ratio} | {st['bf16-all'][s]:.1f} |"
        )
    rows.append(
        f"| **wall, per call** | {total_macs / 1e9:.2f} G | {ms['fp32']:.0f} | {ms['bf16']:.0f} "
        f"| {ms['fp32'] / ms['bf16']:.2f}x | {ms['bf16-all']:.0f} |"
    )
    rest = sum(st["bf16"][s] for s in STAGES if s != "backbone")
    needed = needed_backbone_speedup(ms["ort"], st["fp32"]["backbone"], rest)
    gain = st["fp32"]["backbone"] / st["bf16"]["backbone"]
    network = f"D {info.projection['dims']}" if info.projection else "paper network"
    section = "\n".join(
        [
            f"## Where openvino:bf16's time goes: {info.category}, {network}, K {info.num_prototypes:,} (issue 29)",
            "",
            f"`{command_line(argv)}` on {machine_text()}; batch 1, {args.threads} threads, {args.rounds} rounds of "
            "every model in turn (rotating order, one untimed call per turn), medians; stage times from OpenVINO's "
            "per-node counters, multiply-adds from the graph's shapes.",
            "",
            *rows,
            "",
            f"onnxruntime FP32: {ms['ort']:.0f} ms, so openvino:bf16 runs at {ms['ort'] / ms['bf16']:.2f}x it "
            f"(goal {GOAL:g}x: {ms['ort'] / GOAL:.0f} ms). Its stages besides the backbone take {rest:.0f} ms, so "
            f"the backbone would have to run in {max(ms['ort'] / GOAL - rest, 0):.0f} ms, "
            + (
                f"{needed:.1f}x its FP32 time ({st['fp32']['backbone']:.0f} ms)"
                if math.isfinite(needed)
                else "less than nothing"
            )
            + f"; this CPU's BF16 units run it {gain:.2f}x faster ({st['bf16']['backbone']:.0f} ms). "
            f"Compute layers by the precision they ran: openvino:bf16 {compute['bf16']}, "
            f"openvino:bf16-all {compute['bf16-all']} (under the BF16 hint OpenVINO keeps some in FP32 itself).",
        ]
    )
    print(section)
    if not args.no_write:
        print(f"wrote {update_results(f'bench_bf16_stages_{info.category}_{network_key(info)}', section)}")


if __name__ == "__main__":
    main(sys.argv)
