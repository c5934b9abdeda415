"""OpenVINO backend: the bundle's ``.onnx`` (or ``.int8.onnx``) on an Intel CPU or GPU, no conversion step.

OpenVINO reads the ONNX graph and its metadata itself, so one bundle serves onnxruntime and OpenVINO. Its
CPU plugin runs BF16 by default on CPUs that have it (AVX512-BF16, AMX), and its GPU plugin FP16. Anomaly
scores are small differences of cosines near 1, and BF16 cost 5-11 AUROC points on bottle
(benchmarks/RESULTS.md), so the precision is always set: FP32 unless ``BackendOptions.precision`` asks for
another - ``bf16``/``fp16``: the backbone only, from the L2 norm's input to the score in FP32
(``openvino_precision``); ``bf16-all``/``fp16-all``: the whole network - and ``describe`` reports what the
compiled model actually runs, read back from it node by node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import Bundle, kind_of
from ...errors import ProtoADError
from ...metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .base import Backend, BackendFacts, BackendOptions, check_batch
from .openvino_precision import (
    check_capability,
    check_not_quantized,
    kept_fp32,
    lower_outside,
    mode,
    read_back,
)

# What each BackendOptions.precision runs, in words (describe's precision).
RUNS = {
    "fp32": "fp32",
    "bf16": "bf16 backbone + fp32 scope",
    "fp16": "fp16 backbone + fp32 scope",
    "bf16-all": "bf16 (whole network)",
    "fp16-all": "fp16 (whole network)",
}
HINT_NAMES = {"f32": "fp32", "bf16": "bf16-all", "f16": "fp16-all"}
# Compiled models are cached beside the model (like ort's .ort_trt_cache): a GPU compiles its kernels once.
CACHE_DIR = ".ov_cache"
INT8_TYPES = ("i8", "u8")


def resolve_device(available: list[str], device: str) -> str:
    """BackendOptions.device -> an OpenVINO device: cpu -> CPU; auto -> the first GPU where one exists, else CPU;
    an OpenVINO device name (``GPU.1``) as it is."""
    if device == "cuda":
        raise ProtoADError(
            "--device cuda: OpenVINO runs on Intel CPUs and GPUs, not on NVIDIA's: use --device cpu or "
            "auto (an Intel GPU where one is present), or --backend ort / trt on an NVIDIA GPU"
        )
    if device == "cpu":
        return "CPU"
    if device == "auto":
        return next((d for d in available if d.startswith("GPU")), "CPU")
    if device.upper() in available:
        return device.upper()
    raise ProtoADError(f"--device {device}: OpenVINO has {', '.join(available)} here (or use auto, cpu)")


class OpenVinoBackend(Backend):
    """Compile the ONNX model for ``options.device`` in ``options.precision`` (FP32 by default)."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, options: BackendOptions | None = None) -> None:
        import openvino as ov

        options = options or BackendOptions()
        path = Path(path)
        self.path = path
        self.asked = options.precision or "fp32"
        hint, low = mode(self.asked)
        core = ov.Core()
        self.version = ov.get_version()
        self.device = resolve_device(list(core.available_devices), options.device)
        self.device_name = str(core.get_property(self.device, "FULL_DEVICE_NAME"))
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise ProtoADError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        rt = model.get_rt_info()
        props = {k: rt["framework"][k].astype(str) for k in rt["framework"].keys()} if "framework" in rt else {}
        self.info = ModelInfo.from_props(props, f"ONNX metadata of {path}")
        self._check_signature(model)
        if kind_of(path) is not None:
            self.info = Bundle.of(path).in_force(self.info, path)
        if self.asked != "fp32":
            check_capability(
                self.asked,
                self.device,
                self.device_name,
                list(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")),
            )
        scope = kept_fp32(model) if self.asked != "fp32" else set()
        if low:
            check_not_quantized(model, self.asked, str(path))
            lower_outside(model, low, scope)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = options.threads or os.cpu_count() or 1
        self.cache = path.parent / CACHE_DIR
        try:
            self.cache.mkdir(exist_ok=True)
            config["CACHE_DIR"] = str(self.cache)
        except OSError:  # a read-only model folder: run without the cache
            self.cache = None
        try:
            self.compiled = core.compile_model(model, self.device, config)
        except Exception as exc:
            raise ProtoADError(
                f"OpenVINO cannot compile {path} for {self.device}: {str(exc).splitlines()[0]}"
            ) from None
        self.request = self.compiled.create_infer_request()
        compiled_hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.hint = HINT_NAMES.get(compiled_hint, compiled_hint)
        self.read = read_back(self.compiled, scope)
        if low and self.read.scope_not_fp32:
            raise ProtoADError(
                f"openvino:{self.asked}: OpenVINO {self.version} on {self.device} runs "
                f"{len(self.read.scope_not_fp32)} node(s) kept in FP32 (the input scaling, the scope) in a reduced "
                f"precision ({', '.join(self.read.scope_not_fp32[:3])}): run --backend openvino (FP32)"
            )
        self.precision = self.asked if low and low in self.read.lowered else self.hint
        if self.asked != self.precision:
            print(f"openvino: {self.note}", file=sys.stderr, flush=True)

    @property
    def runs(self) -> str:
        """What ran, in words. Under a whole-network hint OpenVINO keeps some compute layers in FP32 itself (2026.4:
        the prototype stage's matrix products, whose constant is their first operand), and the words say how many."""
        runs = RUNS.get(self.precision, self.precision)
        kept, total = self.read.compute.get("f32", 0), sum(self.read.compute.values())
        if self.precision.endswith("-all") and kept:
            runs = f"{runs[:-1]}; {kept} of {total} compute layers fp32, OpenVINO's choice)"
        return runs

    @property
    def note(self) -> str:
        return f"{self.asked} asked, {self.device} runs {self.runs}" if self.asked != self.precision else ""

    def _check_signature(self, model: Any) -> None:
        """The graph's outputs and input are the ones its metadata promises."""
        outputs = [o.get_any_name() for o in model.outputs]
        if outputs[:2] != [MAP_NAME, SCORE_NAME]:
            raise ProtoADError(f"{self.path}: outputs {outputs} are not [{MAP_NAME}, {SCORE_NAME}]")
        inputs = {i.get_any_name(): i.get_partial_shape() for i in model.inputs}
        expected = [3, self.info.crop, self.info.crop]
        shape = inputs.get(self.info.input_name)
        if shape is None or shape.rank.get_length() != 4 or [d.get_length() for d in list(shape)[1:]] != expected:
            raise ProtoADError(
                f"{self.path}: input {inputs} does not match its metadata "
                f"({self.info.input_name} [N,{','.join(map(str, expected))}])"
            )

    @property
    def int8_layers(self) -> int:
        """How many convolutions and matrix products the compiled model runs in INT8 (a Q/DQ graph)."""
        return sum(n for p, n in self.read.compute.items() if p in INT8_TYPES)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.request.infer({self.info.input_name: check_batch(batch, self.info)})
        return out[MAP_NAME][:, 0], out[SCORE_NAME]

    def describe(self) -> BackendFacts:
        precision = self.runs if not self.int8_layers else f"int8 + {self.runs}"
        details: dict[str, Any] = {
            "device_name": self.device_name,
            "openvino": self.version,
            "precision_asked": self.asked,
            "inference_precision": self.hint,  # the compiled model's hint, read back
            **self.read.to_dict(),
            "cache_dir": str(self.cache) if self.cache else "none (model folder not writable)",
        }
        if self.device == "CPU":
            details["threads"] = self.compiled.get_property("INFERENCE_NUM_THREADS")
        if self.note:
            details["note"] = self.note
        return BackendFacts(self.name, str(self.path), precision, self.device.lower(), [], details)
