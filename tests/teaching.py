"""Helpers of the teaching tests: small bundles of the generated demo part (crop 64) and its frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_teach import lighting_change
from PIL import Image

CROP, RESIZE = 64, 72
TRAIN, HELD = range(8), range(8, 16)  # demo training images of the bundle's prototypes, and of its thresholds


def demo_frames(indices: range | list[int], split: str = "train/good") -> np.ndarray:
    """Demo images (uint8 [N, 256, 256, 3]), as a camera delivers them."""
    from protoad_edge.builder.demo import demo_image

    return np.stack([demo_image(split, i)[1] for i in indices])


def changed_lamp(frames: np.ndarray) -> np.ndarray:
    return lighting_change(frames)


def with_hole(frames: np.ndarray) -> np.ndarray:
    """A defect the bundle has never seen: a black square over the part (frame pixels 96-160)."""
    out = frames.copy()
    out[:, 96:160, 96:160] = 0
    return out


def write_pngs(folder: Path, frames: np.ndarray, prefix: str = "f") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{prefix}{i:03d}.png")
    return folder


def crops(frames: np.ndarray) -> np.ndarray:
    from protoad_edge.preprocess import Preprocess

    pre = Preprocess(RESIZE, CROP)
    return np.stack([pre(f) for f in frames])


def teach_bundle(out: Path, name: str = "part", k: int = 256, project_dims: int | None = None) -> Path:
    """A sealed bundle of the demo part at crop 64: ``k`` patch vectors of 8 training images as prototypes (optionally
    compared through a centred projection to ``project_dims``), thresholds by the build's rule on 8 held-out
    images. Its changed-lamp frames score about 3x its image threshold; a black square about 4x."""
    import torch

    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.network import L2Norm, ProtoADNet
    from protoad_edge.builder.projection import fit_projection
    from protoad_edge.builder.thresholds import from_normal_maps
    from protoad_edge.bundle import Bundle
    from protoad_edge.constants import BACKBONE
    from protoad_edge.export.onnx import export_onnx
    from protoad_edge.metadata import ModelInfo
    from protoad_edge.preprocess import to_batch
    from protoad_edge.runtime.backends.ort import OrtBackend

    backbone, _ = build_backbone("none", 0)
    features = PatchFeatures(backbone, CROP, "bilinear")
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(crops(demo_frames(TRAIN)))))).permute(0, 2, 3, 1)
    vectors = f.reshape(-1, 1792).numpy()
    prototypes = vectors[np.random.default_rng(0).choice(len(vectors), k, replace=False)]
    fitted = fit_projection(vectors, project_dims) if project_dims else None
    net = ProtoADNet(
        features, torch.from_numpy(prototypes), CROP, projection=fitted.module() if fitted else None
    ).eval()
    info = ModelInfo(
        category=name,
        resize=RESIZE,
        crop=CROP,
        backbone=BACKBONE,
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=k,
        image_threshold=0.0,
        pixel_threshold=0.0,
        projection=fitted.record if fitted else None,
    )
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(net, info, out / f"{name}.onnx")
    maps = OrtBackend(onnx_path, providers=["CPUExecutionProvider"]).infer(to_batch(crops(demo_frames(HELD))))[0]
    t = from_normal_maps(maps)
    info.image_threshold, info.pixel_threshold, info.threshold_rule = t.image, t.pixel, "held-out"
    export_onnx(net, info, onnx_path)
    np.save(out / f"{name}.prototypes.npy", prototypes)
    if fitted:
        fitted.save(out / f"{name}.projection.npz")
    Bundle(out / name).seal(info).save_json(out / f"{name}.json")
    return onnx_path
