"""The ProtoAD network: one pure ``nn.Module`` from raw RGB pixels to anomaly map and image score.

This is exactly what is exported to ONNX and what the parity tests check against the authors'
pipeline (1 - max cosine at stride 4, ``cv2.resize`` INTER_LINEAR, ``scipy.ndimage.gaussian_filter``
sigma 4). No training, CLI or I/O code lives here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .features import PatchFeatures


class L2Norm(nn.Module):
    """L2-normalise over channels without FP16 overflow.

    Dividing by the channel-wise max magnitude first bounds every squared term by 1, so the sum of
    squares over 1792 channels stays below 1792 even in FP16 (a plain sum of squares overflows
    65504 for activations above ~6).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(self.eps)
        return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate * sigma + 0.5), normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    return phi / phi.sum()


def reflect_index(n: int, radius: int) -> np.ndarray:
    """Indices that pad a length-n axis by ``radius`` in scipy's 'reflect' mode (d c b a | a b c d | d c b a).

    torch's and ONNX's 'reflect' padding is scipy's 'mirror' (edge not repeated), so the padding is
    a constant gather instead.
    """
    i = np.arange(-radius, n + radius)
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i).astype(np.int64)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of a [N,1,H,W] map, identical to scipy.ndimage.gaussian_filter (mode reflect)."""

    def __init__(self, sigma: float, size: int) -> None:
        super().__init__()
        kernel = torch.tensor(gaussian_kernel1d(sigma), dtype=torch.float32)
        radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1))
        self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1))
        self.register_buffer("pad_index", torch.from_numpy(reflect_index(size, radius)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x.index_select(3, self.pad_index), self.kernel_w)
        return F.conv2d(x.index_select(2, self.pad_index), self.kernel_h)


class ProtoADNet(nn.Module):
    """Pixels -> features -> L2 norm -> 1x1 conv with the prototypes -> channel max -> 1 - x -> upsample -> blur.

    Input: float [N,3,S,S] RGB 0-255 (the centre crop). Outputs: anomaly map [N,1,S,S] and image score [N].
    """

    def __init__(self, features: PatchFeatures, prototypes: torch.Tensor, crop: int, blur_sigma: float = 4.0) -> None:
        super().__init__()
        prototypes = torch.as_tensor(prototypes, dtype=torch.float32)
        k, d = prototypes.shape
        self.features = features
        self.l2norm = L2Norm()
        self.prototypes = nn.Conv2d(d, k, kernel_size=1, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(prototypes.view(k, d, 1, 1))
        self.crop = crop
        self.blur = GaussianBlur(blur_sigma, crop)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.out_channels

    def patch_scores(self, image: torch.Tensor) -> torch.Tensor:
        """The anomaly map at feature resolution: 1 - max cosine similarity to any prototype."""
        similarity = self.prototypes(self.l2norm(self.features(image)))
        return 1.0 - similarity.amax(dim=1, keepdim=True)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = F.interpolate(self.patch_scores(image), size=(self.crop, self.crop), mode="bilinear", align_corners=False)
        amap = self.blur(amap)
        return amap, amap.flatten(1).amax(dim=1)
