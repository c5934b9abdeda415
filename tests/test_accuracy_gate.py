"""The accuracy gate's rule, exactly at and just past each limit, and where it is applied: ``protoad-eval --compare``
with ``NAME:PRECISION`` (a pass/fail column, an error after the table unless accepted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protoad_edge.cli.eval import _parse_compare
from protoad_edge.errors import ProtoADError
from protoad_edge.evaluation import accuracy_gate as gate
from protoad_edge.evaluation.accuracy_gate import GateFigures, enforce, judge
from protoad_edge.evaluation.evaluate import BackendRun, Comparison, LabelledSplit, compare_backends, compute_metrics
from protoad_edge.runtime.backends.registry import parse_spec


def figures(image: float = 0.9, pixel: float | None = 0.8, spearman: float = 1.0) -> GateFigures:
    """Against FP32 image AUROC 0.9 and pixel AUROC 0.8 (pixel None: no masks)."""
    return GateFigures("x.int8.onnx", 83, 0.9, image, spearman, None if pixel is None else 0.8, pixel)


def test_the_limits_are_half_a_point_and_a_rank_correlation_of_0_99() -> None:
    assert gate.MAX_AUROC_DROP_PT == 0.5
    assert gate.MIN_SPEARMAN == 0.99


@pytest.mark.parametrize(
    "case, passed",
    [
        (dict(), True),
        (dict(image=0.895), True),  # exactly 0.5 pt (0.9 - 0.895 is 0.5000000000000004 pt in floats): allowed
        (dict(image=0.89499), False),  # 0.501 pt
        (dict(image=0.95), True),  # a gain
        (dict(pixel=0.795), True),
        (dict(pixel=0.79499), False),
        (dict(pixel=None, image=0.895), True),  # no masks: the image and rank checks alone
        (dict(spearman=0.99), True),  # exactly the minimum
        (dict(spearman=0.989999), False),
        (dict(spearman=float("nan")), False),  # constant scores rank nothing
        (dict(image=float("nan")), False),
    ],
)
def test_the_rule_at_and_past_each_limit(case: dict, passed: bool) -> None:
    verdict = judge(figures(**case))
    assert verdict.passed is passed, (case, verdict.failures)
    assert bool(verdict.failures) is not passed


def test_each_failure_is_named_with_its_figure() -> None:
    verdict = judge(figures(image=0.7, pixel=0.7, spearman=0.5))
    assert [f.split(" ")[0] for f in verdict.failures] == ["image", "pixel", "Spearman"]
    assert "20.00 pt" in verdict.failures[0] and "0.5000 below 0.99" in verdict.failures[2]
    assert verdict.to_dict()["passed"] is False and verdict.to_dict()["image_drop_pt"] == 20.0


def test_a_split_too_small_to_resolve_the_limit_says_so_and_still_refuses() -> None:
    """The demo's 8 normal and 16 anomalous images: one reordered pair is 100 / 128 = 0.78 pt, so any reorder
    fails - the refusal stands, and says more labelled images are what is needed. MVTec bottle's 20 + 63 images
    (0.08 pt a pair) resolve the limit: no such note."""
    one_pair = 1 - 1 / 128
    small = judge(GateFigures("openvino bf16", 24, 1.0, one_pair, 0.999, None, None, anomalous=16))
    assert small.figures.pair_pt == pytest.approx(0.78125)
    assert not small.passed and len(small.failures) == 1
    assert small.failures[0] == (
        "image AUROC drops 0.78 pt (limit 0.5; on 8 normal and 16 anomalous images one pair ranked the other way "
        "moves it 0.78 pt: judge on more labelled images)"
    )
    bottle = judge(GateFigures("openvino bf16", 83, 0.9, 0.89, 0.999, None, None, anomalous=63))
    assert bottle.figures.pair_pt == pytest.approx(100 / (20 * 63))
    assert bottle.failures == ("image AUROC drops 1.00 pt (limit 0.5)",)
    at_limit = judge(GateFigures("x", 30, 1.0, 0.99, 0.999, None, None, anomalous=20))  # 200 pairs: 0.5 pt each
    assert at_limit.figures.pair_pt == 0.5 and "labelled" not in at_limit.failures[0]  # the limit is resolved
    past = judge(GateFigures("x", 200, 1.0, 0.99, 0.999, None, None, anomalous=199))  # 199 pairs: 0.503 pt each
    assert "judge on more labelled images" in past.failures[0]
    assert judge(figures(image=0.8)).figures.pair_pt is None  # counts unknown: no note
    assert judge(GateFigures("x", 24, 1.0, 0.99, 0.999, anomalous=24)).figures.pair_pt is None  # no normal image


def test_a_failure_is_refused_with_the_figures_unless_accepted() -> None:
    verdict = judge(GateFigures("bottle.int8.onnx", 83, 0.8667, 0.6917, 0.87, 0.8432, 0.8349))
    with pytest.raises(ProtoADError) as caught:
        enforce(verdict, "bottle.int8.onnx was not written", accept=False)
    message = str(caught.value)
    for text in (
        "bottle.int8.onnx fails the accuracy gate on 83 labelled images",
        "image AUROC 86.67 -> 69.17 (-17.50 pt)",
        "pixel AUROC 84.32 -> 83.49 (-0.83 pt)",
        "Spearman 0.8700",
        "was not written",
        gate.ACCEPT_FLAG,
    ):
        assert text in message
    enforce(verdict, "not written", accept=True)  # knowingly accepted: no error
    enforce(judge(figures()), "not written", accept=False)  # a pass needs no flag


def split(n: int = 8, size: int = 8) -> tuple[LabelledSplit, np.ndarray]:
    """A labelled split whose anomalous images carry a bright masked square, and maps that find it exactly."""
    labels = np.arange(n) % 2 == 1
    masks = np.zeros((n, size, size), bool)
    masks[labels, 2:5, 2:5] = True
    maps = np.random.default_rng(0).uniform(0, 0.1, (n, size, size)).astype(np.float32) + masks
    test = LabelledSplit(
        "c", "mvtec", Path("."), [], np.zeros((n, size, size, 3), np.uint8), masks, labels, np.ones(n, bool)
    )
    return test, maps


def test_compare_judges_reduced_precisions_only() -> None:
    test, maps = split()
    noisy = maps + np.random.default_rng(1).uniform(0, 1.5, maps.shape).astype(np.float32)
    runs = [
        BackendRun("ort", "ort", Path("m.onnx"), maps, compute_metrics(test, maps), 1.0),
        BackendRun("openvino", "openvino", Path("m.onnx"), maps, compute_metrics(test, maps), 1.0),
        BackendRun(
            "openvino:bf16",
            "openvino bf16",
            Path("m.onnx"),
            maps + 1e-4,
            compute_metrics(test, maps),
            1.0,
            reduced=True,
        ),
        BackendRun(
            "openvino:fp16", "openvino fp16", Path("m.onnx"), noisy, compute_metrics(test, noisy), 1.0, reduced=True
        ),
    ]
    comparison = Comparison("c", test, runs)
    assert comparison.gate(runs[0]) is None and comparison.gate(runs[1]) is None  # full precision: not judged
    assert comparison.gate(runs[2]).passed
    failed = comparison.gate(runs[3])
    assert not failed.passed and failed.figures.what == "openvino:fp16"
    summary = comparison.summary()["backends"]
    assert summary["ort"]["accuracy_gate"] is None and summary["openvino:fp16"]["accuracy_gate"]["passed"] is False


def test_name_precision_specs() -> None:
    assert parse_spec("openvino:bf16") == ("openvino", "bf16")
    assert parse_spec("ort") == ("ort", None)
    assert _parse_compare("ort, openvino:bf16") == ["ort", "openvino:bf16"]
    with pytest.raises(ProtoADError, match="backend ort cannot run 'ort:bf16'"):
        _parse_compare("openvino,ort:bf16")
    with pytest.raises(
        ProtoADError, match="openvino cannot run 'openvino:int4': the precisions it takes are one of fp32"
    ):
        parse_spec("openvino:int4")
    with pytest.raises(ProtoADError, match="the first backend is the FP32 reference"):
        compare_backends("no-such.onnx", "c", ["openvino:bf16", "ort"])  # refused before any file is read
