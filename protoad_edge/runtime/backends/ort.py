"""onnxruntime backend: the ``.onnx`` with the best available execution provider.

onnxruntime-gpu lists its TensorRT and CUDA providers whether or not their libraries can load; one that
cannot makes it print an "EP Error ... Falling back" banner on stdout and quietly run on the next
provider. So each provider's library is checked first (:func:`provider_problem`), the session is created
with stdout sent to stderr (:func:`stdout_to_stderr`: stdout may carry JSON lines), and any provider
that was asked for but does not run is reported in one line on stderr and in ``describe()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ...bundle import Bundle, kind_of
from ...errors import ProtoADError
from ...metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .base import Backend, BackendFacts, BackendOptions, check_batch

# Preferred first. TensorRT EP runs FP16 (the graph's L2 norm is FP16-safe) and caches its engines
# beside the model, so only the first start on a device pays for the engine build.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
CACHE_DIR = ".ort_trt_cache"
# The providers onnxruntime-gpu loads from capi/libonnxruntime_providers_NAME.so on first use.
PROVIDER_LIBRARIES = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}
# What a provider library was built for, read from the sonames it needs (libnvinfer.so.10: TensorRT 10).
BUILT_FOR = (("TensorRT", re.compile(r"libnvinfer\.so\.(\d+)")), ("CUDA", re.compile(r"libcudart\.so\.(\d+)")))
DT_NEEDED, SHT_DYNAMIC = 1, 6


def provider_library(ort: ModuleType, provider: str) -> Path | None:
    """The shared library onnxruntime loads for ``provider``, where it is a separate ELF file."""
    short = PROVIDER_LIBRARIES.get(provider)
    if short is None or not sys.platform.startswith("linux"):
        return None
    library = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{short}.so"
    return library if library.is_file() else None


def provider_problem(ort: ModuleType, provider: str) -> str | None:
    """Why ``provider``'s library cannot load here (a library it needs is missing or of another version), or None.

    Each library it needs is loaded by name, as the dynamic loader would when onnxruntime opens it
    (the provider libraries carry no search path of their own). The provider library itself is never
    loaded here: onnxruntime must load it first (its initialisers read a host onnxruntime sets up).
    """
    library = provider_library(ort, provider)
    if library is None:
        return None
    needs = needed_libraries(library)
    for name in needs:
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            detail = str(exc)
            why = f"needs {detail}" if detail.startswith(name) else f"needs {name}: {detail}"
            built = [
                f"{what} {m.group(1)}"
                for what, pattern in BUILT_FOR
                for need in needs
                if (m := pattern.fullmatch(need))
            ]
            if built:
                why += f"; onnxruntime {ort.__version__} built it for {' and '.join(built)}"
            return why
    return None


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED sonames of an ELF shared library, in order ([] where it is not one this can read)."""
    if path.stat().st_size < 64:  # shorter than an ELF header (and mmap refuses empty files)
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
            return []
        wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
        try:
            if wide:
                (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
                shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
                section, dyn = order + "IIQQQQIIQQ", order + "qQ"
            else:
                (shoff,) = struct.unpack_from(order + "I", data, 0x20)
                shentsize, shnum = struct.unpack_from(order + "HH", data, 0x2E)
                section, dyn = order + "IIIIIIIIII", order + "iI"
            sections = [struct.unpack_from(section, data, shoff + i * shentsize) for i in range(shnum)]
            needed = []
            for _, kind, _, _, offset, size, link, *_ in sections:
                if kind != SHT_DYNAMIC:
                    continue
                strings = sections[link][4]
                for at in range(offset, offset + size, struct.calcsize(dyn)):
                    tag, value = struct.unpack_from(dyn, data, at)
                    if tag == DT_NEEDED:
                        end = data.find(b"\0", strings + value)
                        needed.append(data[strings + value : end].decode(errors="replace"))
            return needed
        except (struct.error, IndexError):
            return []


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout (file descriptor 1) to stderr for the duration.

    While a session is created, onnxruntime prints its fallback banner with print() and native
    libraries write to fd 1; stdout may carry JSON lines. Python's and C's stdout buffers are flushed
    on both sides of the switch, so nothing lands on the wrong side of it. The switch is process-wide:
    backends are opened before any record is written, except a new version of the bundle, opened on a thread beside
    the running one (``runtime/reload.py``): there stdout is left alone, since the records are being written to it,
    and the new version is opened with the providers already running, so none falls back and prints.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _flush_stdout()
    try:
        saved = os.dup(1)
    except OSError:  # stdout is closed: nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        _flush_stdout()
        os.dup2(saved, 1)
        os.close(saved)


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # C's stdio buffer: a pipe makes it hold whole blocks
    except (OSError, TypeError, AttributeError):  # no C library to ask (Windows)
        pass


class OrtBackend(Backend):
    """``providers`` overrides the provider choice (the build checks its graph on the CPU provider);
    otherwise ``options.device`` cpu means the CPU provider only, and auto/cuda the best available."""

    name = "ort"

    def __init__(
        self, path: str | os.PathLike, options: BackendOptions | None = None, providers: list[str] | None = None
    ) -> None:
        import onnxruntime as ort

        options = options or BackendOptions()
        path = Path(path)
        self.path = path
        available = ort.get_available_providers()
        wanted = providers or ([CPU_PROVIDER] if options.device == "cpu" else list(PROVIDER_ORDER))
        chosen = [p for p in wanted if p in available]
        if options.device == "cuda":
            chosen = [p for p in chosen if p != CPU_PROVIDER]
        unavailable = {p: why for p in chosen if (why := provider_problem(ort, p))}
        chosen = [p for p in chosen if p not in unavailable]
        if not chosen:
            reasons = "".join(f"; {p} {why}" for p, why in unavailable.items())
            raise ProtoADError(
                f"none of the providers {wanted} is available here (have {available}{reasons})"
                + (": --device cuda needs onnxruntime-gpu and a GPU" if options.device == "cuda" else "")
            )
        self.fp16_provider = options.fp16 is not False
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        provider_args: list[tuple[str, dict]] = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                provider_args.append(
                    (
                        p,
                        {
                            "trt_fp16_enable": self.fp16_provider,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(path.parent / CACHE_DIR),
                        },
                    )
                )
            else:
                provider_args.append((p, {}))
        try:
            with stdout_to_stderr():
                self.session = ort.InferenceSession(str(path), session_options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own exception types
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProtoADError(f"cannot load ONNX model {path}: {detail}") from None
        self.providers = self.session.get_providers()
        for p in chosen:
            if p not in self.providers:
                unavailable[p] = "onnxruntime could not create it: see its message above"
        self.note = ""
        if unavailable:
            self.note = (
                "onnxruntime: "
                + "; ".join(f"{p} unavailable ({why})" for p, why in unavailable.items())
                + f", using {self.providers[0]}"
            )
            if options.device == "cuda" and self.providers[0] == CPU_PROVIDER:
                raise ProtoADError(f"--device cuda: {path} would run on the CPU ({self.note})")
            print(self.note, file=sys.stderr, flush=True)
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_props(props, f"ONNX metadata of {path}")
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs[:2] != [MAP_NAME, SCORE_NAME]:
            raise ProtoADError(f"{path}: outputs {outputs} are not [{MAP_NAME}, {SCORE_NAME}]")
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected = [3, self.info.crop, self.info.crop]
        if self.info.input_name not in inputs or list(inputs[self.info.input_name])[1:] != expected:
            raise ProtoADError(
                f"{path}: input {inputs} does not match its metadata ({self.info.input_name} "
                f"[N,{','.join(map(str, expected))}])"
            )
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
        details: dict[str, Any] = {
            "intra_op_threads": opts.intra_op_num_threads or "default (one per physical core)",
            "graph_optimization": str(opts.graph_optimization_level).rsplit(".", 1)[-1],
        }
        if self.note:
            details["note"] = self.note
        return BackendFacts(self.name, str(self.path), precision, device, list(self.providers), details)
