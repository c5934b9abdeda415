"""Patch features: wide_resnet50_2 truncated after layer3, multi-scale maps fused at layer1's resolution.

Like timm's ``features_only`` extractors, one call returns the feature maps plus their channel and
stride information; layer4 and fc are never built, so they are neither computed nor exported.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..constants import FEATURE_INFO, UPSAMPLE_MODES, feature_size
from ..errors import ProtoADError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """The stem and layer1-3 of torchvision's wide_resnet50_2; returns [layer1, layer2, layer3]."""

    feature_info = FEATURE_INFO

    def __init__(self, full: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


class PatchFeatures(nn.Module):
    """Raw RGB pixels (0-255, NCHW) -> 1792-channel patch embedding at stride 4 (not yet normalised).

    ImageNet normalisation is folded into one per-channel scale and shift, so the exported graph
    takes the crop exactly as the camera pipeline produces it.
    """

    def __init__(self, backbone: Backbone, crop: int, upsample: str = "bilinear") -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ProtoADError(f"bad --feature-upsample {upsample!r}: choose one of {', '.join(UPSAMPLE_MODES)}")
        self.backbone = backbone
        self.upsample = upsample
        self.size = feature_size(crop)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f1, f2, f3 = self.backbone(image * self.scale + self.shift)
        size = (self.size, self.size)
        kwargs = {"align_corners": False} if self.upsample == "bilinear" else {}
        f2 = F.interpolate(f2, size=size, mode=self.upsample, **kwargs)
        f3 = F.interpolate(f3, size=size, mode=self.upsample, **kwargs)
        return torch.cat([f1, f2, f3], dim=1)


def build_backbone(weights: str = "imagenet", seed: int = 0) -> tuple[Backbone, str]:
    """Return the truncated backbone in eval mode and a description of its weights for the metadata.

    ``weights``: ``imagenet`` (torchvision's cached download), ``none`` (seeded random
    initialisation, for offline use) or a path to a state_dict file (loaded with
    ``weights_only=True``, so no arbitrary pickle runs).
    """
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = torchvision.models.wide_resnet50_2(weights=None)
        return Backbone(full).eval(), f"none (seeded random initialisation, seed {seed})"
    full = torchvision.models.wide_resnet50_2(weights=None)
    if weights == "imagenet":
        state, desc = _imagenet_state_dict(), "imagenet (torchvision IMAGENET1K_V1)"
    else:
        state, desc = _file_state_dict(Path(weights))
    backbone = Backbone(full)
    kept = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
    try:
        missing, unexpected = backbone.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ProtoADError(
            f"--weights {weights}: not a wide_resnet50_2 state_dict ({str(exc).splitlines()[-1].strip()})"
        ) from None
    if missing or unexpected:
        raise ProtoADError(
            f"--weights {weights}: not a wide_resnet50_2 state_dict "
            f"(missing {len(missing)} keys e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    return backbone.eval(), desc


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    spec = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    try:
        return spec.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise ProtoADError(
            f"--weights imagenet: cannot download or read torchvision's ImageNet weights ({exc}); "
            "offline, use --weights none (seeded random) or --weights PATH (a wide_resnet50_2 state_dict file)"
        ) from None


def _file_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise ProtoADError(f"--weights {path}: no such file (use imagenet, none or a state_dict path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        raise ProtoADError(f"--weights {path}: not a loadable state_dict ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProtoADError(f"--weights {path}: expected a dict of tensors (a state_dict)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return state, f"file {path.name} (sha256 {digest})"
