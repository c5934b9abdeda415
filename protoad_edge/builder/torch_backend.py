"""The PyTorch network of a bundle behind the runtime's Backend interface (eager; FP16 on a GPU).

It lives in the build stage, not in ``protoad_edge.runtime``, because it needs torch, which camera
images lack. It is the yardstick the exported backends are compared with (``protoad-eval --compare``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle
from ..constants import BACKBONE, FEATURE_CHANNELS
from ..errors import ProtoADError
from ..metadata import ModelInfo
from ..runtime.backends.base import Backend, BackendFacts, BackendOptions, check_batch
from .device import resolve_device
from .features import PatchFeatures, build_backbone
from .network import ProtoADNet
from .projection import load_projection


class TorchBackend(Backend):
    """Runs the bundle's ``NAME.json`` + ``NAME.prototypes.npy``; ``options.fp16`` None: half on CUDA (as deployed)."""

    name = "torch"

    def __init__(self, path: str | os.PathLike, options: BackendOptions | None = None) -> None:
        options = options or BackendOptions()
        self.path = Bundle.of(path).sidecar
        self.device = resolve_device(options.device)
        if options.threads:
            torch.set_num_threads(options.threads)
        self.fp16 = self.device.type == "cuda" if options.fp16 is None else options.fp16
        self.net, self.info = load_torch_network(self.path, self.device)
        if self.fp16:
            # The L2 norm is written to stay finite in FP16, so the whole network can run in half.
            self.net.half()

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(check_batch(batch, self.info)).to(self.device)
        maps, scores = self.net(x.half() if self.fp16 else x)
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()

    def describe(self) -> BackendFacts:
        return BackendFacts(
            self.name,
            str(self.path),
            "fp16" if self.fp16 else "fp32",
            self.device.type,
            details={"threads": torch.get_num_threads(), "mode": "eager"},
        )


def load_prototypes(bundle: Bundle, info: ModelInfo) -> np.ndarray:
    """The bundle's prototypes [K,1792] float32, checked against its metadata."""
    path = bundle.prototypes
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
    if prototypes.shape[1] != FEATURE_CHANNELS:
        raise ProtoADError(f"{path}: prototypes have {prototypes.shape[1]} channels, expected {FEATURE_CHANNELS}")
    return np.ascontiguousarray(prototypes, dtype=np.float32)


def load_torch_network(model: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ProtoADNet, ModelInfo]:
    """Rebuild the PyTorch ProtoAD network of a bundle (eval mode, FP32, on ``device``) and its metadata.

    Backbone weights come from the spec stored at build time (``imagenet``, ``none`` with the
    stored seed, or a state_dict path), and a projected network's projection from ``NAME.projection.npz``,
    so the rebuilt network is the one that was exported.
    """
    bundle = Bundle.of(Path(model))
    info = ModelInfo.load_json(bundle.sidecar)
    if info.backbone != BACKBONE:
        raise ProtoADError(f"{bundle.sidecar}: backbone {info.backbone!r} is not supported (only {BACKBONE})")
    prototypes = load_prototypes(bundle, info)
    try:
        backbone, _ = build_backbone(info.weights, info.seed)
    except ProtoADError as exc:
        raise ProtoADError(f"{bundle.sidecar}: cannot rebuild the backbone: {exc}") from None
    features = PatchFeatures(backbone, info.crop, info.feature_upsample)
    projection = load_projection(bundle.file("projection"), info.projection).module() if info.projection else None
    net = ProtoADNet(features, torch.from_numpy(prototypes), info.crop, info.blur_sigma, projection=projection)
    return net.eval().to(device), info
