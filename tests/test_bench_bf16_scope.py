"""benchmarks/bench_bf16_scope.py: each variant keeps the part it names in FP32 or lowers it - on a real exported
graph, read back from the compiled model - and the closest normal/anomalous pairs are found."""

from __future__ import annotations

from pathlib import Path

import bench_bf16_scope as bench
import numpy as np
import pytest

pytest.importorskip("openvino")


def test_every_variant_names_its_part_and_runs_it_in_fp32(tiny_model: Path) -> None:
    import openvino as ov

    from protoad_edge.runtime.backends.openvino_precision import input_scaling, read_back, scope_names

    model = ov.Core().read_model(str(tiny_model))
    scope, head = scope_names(model), input_scaling(model)
    parts = {label: bench.named_nodes(model, pattern) for label, pattern, _ in bench.VARIANTS}
    keeps = {label: keep for label, _, keep in bench.VARIANTS}
    assert parts["openvino:bf16"] == set()
    for (
        label,
        nodes,
    ) in parts.items():  # what a variant keeps lies outside openvino:bf16's FP32 nodes; what it lowers in
        assert label == "openvino:bf16" or (nodes and not nodes & scope and bool(nodes & head) != keeps[label]), label
    assert parts["- input scaling (lowered right after the input)"] == head
    assert parts["+ layer3's last block"] < parts["+ layer3's last two blocks"] < parts["+ all of layer3"]
    assert all("layer" not in n for n in parts["+ stem"])
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return  # the benchmark itself needs BF16 units: what is left is the naming, checked above
    stem = next(pattern for label, pattern, _ in bench.VARIANTS if label == "+ stem")
    read = read_back(bench.compiled(tiny_model, stem, threads=1), scope | head | parts["+ stem"])
    assert read.scope_not_fp32 == () and read.scope_nodes > 0
    lowered = next(pattern for label, pattern, keep in bench.VARIANTS if not keep)
    read = read_back(bench.compiled(tiny_model, lowered, threads=1, keep=False), head)
    assert read.scope_not_fp32 and read.scope_nodes == len(read.scope_not_fp32)  # the input scaling ran in BF16


def test_a_pattern_that_names_nothing_stops_the_benchmark(tiny_model: Path) -> None:
    import openvino as ov

    with pytest.raises(SystemExit, match="names no node"):
        bench.named_nodes(ov.Core().read_model(str(tiny_model)), r"/layer9/")


def test_the_closest_normal_anomalous_pairs() -> None:
    scores = np.array([0.10, 0.30, 0.31, 0.50, 0.29])
    labels = np.array([False, False, True, True, True])
    assert bench.closest_pairs(scores, labels) == pytest.approx([0.01, 0.01, 0.19])
