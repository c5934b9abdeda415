"""The exported network equals the authors' pipeline step by step (max abs difference <= 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import normal_crops
from reference import ReferencePipeline
from scipy.ndimage import gaussian_filter

from protoad_edge.builder.features import PatchFeatures, build_backbone
from protoad_edge.builder.network import GaussianBlur, L2Norm, ProtoADNet, gaussian_kernel1d, reflect_index
from protoad_edge.constants import FEATURE_CHANNELS
from protoad_edge.preprocess import to_batch

TOLERANCE = 1e-4


def test_reflect_index_is_scipy_reflect() -> None:
    # scipy 'reflect': (d c b a | a b c d | d c b a)
    assert reflect_index(4, 3).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]


def test_gaussian_kernel_matches_scipy() -> None:
    k = gaussian_kernel1d(4.0)
    assert k.size == 33  # radius int(4 * 4 + 0.5) = 16
    impulse = np.zeros(65)
    impulse[32] = 1.0
    np.testing.assert_allclose(gaussian_filter(impulse, 4.0)[16:49], k, atol=1e-12)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_blur_matches_scipy_gaussian_filter(size: int) -> None:
    m = np.random.default_rng(size).random((size, size)).astype(np.float32)
    m[: size // 4] += 3.0  # a step at the border exercises the reflect padding
    ours = GaussianBlur(4.0, size)(torch.from_numpy(m)[None, None])[0, 0].numpy()
    assert np.abs(ours - gaussian_filter(m, sigma=4)).max() < 1e-5


def test_l2norm_is_fp16_safe() -> None:
    x = torch.randn(2, FEATURE_CHANNELS, 4, 4) * 200  # sum of squares ~ 7e7, far beyond FP16's 65504
    ref = x / x.norm(dim=1, keepdim=True)
    naive = x.half() / x.half().pow(2).sum(dim=1, keepdim=True).sqrt()
    assert not torch.isfinite(naive).all() or naive.abs().max() == 0  # the overflow we guard against
    ours = L2Norm()(x.half()).float()
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() < 2e-3


def test_l2norm_fp32_exact() -> None:
    x = torch.randn(3, 64, 5, 5)
    torch.testing.assert_close(L2Norm()(x), x / x.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)


def _prototypes_from(features: PatchFeatures, crops: np.ndarray, k: int, seed: int) -> np.ndarray:
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(crops)))).permute(0, 2, 3, 1).reshape(-1, FEATURE_CHANNELS)
    rng = np.random.default_rng(seed)
    p = f.numpy()[rng.choice(len(f), k, replace=False)] + 0.05 * rng.standard_normal((k, FEATURE_CHANNELS)).astype(
        np.float32
    )
    return p / np.linalg.norm(p, axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("crop", [224, 96])
def test_network_matches_authors_pipeline(upsample: str, crop: int, torch_threads: None) -> None:
    backbone, _ = build_backbone("none", seed=3)
    features = PatchFeatures(backbone, crop, upsample)
    protos = _prototypes_from(features, normal_crops(2, crop, seed=1), k=200, seed=0)
    net = ProtoADNet(features, torch.from_numpy(protos), crop).eval()
    crops = normal_crops(2, crop, seed=7)
    crops[1, crop // 3 : crop // 2, crop // 3 : crop // 2] = [250, 20, 20]  # a defect-like patch
    with torch.no_grad():
        maps, scores = net(torch.from_numpy(to_batch(crops)))
    ref_maps, ref_scores = ReferencePipeline(backbone, protos, upsample)(crops)
    assert maps.shape == (2, 1, crop, crop) and scores.shape == (2,)
    assert np.abs(maps[:, 0].numpy() - ref_maps).max() <= TOLERANCE
    assert np.abs(scores.numpy() - ref_scores).max() <= TOLERANCE
    assert ref_maps.std() > 1e-3  # the maps are not trivially constant


def test_upsample_modes_differ(torch_threads: None) -> None:
    backbone, _ = build_backbone("none", seed=0)
    x = torch.from_numpy(to_batch(normal_crops(1, 64)))
    with torch.no_grad():
        a = PatchFeatures(backbone, 64, "bilinear")(x)
        b = PatchFeatures(backbone, 64, "nearest")(x)
    assert a.shape == b.shape == (1, FEATURE_CHANNELS, 16, 16)
    assert torch.equal(a[:, :256], b[:, :256])  # layer1 is not resampled
    assert not torch.allclose(a[:, 256:], b[:, 256:])


def test_tiny_bundle_prototypes_are_patches_of_its_normal_images(tiny_model: Path) -> None:
    """What conftest.make_bundle promises: each prototype is one normal patch, which therefore scores 0."""
    from protoad_edge.builder.torch_backend import load_torch_network

    net, info = load_torch_network(tiny_model)
    with torch.no_grad():
        patch = net.patch_scores(torch.from_numpy(to_batch(normal_crops(6, info.crop, info.seed))))[:, 0].numpy()
    assert patch.min() >= -1e-6
    assert (patch <= 1e-6).sum() >= info.num_prototypes  # every prototype's own patch (more if patches repeat)
    assert np.median(patch) > 100 * 1e-6  # and the other patches do not
