"""Which torch device a build or the torch backend runs on; one clear error where it cannot."""

from __future__ import annotations

import torch

from ..constants import DEVICES
from ..errors import ProtoADError


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA where available, else the CPU."""
    if device not in DEVICES:
        raise ProtoADError(f"bad --device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProtoADError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(device)
