"""The authors' evaluation pipeline, written independently of ``protoad_edge.builder.network``: the parity oracle.

Eager torchvision wide_resnet50_2 (the full model, features taken by forward hooks), patch
embedding by PaDiM's ``embedding_concat`` (unfold/fold; equals nearest upsampling) or bilinear
interpolation, cosine similarity in numpy, then per image on the host ``cv2.resize`` (INTER_LINEAR)
and ``scipy.ndimage.gaussian_filter(sigma=4)``. Used by the parity tests and the benchmarks.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from scipy.ndimage import gaussian_filter

from protoad_edge.builder.features import IMAGENET_MEAN, IMAGENET_STD, Backbone


def full_model(backbone: Backbone) -> torchvision.models.ResNet:
    """A complete torchvision wide_resnet50_2 carrying ``backbone``'s weights (layer4/fc random)."""
    model = torchvision.models.wide_resnet50_2(weights=None)
    model.load_state_dict(backbone.state_dict(), strict=False)
    return model.eval()


def embedding_concat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PaDiM's embedding_concat: replicate each coarse vector into an s x s block and concatenate."""
    b, c1, h1, w1 = x.shape
    _, c2, h2, w2 = y.shape
    s = h1 // h2
    x = F.unfold(x, kernel_size=s, dilation=1, stride=s).view(b, c1, -1, h2, w2)
    z = torch.zeros(b, c1 + c2, x.size(2), h2, w2)
    for i in range(x.size(2)):
        z[:, :, i, :, :] = torch.cat((x[:, :, i, :, :], y), 1)
    z = z.view(b, -1, h2 * w2)
    return F.fold(z, kernel_size=s, output_size=(h1, w1), stride=s)


class ReferencePipeline:
    """Authors' style: eager network in torch, post-processing per image on the host."""

    def __init__(self, backbone: Backbone, prototypes: np.ndarray, upsample: str, sigma: float = 4.0) -> None:
        self.model = full_model(backbone)
        self.upsample = upsample
        self.sigma = sigma
        self.prototypes = np.asarray(prototypes, dtype=np.float32)
        self._outputs: list[torch.Tensor] = []
        for layer in (self.model.layer1, self.model.layer2, self.model.layer3):
            layer.register_forward_hook(lambda _m, _i, out: self._outputs.append(out))

    @torch.no_grad()
    def embedding(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 [N,H,W,3] RGB crops -> L2-normalised [N,1792,h,w] patch features."""
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
        x = torchvision.transforms.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        self._outputs.clear()
        self.model(x)
        f1, f2, f3 = self._outputs
        if self.upsample == "nearest":
            emb = embedding_concat(embedding_concat(f1, f2), f3)
        else:
            size = f1.shape[-2:]
            f2 = F.interpolate(f2, size=size, mode="bilinear", align_corners=False)
            f3 = F.interpolate(f3, size=size, mode="bilinear", align_corners=False)
            emb = torch.cat([f1, f2, f3], dim=1)
        return emb / emb.norm(dim=1, keepdim=True)

    def patch_scores(self, crops: np.ndarray) -> np.ndarray:
        """[N,h,w] = 1 - max cosine similarity to the prototypes (float64 on the host)."""
        emb = self.embedding(crops).numpy().astype(np.float64)
        n, d, h, w = emb.shape
        sim = np.einsum("kd,ndp->nkp", self.prototypes.astype(np.float64), emb.reshape(n, d, h * w))
        return (1.0 - sim.max(axis=1)).reshape(n, h, w)

    def __call__(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,S,S,3] crops -> (maps [N,S,S] float32, scores [N])."""
        size = crops.shape[1]
        maps = []
        for patch in self.patch_scores(crops).astype(np.float32):
            up = cv2.resize(patch, (size, size))
            maps.append(gaussian_filter(up, sigma=self.sigma))
        maps_arr = np.stack(maps)
        return maps_arr, maps_arr.reshape(len(maps_arr), -1).max(axis=1)
