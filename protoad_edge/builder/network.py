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

from ..constants import L2NORM_MODULE, PROTOTYPE_CHUNK
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


class NearestPrototype(nn.Module):
    """Max cosine similarity of every patch vector to K unit prototypes: [N,D,H,W] -> [N,1,H,W].

    Mathematically the paper's 1x1 convolution followed by a max over its K output channels, but
    computed as matrix products over blocks of ``CHUNK`` prototypes with a running maximum, so the
    [N,K,H,W] similarity tensor is never materialised: each block's products are reduced while
    they are still in cache. Through onnxruntime on a CPU this makes the prototype stage ~1.4-2x
    and the whole graph ~1.3-1.4x faster than the Conv form (benchmarks/RESULTS.md), and each
    block's tensor stays far below TensorRT's 2^31-element limit. Each similarity is the same dot
    product as in the convolution and the maximum is exact, so results match it to float rounding.
    """

    CHUNK = PROTOTYPE_CHUNK

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        weight = torch.as_tensor(prototypes, dtype=torch.float32)
        # One constant per block (not a Split at run time, which would copy all prototypes per call).
        self.blocks = nn.ParameterList(
            nn.Parameter(block.contiguous(), requires_grad=False) for block in weight.split(self.CHUNK)
        )

    @property
    def num_prototypes(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        flat = x.flatten(2)  # [N,D,H*W]
        best = None
        for block in self.blocks:
            sim = torch.matmul(block, flat).amax(dim=1, keepdim=True)  # [N,1,H*W]
            best = sim if best is None else torch.maximum(best, sim)
        return best.view(n, 1, h, w)


class Projection(nn.Module):
    """Centre, project to D dimensions and re-normalise unit patch vectors: [N,C,H,W] -> [N,D,H,W].

    The cosine to the prototypes is then taken in a D-dimensional subspace: D x (C + K) multiply-adds
    per patch instead of the paper's C x K (issue 18; ``builder/projection.py`` fits it). The mean is zeros
    when the projection is not centred. ``rows`` applies the same operations to the prototypes.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        super().__init__()
        matrix = torch.as_tensor(matrix, dtype=torch.float32)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if matrix.ndim != 2 or mean.shape != (matrix.shape[1],):
            raise ValueError(f"projection: mean {list(mean.shape)} and matrix {list(matrix.shape)} are not [C], [D,C]")
        self.register_buffer("mean", mean.view(1, -1, 1))
        self.register_buffer("matrix", matrix.contiguous())
        self.norm = L2Norm()

    @property
    def dims(self) -> int:
        return self.matrix.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = torch.matmul(self.matrix, x.flatten(2) - self.mean)  # [N,D,H*W]
        return self.norm(y.view(n, -1, h, w))

    def rows(self, vectors: torch.Tensor) -> torch.Tensor:
        """[M,C] vectors (the prototypes) -> [M,D], centred, projected and re-normalised as the patches are."""
        return self.norm(torch.matmul(vectors - self.mean.view(1, -1), self.matrix.t()))


class ProjectedL2Norm(nn.Module):
    """The L2 norm followed by the projection, as one module: ``projection(x / |x|)``, computed as
    ``(P x) / |x| - P mean`` and re-normalised.

    Both steps are linear in x but for the per-patch scale, so the projection is applied to the raw features
    and the scale and the (projected) mean to its D rows: the C x H*W features are read once by the product,
    instead of being written normalised and then centred first (two passes over the largest tensor of the
    graph). Registered under the L2 norm's name, all of it is in the scope ("/l2norm/...") that FP16 graphs
    and TensorRT 10 engines keep in FP32, where the sum of squares of raw activations cannot overflow.
    """

    def __init__(self, projection: Projection, eps: float = 1e-6) -> None:
        super().__init__()
        self.projection = projection
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        flat = x.flatten(2)  # [N,C,H*W]
        scale = flat.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(self.eps)  # [N,1,H*W]
        p = self.projection
        y = torch.matmul(p.matrix, flat) / scale - torch.matmul(p.matrix, p.mean)  # [N,D,H*W]
        return p.norm(y.view(n, -1, h, w))


class ProtoADNet(nn.Module):
    """Pixels -> features -> L2 norm [-> projection] -> max cosine to the prototypes -> 1 - x -> upsample -> blur.

    Input: float [N,3,S,S] RGB 0-255 (the centre crop). Outputs: anomaly map [N,1,S,S] and image score [N].
    """

    def __init__(
        self,
        features: PatchFeatures,
        prototypes: torch.Tensor,
        crop: int,
        blur_sigma: float = 4.0,
        projection: Projection | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        # Registered under the shared name: its ONNX nodes ("/l2norm/...") are what FP16 builds keep in FP32.
        self.add_module(L2NORM_MODULE, L2Norm() if projection is None else ProjectedL2Norm(projection))
        prototypes = torch.as_tensor(prototypes, dtype=torch.float32)
        if projection is not None:
            with torch.no_grad():
                prototypes = projection.rows(prototypes)
        self.prototypes = NearestPrototype(prototypes)
        self.crop = crop
        self.blur = GaussianBlur(blur_sigma, crop)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.num_prototypes

    @property
    def projection(self) -> Projection | None:
        """The projection before the prototype stage, or None (the paper's network)."""
        return getattr(getattr(self, L2NORM_MODULE), "projection", None)

    def patch_scores(self, image: torch.Tensor) -> torch.Tensor:
        """The anomaly map at feature resolution: 1 - max cosine similarity to any prototype."""
        return 1.0 - self.prototypes(getattr(self, L2NORM_MODULE)(self.features(image)))

    def postprocess(self, patch_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N,1,h,w] patch scores -> (bilinear upsample to the crop, then the blur; image score = max)."""
        amap = F.interpolate(patch_scores, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
        amap = self.blur(amap)
        return amap, amap.flatten(1).amax(dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.postprocess(self.patch_scores(image))
