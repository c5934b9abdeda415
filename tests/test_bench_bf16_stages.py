"""benchmarks/bench_bf16_stages.py: every node lands in its stage, the multiply-adds follow the graph's shapes, the
2x arithmetic is right at its edges, and the benchmark runs end to end on a real exported bundle."""

from __future__ import annotations

import math
from pathlib import Path

import bench_bf16_stages as bench
import pytest

pytest.importorskip("openvino")


def test_each_node_name_lands_in_its_stage() -> None:
    head = {"/features/Mul", "/features/Add"}
    assert bench.stage_of("/features/Mul", head) == "backbone"
    assert bench.stage_of("/features/backbone/layer3/layer3.5/conv3/Conv", head) == "backbone"
    assert bench.stage_of("/features/backbone/conv1/Conv/to_bf16", head) == "backbone"
    assert bench.stage_of("/features/Concat_2", head) == "feature resize and concat"
    assert bench.stage_of("/l2norm/MatMul", head) == "L2 norm (and projection)"
    assert bench.stage_of("/prototypes/MatMul_3", head) == "prototypes"
    assert bench.stage_of("/blur/Conv_1", head) == bench.stage_of("score", head) == "the rest"


def test_the_multiply_adds_follow_the_graph(tiny_model: Path) -> None:
    import openvino as ov

    from protoad_edge.metadata import ModelInfo
    from protoad_edge.runtime.backends.openvino_precision import input_scaling

    info = ModelInfo.load_json(tiny_model.with_suffix(".json"))
    model = ov.Core().read_model(str(tiny_model))
    model.reshape({model.inputs[0]: [1, 3, info.crop, info.crop]})
    macs = bench.multiply_adds(model, input_scaling(model))
    patches = (info.crop // 4) ** 2  # layer1's resolution
    assert macs["prototypes"] == patches * 1792 * info.num_prototypes  # the paper network: 1792-dim patch vectors
    # FACTS.md: the backbone up to layer3 is 18.4 GFLOP (9.2 G multiply-adds) at 224 px, scaling with the pixels.
    assert macs["backbone"] == pytest.approx(9.2e9 * (info.crop / 224) ** 2, rel=0.01)
    assert "L2 norm (and projection)" not in macs  # no matrix product in the paper network's L2 norm


def test_what_2x_asks_of_the_backbone() -> None:
    # onnxruntime 132 ms: 2x is 66 ms; the rest takes 40, so the backbone (94 ms in FP32) must take 26: 3.6x.
    assert bench.needed_backbone_speedup(132, 94, 40) == pytest.approx(94 / 26)
    assert bench.needed_backbone_speedup(132, 94, 65.9) == pytest.approx(94 / 0.1)
    assert bench.needed_backbone_speedup(132, 94, 66) == math.inf  # the FP32 rest alone fills the target


def test_the_benchmark_runs_on_a_bundle(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("openvino:bf16 needs a CPU with BF16 units (the refusal is tested in test_openvino.py)")
    bench.main(["bench_bf16_stages.py", "--model", str(tiny_model), "--rounds", "2", "--no-write", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| backbone |" in out and "| prototypes (FP32) |" in out and "| **wall, per call** |" in out
    assert "onnxruntime FP32:" in out and "openvino:bf16-all {" in out


def test_a_bundles_section_key_names_its_network() -> None:
    from types import SimpleNamespace

    from bench_common import network_key

    assert network_key(SimpleNamespace(projection={"dims": 256})) == "p256"
    assert network_key(SimpleNamespace(projection=None)) == "paper"
