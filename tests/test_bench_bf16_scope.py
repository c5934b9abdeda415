"""benchmarks/bench_bf16_scope.py: each variant widens the FP32 scope over the part it names - on a real exported
graph, read back from the compiled model - and the closest normal/anomalous pairs are found."""

from __future__ import annotations

from pathlib import Path

import bench_bf16_scope as bench
import numpy as np
import pytest

pytest.importorskip("openvino")


def test_every_variant_names_its_part_and_runs_it_in_fp32(tiny_model: Path) -> None:
    import openvino as ov

    from protoad_edge.runtime.backends.openvino_precision import read_back, scope_names

    model = ov.Core().read_model(str(tiny_model))
    scope = scope_names(model)
    parts = {label: bench.named_nodes(model, pattern) for label, pattern in bench.VARIANTS}
    assert parts["openvino:bf16 (the scope alone)"] == set()
    for label, nodes in parts.items():
        assert label.startswith("openvino") or (nodes and not nodes & scope), label  # a part outside the scope
    assert parts["+ layer3's last block"] < parts["+ layer3's last two blocks"] < parts["+ all of layer3"]
    assert all("layer" not in n for n in parts["+ input scaling and stem"])
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return  # the benchmark itself needs BF16 units: what is left is the naming, checked above
    stem = dict(bench.VARIANTS)["+ input scaling and stem"]
    compiled = bench.compiled(tiny_model, stem, threads=1)
    read = read_back(compiled, scope | parts["+ input scaling and stem"])
    assert read.scope_not_fp32 == () and read.scope_nodes > 0


def test_a_pattern_that_names_nothing_stops_the_benchmark(tiny_model: Path) -> None:
    import openvino as ov

    with pytest.raises(SystemExit, match="names no node"):
        bench.named_nodes(ov.Core().read_model(str(tiny_model)), r"/layer9/")


def test_the_closest_normal_anomalous_pairs() -> None:
    scores = np.array([0.10, 0.30, 0.31, 0.50, 0.29])
    labels = np.array([False, False, True, True, True])
    assert bench.closest_pairs(scores, labels) == pytest.approx([0.01, 0.01, 0.19])
