"""ONNX export of the ProtoAD network, with its metadata and a parity check through onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..atomic import atomic_path
from ..errors import ProtoADError
from ..metadata import INPUT_NAME, MAP_NAME, SCORE_NAME, ModelInfo
from ..network import ProtoADNet

MIN_OPSET = 17
PARITY_TOLERANCE = 1e-4  # max abs difference of FP32 maps, ONNX vs PyTorch


def export_onnx(net: ProtoADNet, info: ModelInfo, path: str | os.PathLike) -> Path:
    """Export ``net`` (FP32, dynamic batch) with ``info`` in ``metadata_props``; atomic; checker-verified."""
    if info.opset < MIN_OPSET:
        raise ProtoADError(f"opset {info.opset} is too old: need {MIN_OPSET} or newer")
    dummy = torch.zeros(1, 3, info.crop, info.crop)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, MAP_NAME, SCORE_NAME)}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                net.eval(),
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[MAP_NAME, SCORE_NAME],
                dynamic_axes=dynamic,
                opset_version=info.opset,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, info.to_props())
        model.producer_name = "protoad-edge"
        model.producer_version = info.toolkit_version
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    return Path(path)


def onnx_parity(onnx_path: str | os.PathLike, net: ProtoADNet, batch: np.ndarray) -> float:
    """Max abs difference of the maps, onnxruntime (CPU) vs PyTorch, on ``batch`` (float32 NCHW 0-255)."""
    from ..runtime.ort_backend import OrtBackend

    backend = OrtBackend(onnx_path, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(batch), 4):
            chunk = batch[i : i + 4]
            ort_maps, ort_scores = backend.infer(chunk)
            ref_maps, ref_scores = net(torch.from_numpy(chunk))
            worst = max(
                worst,
                float(np.abs(ort_maps - ref_maps[:, 0].numpy()).max()),
                float(np.abs(ort_scores - ref_scores.numpy()).max()),
            )
    return worst
