"""ONNX export of the ProtoAD network, with its metadata, and the parity gate through onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from ..atomic import atomic_path
from ..constants import FP32_SCOPE
from ..errors import ProtoADError
from ..metadata import INPUT_NAME, MAP_NAME, SCORE_NAME, ModelInfo
from ..runtime.backends.ort import OrtBackend

if TYPE_CHECKING:
    from ..builder.network import ProtoADNet

MIN_OPSET = 17
PARITY_TOLERANCE = 1e-4  # max abs difference of FP32 maps and scores, ONNX vs PyTorch
PARITY_CHUNK = 4


def export_onnx(net: ProtoADNet, info: ModelInfo, path: str | os.PathLike) -> Path:
    """Export ``net`` (FP32, dynamic batch) with ``info`` in ``metadata_props``; atomic; checker-verified.

    The graph must contain the L2 normalisation's scope (``constants.FP32_SCOPE``): FP16 graphs and
    TensorRT 10 engines keep exactly those nodes in FP32, so a renamed module fails here, not on a GPU.
    """
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
        if not any(FP32_SCOPE in node.name for node in model.graph.node):
            raise ProtoADError(
                f"the exported graph has no node in scope {FP32_SCOPE!r}: the L2 normalisation would "
                "not be kept in FP32 by FP16 builds (was ProtoADNet's module renamed?)"
            )
        onnx.helper.set_model_props(model, info.to_props())
        model.producer_name = "protoad-edge"
        model.producer_version = info.toolkit_version
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    return Path(path)


def onnx_parity(onnx_path: str | os.PathLike, net: torch.nn.Module, batch: np.ndarray) -> float:
    """Max abs difference of maps and scores, onnxruntime (CPU) vs PyTorch, on ``batch`` (float32 NCHW 0-255)."""
    backend = OrtBackend(onnx_path, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for i in range(0, len(batch), PARITY_CHUNK):
            chunk = batch[i : i + PARITY_CHUNK]
            ort_maps, ort_scores = backend.infer(chunk)
            ref_maps, ref_scores = net(torch.from_numpy(chunk))
            worst = max(
                worst,
                float(np.abs(ort_maps - ref_maps[:, 0].numpy()).max()),
                float(np.abs(ort_scores - ref_scores.numpy()).max()),
            )
    return worst


def parity_gate(
    onnx_path: str | os.PathLike, net: torch.nn.Module, batch: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """``onnx_parity``, refusing the export (ProtoADError) when it exceeds ``tolerance``; returns it."""
    parity = onnx_parity(onnx_path, net, batch)
    if not parity <= tolerance:
        raise ProtoADError(
            f"ONNX parity check failed: max abs difference {parity:.2e} > {tolerance:.0e} against PyTorch"
        )
    return parity
