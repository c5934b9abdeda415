"""What a build is asked to do: ``protoad-export``'s options, with their defaults in one place (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROJECTIONS = ("centred", "uncentred")  # --projection (builder/projection.py)


@dataclass
class BuildConfig:
    category: str
    data_root: Path | None = None  # None: $PROTOAD_DATA, then ./data
    dataset: str = "mvtec"  # constants.DATASET_KINDS
    out: Path = Path("models")
    weights: str = "imagenet"  # imagenet | none (seeded random) | PATH to a state_dict
    feature_upsample: str = "bilinear"  # constants.UPSAMPLE_MODES
    max_prototypes: int = 10_000  # take the first FINCH partition with fewer clusters than this
    val_split: float = 0.1  # share of normal training images held out to set thresholds
    device: str = "auto"  # constants.DEVICES
    seed: int = 0
    resize: int = 256
    crop: int = 224
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in source-image pixels; None: the whole image
    fit: str = "crop"  # how the region becomes the square input (preprocess.FITS)
    batch_size: int = 8
    threads: int = 0  # torch CPU threads; 0 = all cores
    progress: bool = True
    cache_dir: Path | None = None  # None: feature_cache.default_cache_dir()
    cache: bool = True  # False: extract into a temporary file in ``out``, reuse nothing
    exact_neighbours: bool = False  # False: approximate first neighbours on the CPU for large levels
    memory_limit: int | None = None  # bytes of anonymous memory for the build; None: build.memory.default_limit
    tensorrt: str = "auto"  # constants.TENSORRT_CHOICES: also build NAME.plan where TensorRT and a GPU exist
    precision: str = "fp16"  # TensorRT engine precision (constants.ENGINE_PRECISIONS)
    opt_batch: int = 1  # batch TensorRT optimises for
    max_batch: int | None = None  # largest engine batch; None: most under 2^31 elements, at most 32
    project_dims: int | None = (
        None  # compare patches and prototypes in a D-dim PCA subspace; None: all 1792 (the paper)
    )
    projection: str = "centred"  # PROJECTIONS: subtract the patch vectors' mean before projecting, or not
