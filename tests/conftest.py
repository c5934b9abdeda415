"""Shared fixtures: small real model bundles built with the project's own code (weights none, offline)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

TINY_CROP = 64
TINY_RESIZE = 72
# The benchmarks' modules (the authors' pipeline in reference.py, the FINCH scale benchmark) are tested too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


# The fast tier (``pytest -m "not slow"``) leaves out end-to-end runs and every test that starts a real server:
# these modules start one in every test; these fixtures start a server, or run a whole build, for the tests that
# use them.
SLOW_MODULES = {"test_serve.py", "test_outage.py", "test_soak.py"}
SLOW_FIXTURES = {
    "broker",
    "secure",
    "late_broker",
    "serve",
    "demo_export",
    "projected_build",
    "pristine",
    "projected",
    "bundle_dir",
}  # test_teach, test_reload: a bundle built, then taught


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def feature_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builds in tests cache their features in a temporary folder, not in the user's ~/.cache."""
    os.environ["PROTOAD_CACHE"] = str(tmp_path_factory.mktemp("feature_cache"))


@pytest.fixture(scope="session")
def torch_threads() -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)


def make_bundle(
    out: Path,
    name: str = "tiny",
    crop: int = TINY_CROP,
    resize: int = TINY_RESIZE,
    k: int = 48,
    upsample: str = "bilinear",
    seed: int = 0,
) -> Path:
    """Export NAME.onnx/.json/.prototypes.npy from random-weight features of synthetic images, in seconds.

    The prototypes are ``k`` real normalised patch features of ``normal_crops(6, crop, seed)``, so
    those patches match a prototype exactly (``test_network`` checks it). With random weights at this
    size the model does not rank defects reliably (measured: noisy crops 0.024-0.030, unseen normal
    crops 0.022-0.032), so tests use it for plumbing, decisions and parity, never for detection quality.
    """
    import torch

    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.network import L2Norm, ProtoADNet
    from protoad_edge.builder.thresholds import from_normal_maps
    from protoad_edge.constants import BACKBONE
    from protoad_edge.export.onnx import export_onnx
    from protoad_edge.metadata import ModelInfo
    from protoad_edge.preprocess import to_batch
    from protoad_edge.runtime.backends.ort import OrtBackend

    rng = np.random.default_rng(seed)
    backbone, _ = build_backbone("none", seed)
    features = PatchFeatures(backbone, crop, upsample)
    normal = normal_crops(6, crop, seed)
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(normal)))).permute(0, 2, 3, 1).reshape(-1, 1792).numpy()
    prototypes = f[rng.choice(len(f), size=k, replace=False)]
    net = ProtoADNet(features, torch.from_numpy(prototypes), crop).eval()
    info = ModelInfo(
        category=name,
        resize=resize,
        crop=crop,
        backbone=BACKBONE,
        weights="none",
        feature_upsample=upsample,
        num_prototypes=k,
        image_threshold=0.0,
        pixel_threshold=0.0,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(net, info, out / f"{name}.onnx")
    maps = OrtBackend(onnx_path, providers=["CPUExecutionProvider"]).infer(to_batch(normal))[0]
    t = from_normal_maps(maps)
    info.image_threshold, info.pixel_threshold, info.threshold_rule = t.image, t.pixel, t.rule
    export_onnx(net, info, onnx_path)
    # Unsealed (no digests), like a bundle of an older release: tests swap its files freely; the digest tests
    # seal their own copies.
    info.save_json(out / f"{name}.json")
    np.save(out / f"{name}.prototypes.npy", prototypes)
    return onnx_path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def normal_crops(n: int, crop: int, seed: int = 0) -> np.ndarray:
    """Smooth gradient 'parts' with mild noise: uint8 [n,crop,crop,3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:crop, 0:crop] / crop
    out = []
    for _ in range(n):
        base = 120 + 60 * np.sin(2 * np.pi * (xx * rng.uniform(1, 2) + yy * rng.uniform(0, 1)))
        img = base[..., None] + np.array([10, 0, -10]) + rng.normal(0, 3, (crop, crop, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    """A small exported bundle (crop 64, K 48): ``.../tiny.onnx`` with ``tiny.json`` beside it."""
    return make_bundle(tmp_path_factory.mktemp("tiny_model"))


def every_anomaly_has_a_mask(dataset) -> bool:
    """The dataset's anomalous test images all have masks, so pixel-level metrics exist for it."""
    anomalous = [s for s in dataset.test if s.label == 1]
    return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


def write_demo_category(root: Path, category: str, splits: dict[str, int]) -> None:
    """A small MVTec-layout category of generated demo images (``demo.demo_image``), with their masks."""
    from PIL import Image

    from protoad_edge.builder.demo import demo_image

    for split, count in splits.items():
        for index in range(count):
            _, image, mask = demo_image(split, index)
            (root / category / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / category / split / f"{index:03d}.png")
            if mask is not None:
                truth = root / category / "ground_truth" / split.split("/")[1]
                truth.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(truth / f"{index:03d}_mask.png")
