"""onnxruntime backend: the ``.onnx`` with the best available execution provider."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ProtoADError
from ..metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .backend import Backend, check_batch, check_sidecar

# Preferred first. TensorRT EP runs FP16 (the graph's L2 norm is FP16-safe) and caches its engines
# beside the model, so only the first start on a device pays for the engine build.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CACHE_DIR = ".ort_trt_cache"


class OrtBackend(Backend):
    name = "ort"

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list[str] | None = None,
        threads: int = 0,
        fp16: bool = True,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        available = ort.get_available_providers()
        chosen = [p for p in (providers or PROVIDER_ORDER) if p in available]
        if not chosen:
            raise ProtoADError(f"none of the providers {providers} is available (have {available})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        provider_args: list[tuple[str, dict]] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                cache = str(path.parent / CACHE_DIR)
                provider_args.append((p, {
                    "trt_fp16_enable": fp16,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                }))
            else:
                provider_args.append((p, {}))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own exception types
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProtoADError(f"cannot load ONNX model {path}: {detail}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_props(props, f"ONNX metadata of {path}")
        self.providers = self.session.get_providers()
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs[:2] != [MAP_NAME, SCORE_NAME]:
            raise ProtoADError(f"{path}: outputs {outputs} are not [{MAP_NAME}, {SCORE_NAME}]")
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected = [3, self.info.crop, self.info.crop]
        if self.info.input_name not in inputs or list(inputs[self.info.input_name])[1:] != expected:
            raise ProtoADError(f"{path}: input {inputs} does not match its metadata ({self.info.input_name} [N,{','.join(map(str, expected))}])")
        check_sidecar(path, self.info)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run([MAP_NAME, SCORE_NAME], {self.info.input_name: check_batch(batch, self.info)})
        return maps[:, 0], scores
