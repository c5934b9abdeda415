"""onnxruntime backend: the ``.onnx`` with the best available execution provider."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..bundle import Bundle, kind_of
from ..errors import ProtoADError
from ..metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .backend import Backend, BackendFacts, BackendOptions, check_batch

# Preferred first. TensorRT EP runs FP16 (the graph's L2 norm is FP16-safe) and caches its engines
# beside the model, so only the first start on a device pays for the engine build.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
CACHE_DIR = ".ort_trt_cache"


class OrtBackend(Backend):
    """``providers`` overrides the provider choice (the build checks its graph on the CPU provider);
    otherwise ``options.device`` cpu means the CPU provider only, and auto/cuda the best available."""

    name = "ort"

    def __init__(self, path: str | os.PathLike, options: BackendOptions | None = None,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        options = options or BackendOptions()
        path = Path(path)
        self.path = path
        available = ort.get_available_providers()
        wanted = providers or ([CPU_PROVIDER] if options.device == "cpu" else list(PROVIDER_ORDER))
        chosen = [p for p in wanted if p in available]
        if options.device == "cuda":
            chosen = [p for p in chosen if p != CPU_PROVIDER]
        if not chosen:
            raise ProtoADError(f"none of the providers {wanted} is available here (have {available})"
                               + (": --device cuda needs onnxruntime-gpu and a GPU" if options.device == "cuda" else ""))
        self.fp16_provider = options.fp16 is not False
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        provider_args: list[tuple[str, dict]] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                provider_args.append((p, {
                    "trt_fp16_enable": self.fp16_provider,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(path.parent / CACHE_DIR),
                }))
            else:
                provider_args.append((p, {}))
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=provider_args)
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
        if kind_of(path) is not None:
            self.info = Bundle.of(path).in_force(self.info, path)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run([MAP_NAME, SCORE_NAME], {self.info.input_name: check_batch(batch, self.info)})
        return maps[:, 0], scores

    def describe(self) -> BackendFacts:
        provider = self.providers[0] if self.providers else ""
        if kind_of(self.path) == "fp16_onnx":
            precision = "fp16 (mixed-precision graph)"
        elif provider == "TensorrtExecutionProvider" and self.fp16_provider:
            precision = "fp16"
        else:
            precision = "fp32"
        opts = self.session.get_session_options()
        device = "cpu" if provider == CPU_PROVIDER else "cuda"
        return BackendFacts(self.name, str(self.path), precision, device, list(self.providers), {
            "intra_op_threads": opts.intra_op_num_threads or "default (one per physical core)",
            "graph_optimization": str(opts.graph_optimization_level).rsplit(".", 1)[-1],
        })
