"""The backend registry: each backend's name, its class, the bundle files it runs and what it needs.

Every CLI takes ``--backend NAME`` with these names, and any file of a bundle as the model; adding
a backend is one module with a ``Backend`` subclass plus one row here. Classes are imported only
when opened, so the registry itself needs neither torch nor TensorRT.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ...bundle import Bundle, kind_of, locate
from ...errors import ProtoADError
from .base import Backend, BackendOptions

AUTO = "auto"


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str  # "module:Class", imported when the backend is opened
    files: tuple[str, ...]  # bundle file kinds it runs; the first is the one it picks by itself
    needs: str  # the Python module it cannot run without
    install: str  # what to install when that module is missing
    summary: str
    # Precisions it can lower to at run time (BackendOptions.precision, ``--compare NAME:PRECISION``); full by default.
    precisions: tuple[str, ...] = ()

    @property
    def needs_torch(self) -> bool:
        return self.needs == "torch"

    def available(self) -> bool:
        return importlib.util.find_spec(self.needs) is not None

    def load(self) -> type[Backend]:
        module, cls = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as exc:
            raise ProtoADError(f"backend {self.name} is not available here ({exc}): {self.install}") from None


REGISTRY: dict[str, BackendEntry] = {
    entry.name: entry
    for entry in (
        BackendEntry(
            "ort",
            "protoad_edge.runtime.backends.ort:OrtBackend",
            ("onnx", "fp16_onnx", "int8_onnx"),
            "onnxruntime",
            "pip install onnxruntime (or onnxruntime-gpu)",
            "onnxruntime, best available execution provider",
        ),
        BackendEntry(
            "trt",
            "protoad_edge.runtime.backends.trt:TrtBackend",
            ("plan",),
            "tensorrt",
            "pip install 'protoad-edge[gpu]' (on a Jetson TensorRT comes with JetPack)",
            "TensorRT plan on this GPU",
        ),
        BackendEntry(
            "torch",
            "protoad_edge.builder.torch_backend:TorchBackend",
            ("sidecar", "prototypes"),
            "torch",
            "pip install 'protoad-edge[build]'",
            "the PyTorch network rebuilt from the bundle (the yardstick)",
        ),
        BackendEntry(
            "openvino",
            "protoad_edge.runtime.backends.openvino:OpenVinoBackend",
            ("onnx", "int8_onnx", "fp16_onnx"),
            "openvino",
            "pip install 'protoad-edge[openvino]'",
            "OpenVINO on an Intel CPU or GPU, FP32 unless asked (openvino:bf16 or :fp16 the backbone only, "
            "the cosine stage in FP32; :bf16-all the whole network)",
            ("fp32", "bf16", "fp16", "bf16-all", "fp16-all"),
        ),
    )
}
NAMES = tuple(REGISTRY)
CHOICES = (AUTO, *NAMES)
# What --backend takes: a name, or NAME:PRECISION for a backend that lowers its precision at run time.
SPECS = (*CHOICES, *(f"{e.name}:{p}" for e in REGISTRY.values() for p in e.precisions if p != "fp32"))
# ``auto`` on a bundle (not on one runnable file): the first of these whose file exists and whose library is installed.
AUTO_ORDER = ("trt", "ort", "torch")
HELP = (
    "auto: the named file's own backend (.onnx -> ort, .plan -> trt); for a .json, a folder or no --model: "
    "trt where TensorRT is installed and the plan exists, else ort. "
    + "; ".join(f"{e.name}: {e.summary}" for e in REGISTRY.values())
    + "."
)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``openvino:bf16`` -> (``openvino``, ``bf16``); a plain name -> (name, None: its full precision)."""
    name, _, precision = spec.partition(":")
    if name not in REGISTRY:
        raise ProtoADError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    entry = REGISTRY[name]
    if precision and precision not in entry.precisions:
        lowers = f"one of {', '.join(entry.precisions)}" if entry.precisions else "none"
        raise ProtoADError(f"backend {name} cannot run {spec!r}: the precisions it takes are {lowers}")
    return name, precision or None


def choose(bundle: Bundle, given: Path | None, backend: str = AUTO) -> tuple[BackendEntry, Path]:
    """(entry, file to run) for ``backend`` on ``bundle``; ``given`` is the file the user named, if any.

    ``auto`` runs a named .onnx or .plan with its own backend; a sidecar, a folder or no file stands
    for the bundle, which runs with the first of ``AUTO_ORDER`` that is installed and has its file.
    A named backend runs the named file if it is one of its kinds (``x.fp16.onnx`` for ort), else its
    own file of the bundle.
    """
    if backend != AUTO and backend not in REGISTRY:
        raise ProtoADError(f"unknown backend {backend!r}: choose one of {', '.join(CHOICES)}")
    given_kind = kind_of(given) if given is not None else None
    if backend == AUTO:
        own = next((e for e in REGISTRY.values() if given_kind in e.files and not e.needs_torch), None)
        candidates = (
            [own]
            if own
            else [
                REGISTRY[n]
                for n in AUTO_ORDER
                if bundle.file(REGISTRY[n].files[0]).is_file() and REGISTRY[n].available()
            ]
        )
        if not candidates:
            raise ProtoADError(
                f"model bundle {bundle.stem}: no file that an installed backend can run "
                f"({', '.join(str(bundle.file(REGISTRY[n].files[0])) for n in AUTO_ORDER)})"
            )
        entry = candidates[0]
    else:
        entry = REGISTRY[backend]
    path = given if given is not None and given_kind in entry.files else bundle.file(entry.files[0])
    if not path.is_file():
        beside = f" beside {given}" if given is not None else ""
        raise ProtoADError(f"backend {entry.name} runs {path}{beside}, and it does not exist")
    return entry, path


def open_backend(
    model: str | os.PathLike | None,
    backend: str = AUTO,
    *,
    category: str | None = None,
    options: BackendOptions | None = None,
) -> Backend:
    """Open ``model`` (any file of a bundle, a folder with ``category``, or None: the one bundle in
    ./models) with ``backend``."""
    backend, options = with_precision(backend, options or BackendOptions())
    bundle, given = locate(model, category)
    entry, path = choose(bundle, given, backend)
    return open_file(entry, path, options)


def with_precision(spec: str, options: BackendOptions) -> tuple[str, BackendOptions]:
    """``openvino:bf16`` -> (``openvino``, ``options`` with that precision); a plain name or auto as it is."""
    if spec == AUTO:
        return spec, options
    name, precision = parse_spec(spec)
    return name, options if precision is None else dataclasses.replace(options, precision=precision)


def open_file(entry: BackendEntry, path: Path, options: BackendOptions | None = None) -> Backend:
    """Open ``path`` with ``entry``'s backend once the bundle's sidecar vouches for it (``Bundle.check``): every
    command that runs a model (protoad-run, -eval, -bench, -serve) opens it here."""
    Bundle.of(path).check(path)
    return entry.load()(path, options or BackendOptions())
