"""A disk cache of training patch features: FP16 ``.npy`` files filled batch by batch, read as memmaps.

Extraction is the build's slowest step on a CPU and its output ([N*h*w, 1792]) does not fit in
memory for large categories. Writing it straight into a memory-mapped file keeps memory bounded,
and keying the file by everything the features depend on lets a rebuild with another
``--max-prototypes`` skip extraction. FP16 halves the file; FINCH converts chunks to FP32 as it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..atomic import atomic_path

DTYPE = np.float16


def default_cache_dir() -> Path:
    """``$PROTOAD_CACHE``, else ``~/.cache/protoad-edge/features``."""
    env = os.environ.get("PROTOAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "protoad-edge" / "features"


def features_key(
    *,
    dataset: str,
    category: str,
    images: Sequence[Path],
    weights: str,
    resize: int,
    crop: int,
    feature_upsample: str,
    region: object = None,
    version: str = __version__,
) -> str:
    """Hex digest of everything the features depend on.

    ``images`` are taken in row order (the rows follow it), each with its size and mtime, so an
    edited or replaced image invalidates the entry. ``weights`` is ``build_backbone``'s description
    (it names the seed, or the weights file's hash).
    """
    files = []
    for path in images:
        st = Path(path).stat()
        files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    parts = dict(
        dataset=dataset,
        category=category,
        images=files,
        weights=weights,
        resize=resize,
        crop=crop,
        feature_upsample=feature_upsample,
        version=version,
    )
    if region is not None:  # the ROI and fit; absent for the paper's whole-image crop, so older entries stay valid
        parts["region"] = region
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_features(
    directory: Path,
    key: str,
    shape: tuple[int, int],
    fill: Callable[[np.ndarray], None],
    *,
    keep: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, bool]:
    """(read-only FP16 memmap of the features, whether the cache had them), calling ``fill(out)`` to
    write them only on a miss.

    ``fill`` gets a writable FP16 memmap of ``shape`` and fills it (batch by batch: it is on disk).
    The file becomes ``directory/<key>.npy`` only once ``fill`` has returned (an interrupted run leaves
    no entry). An entry of another shape or dtype is rebuilt. With ``keep`` False (``--no-cache``) the
    file is a temporary one in ``directory``, unlinked at once (the mapping keeps it alive), and
    nothing is looked up.
    """
    if not keep:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".protoad-features.", suffix=".npy", dir=directory) as tmp:
            _write(Path(tmp.name), shape, fill)
            return np.load(tmp.name, mmap_mode="r"), False
    path = Path(directory) / f"{key}.npy"
    if path.is_file():
        try:
            hit = np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            hit = None
        if hit is not None and hit.shape == tuple(shape) and hit.dtype == DTYPE:
            log(f"features: cache hit {path}")
            return hit, True
    with atomic_path(path) as tmp:
        _write(tmp, shape, fill)
    log(f"features: cached at {path}")
    return np.load(path, mmap_mode="r"), False


def _write(path: Path, shape: tuple[int, int], fill: Callable[[np.ndarray], None]) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=tuple(shape))
    try:
        fill(out)
        out.flush()
    finally:
        del out
