"""A model bundle on disk, and which of its files each backend runs.

``protoad-export --out OUT`` writes ``OUT/NAME.onnx``, ``OUT/NAME.json`` (ModelInfo) and
``OUT/NAME.prototypes.npy``; an engine build adds ``OUT/NAME.plan``. The ``torch`` backend
rebuilds the PyTorch network from the JSON and the prototypes, so the exported graph can be
checked against the network it came from. torch is imported only for that backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ProtoADError
from .metadata import ModelInfo, sidecar_path
from .runtime.backend import Backend, open_backend

if TYPE_CHECKING:
    import torch

    from .network import ProtoADNet

BACKENDS = ("auto", "torch", "ort", "trt")
SUFFIXES = {"ort": ".onnx", "trt": ".plan", "torch": ".json"}
_KIND_OF_SUFFIX = {".onnx": "ort", ".plan": "trt", ".engine": "trt", ".json": "torch", ".npy": "torch"}


def bundle_file(model: str | os.PathLike, backend: str = "auto", category: str | None = None) -> tuple[Path, str]:
    """(file, backend) that ``backend`` runs for ``model``.

    ``model`` is a bundle file (any of NAME.onnx/.json/.plan: the others are found beside it) or
    a folder holding CATEGORY.*. ``auto`` takes the file's own kind, or in a folder the ONNX model.
    """
    if backend not in BACKENDS:
        raise ProtoADError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    path = Path(model)
    if path.is_dir():
        if not category:
            raise ProtoADError(f"--model {path} is a folder: name the category to pick CATEGORY.onnx/.json/.plan in it")
        name = path / category
        if backend == "auto":
            backend = next((b for b in ("ort", "trt", "torch") if _with_suffix(name, SUFFIXES[b]).is_file()), "ort")
        found = _with_suffix(name, SUFFIXES[backend])
        if not found.is_file():
            raise ProtoADError(f"model not found: {found} (backend {backend} runs NAME{SUFFIXES[backend]})")
        return found, backend
    if not path.is_file():
        raise ProtoADError(f"model not found: {path}")
    own = _KIND_OF_SUFFIX.get(path.suffix)
    if own is None:
        raise ProtoADError(f"--model {path}: not a model bundle file (expected .onnx, .plan or .json)")
    if backend in ("auto", own):
        return (sidecar_path(path) if own == "torch" else path), own
    sibling = _with_suffix(sidecar_path(path).with_suffix(""), SUFFIXES[backend])
    if not sibling.is_file():
        raise ProtoADError(f"backend {backend} needs {sibling} beside {path}, and it does not exist")
    return sibling, backend


def _with_suffix(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def open_bundle(
    model: str | os.PathLike,
    backend: str = "auto",
    category: str | None = None,
    device: str = "auto",
    fp16: bool | None = None,
) -> Backend:
    """Open ``model`` with ``backend`` (see ``bundle_file``); ``device``/``fp16`` apply to ``torch`` only."""
    path, backend = bundle_file(model, backend, category)
    if backend == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(path, device=device, fp16=fp16)
    try:
        return open_backend(path, backend)
    except ImportError as exc:
        raise ProtoADError(f"backend {backend} is not available here ({exc}): {path}") from None


def prototypes_path(json_path: str | os.PathLike) -> Path:
    """``models/cable.json`` -> ``models/cable.prototypes.npy``."""
    json_path = sidecar_path(json_path)
    return json_path.with_name(json_path.name[: -len(".json")] + ".prototypes.npy")


def load_prototypes(json_path: str | os.PathLike, info: ModelInfo) -> np.ndarray:
    """The bundle's prototypes [K,1792] float32, checked against its metadata."""
    path = prototypes_path(json_path)
    try:
        prototypes = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ProtoADError(f"prototypes not found: {path} (written beside the model by protoad-export)") from None
    except (OSError, ValueError) as exc:
        raise ProtoADError(f"cannot read prototypes {path}: {exc}") from None
    if prototypes.ndim != 2 or prototypes.shape[0] != info.num_prototypes:
        raise ProtoADError(
            f"{path}: shape {list(prototypes.shape)} does not match the metadata ({info.num_prototypes} prototypes)"
        )
    return np.ascontiguousarray(prototypes, dtype=np.float32)


def load_torch_network(json_path: str | os.PathLike, device: "str | torch.device" = "cpu") -> tuple["ProtoADNet", ModelInfo]:
    """Rebuild the PyTorch ProtoAD network of a bundle (eval mode, FP32, on ``device``) and its metadata.

    Backbone weights come from the spec stored at build time (``imagenet``, ``none`` with the
    stored seed, or a state_dict path), so the rebuilt network is the one that was exported.
    """
    import torch

    from .features import BACKBONE, EMBED_DIM, PatchFeatures, build_backbone
    from .network import ProtoADNet

    json_path = sidecar_path(json_path)
    info = ModelInfo.load_json(json_path)
    if info.backbone != BACKBONE:
        raise ProtoADError(f"{json_path}: backbone {info.backbone!r} is not supported (only {BACKBONE})")
    prototypes = load_prototypes(json_path, info)
    if prototypes.shape[1] != EMBED_DIM:
        raise ProtoADError(f"{prototypes_path(json_path)}: prototypes have {prototypes.shape[1]} channels, expected {EMBED_DIM}")
    try:
        backbone, _ = build_backbone(info.weights, info.seed)
    except ProtoADError as exc:
        raise ProtoADError(f"{json_path}: cannot rebuild the backbone: {exc}") from None
    features = PatchFeatures(backbone, info.crop, info.feature_upsample)
    net = ProtoADNet(features, torch.from_numpy(prototypes), info.crop, info.blur_sigma)
    return net.eval().to(device), info
