"""``protoad-export --int8``: the INT8 model, calibrated on the bundle's held-out normal images and written only
when the accuracy gate passes it on the labelled test split.

The graph surgery lives in ``export.int8``; this module adds what that layer cannot see: the datasets (the build
stage's readers), the test split's metrics and the gate (evaluation), so it sits in the evaluation layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..builder.datasets import Sample, load_crops, open_dataset
from ..bundle import Bundle
from ..decision import image_scores
from ..errors import ProtoADError
from ..export.int8 import (
    MIN_CALIBRATION_IMAGES,
    SEARCH_TOLERANCE,
    Int8Draft,
    Int8Search,
    search_within_gate,
    temporary_workdir,
    write_int8,
)
from ..metrics import spearman
from ..runtime.backends.base import BackendOptions, run_maps
from ..runtime.backends.registry import REGISTRY
from .accuracy_gate import Verdict, enforce, judge
from .evaluate import check_category, compute_metrics, gate_figures, load_test_set


@dataclass
class Int8Export:
    """What ``export_int8`` wrote and why: the searched draft and the gate's verdict (a refusal raises instead)."""

    path: Path
    draft: Int8Draft
    verdict: Verdict


def calibration_samples(
    train: list[Sample], held_out: int, seed: int, minimum: int = MIN_CALIBRATION_IMAGES
) -> tuple[list[Sample], int]:
    """(images to calibrate INT8 on, how many are held out): the bundle's held-out normal images - the build's
    seeded split, ``build.pipeline.split_train`` (a test checks they agree) - topped up to ``minimum`` with
    training images in the same seeded order. Never a test image."""
    order = np.random.default_rng(seed).permutation(len(train))
    held = [train[i] for i in sorted(order[:held_out].tolist())]
    top_up = [train[i] for i in order[held_out : max(held_out, minimum)].tolist()]
    return held + top_up, len(held)


def export_int8(
    onnx_path: str | os.PathLike,
    category: str,
    data_root: str | os.PathLike | None = None,
    dataset: str = "mvtec",
    accept: bool = False,
    batch_size: int = 8,
    threads: int = 0,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Int8Export:
    """``protoad-export --int8``: calibrate and search on the bundle's held-out normal images
    (``export.int8``), score FP32 and INT8 through onnxruntime's CPU provider on the labelled test split, search
    again with less noise allowed while the accuracy gate fails (``search_within_gate``), and write
    ``NAME.int8.onnx`` only when a draft passes (or ``accept``: the most accurate one tried)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ProtoADError(f"--from-onnx {onnx_path}: no such file")
    bundle = Bundle.of(onnx_path)
    bundle.check(onnx_path)  # an INT8 copy of a stranger would be sealed into the bundle
    info = bundle.info()
    check_category(onnx_path, info, category, False)
    data = open_dataset(category, data_root, dataset)
    samples, held = calibration_samples(data.train, int(info.build.get("images", {}).get("held_out", 0)), info.seed)
    if held < len(samples):
        log(
            f"int8: the bundle holds out {held} normal images; {len(samples) - held} training images top them up to "
            f"{len(samples)} for the calibration"
        )
    calibration = load_crops(samples, info.preprocess, "load calibration", progress)
    test = load_test_set(category, data_root, dataset, info.preprocess, progress)
    ort = REGISTRY["ort"].load()
    cpu = BackendOptions(device="cpu", threads=threads)
    with temporary_workdir(onnx_path) as work:
        search = Int8Search(onnx_path, calibration, work, threads=threads, log=log)
        with ort(onnx_path, cpu) as opened:
            reference = run_maps(opened, test.crops, batch_size, "gate fp32", progress)
        fp32 = compute_metrics(test, reference)

        def gate(draft: Int8Draft) -> Verdict:
            with ort(draft.path, cpu) as opened:
                maps = run_maps(opened, test.crops, batch_size, f"gate int8 ({len(draft.quantized)} convs)", progress)
            rank = spearman(image_scores(reference), image_scores(maps))
            return judge(gate_figures(bundle.file("int8_onnx").name, test, fp32, compute_metrics(test, maps), rank))

        found = search_within_gate(search.draft, gate, lambda verdict: verdict.passed, log)
        if found is None:
            raise ProtoADError(
                f"{onnx_path}: no backbone conv can be quantized within the search tolerance "
                f"({SEARCH_TOLERANCE} of the FP32 score spread): keep the FP32 model"
            )
        draft, verdict, tried = found
        enforce(
            verdict,
            f"{bundle.file('int8_onnx')} was not written (the most accurate of {len(tried)} "
            f"searched, with {len(draft.quantized)} convs in INT8)",
            accept,
        )
        record = {
            **verdict.to_dict(),
            "measured_with": "onnxruntime CPUExecutionProvider",
            "split": f"the {test.kind} test split of {category!r} ({len(test.labels)} images)",
            "accepted_knowingly": not verdict.passed,
            "attempts": [
                {
                    "tolerance": d.record["search"]["tolerance"],
                    "quantized": len(d.quantized),
                    "image_drop_pt": v.figures.image_drop_pt,
                    "pixel_drop_pt": v.figures.pixel_drop_pt,
                    "spearman": v.figures.spearman,
                    "passed": v.passed,
                }
                for d, v in tried
            ],
        }
        path = write_int8(draft, onnx_path, record)
    return Int8Export(path, draft, verdict)
