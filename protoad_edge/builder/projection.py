"""The optional projection before the prototype stage (``protoad-export --project-dims D``, issue 18).

The paper compares every patch with every prototype in all 1792 channels: 2 x h*w x 1792 x K FLOPs
per image, the largest cost of the network at typical K. Comparing in D principal directions costs
2 x h*w x D x (1792 + K) (the projection, then the prototypes). Centring first (subtracting the mean)
matters: the patch vectors share a large common direction, which an uncentred basis spends its first
component on and which says nothing about which prototype is nearest (uncentred, the cosine in the
subspace is dominated by it). FINCH still clusters in all 1792 dimensions: in the projected space it
found other levels with the same accuracy at a given K, and the projected network keeps the prototypes
of the paper's network it is compared with. The measurements behind the choices are in
benchmarks/RESULTS.md (``bench_projection.py``).

The fit is a PCA of a seeded sample of the training patch vectors (``FIT_ROWS``): their mean (zeros
when not centred) and the top-D right singular vectors of the (centred) rows, largest first. Measured
against a PCA of the prototypes, the sample gave a better PRO in every pair (+0.2 to +5.2 points) and a
better pixel AUROC at D = 256 on both categories at both K, and it does not depend on which FINCH level
was chosen. D stays at most K: more dimensions than prototypes cannot separate them better. Stored as
``NAME.projection.npz`` (``mean`` [1792], ``matrix`` [D,1792]) and described in the sidecar's
``projection`` record, so the torch backend rebuilds the same network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import FEATURE_CHANNELS
from ..errors import ProtoADError

FITTED_ON = "patch vectors"
FIT_ROWS = 50_000  # training patch vectors in the sample the projection is fitted on
CHUNK_ROWS = 8192  # rows per product while fitting


@dataclass
class FittedProjection:
    """What ``fit_projection`` found: the mean to subtract and the orthonormal D x C matrix."""

    mean: np.ndarray  # float32 [C]; zeros when not centred
    matrix: np.ndarray  # float32 [D, C]: orthonormal rows, the largest principal direction first
    centred: bool
    fitted_on: str  # what the rows were, for the record ("patch vectors")
    rows: int  # how many
    variance_kept: float  # share of the rows' (centred) sum of squares that the D directions hold

    @property
    def dims(self) -> int:
        return self.matrix.shape[0]

    @property
    def record(self) -> dict[str, Any]:
        """The sidecar's ``projection`` field (an identity field: the ONNX metadata must carry the same)."""
        return {
            "dims": self.dims,
            "centred": self.centred,
            "fitted_on": self.fitted_on,
            "rows": self.rows,
            "variance_kept": round(self.variance_kept, 6),
        }

    def module(self) -> Any:
        """The network's ``Projection`` (imports torch only when a network is built)."""
        import torch

        from .network import Projection

        return Projection(torch.from_numpy(self.mean), torch.from_numpy(self.matrix))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mean`` and ``matrix`` as an ``.npz`` (the caller renames it into place)."""
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, matrix=self.matrix)


def check_dims(dims: int, channels: int = FEATURE_CHANNELS, prototypes: int | None = None) -> None:
    """Refuse a --project-dims that cannot reduce the features (checked before anything is extracted), or
    that exceeds the number of prototypes (checked after clustering)."""
    if not 1 <= dims < channels:
        raise ProtoADError(
            f"bad --project-dims {dims}: must be between 1 and {channels - 1} "
            f"(fewer than the features' {channels} channels)"
        )
    if prototypes is not None and dims > prototypes:
        raise ProtoADError(
            f"bad --project-dims {dims}: more than the {prototypes:,} prototypes FINCH found "
            f"(choose at most {prototypes:,}, or raise --max-prototypes)"
        )


def sample_rows(vectors: np.ndarray, rows: int = FIT_ROWS, seed: int = 0) -> np.ndarray:
    """Up to ``rows`` rows of ``vectors`` (may be a memmap): a seeded sample, in file order."""
    if len(vectors) <= rows:
        return np.asarray(vectors)
    return np.asarray(vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), rows, replace=False))])


def fit_projection(rows: np.ndarray, dims: int, centred: bool = True, fitted_on: str = FITTED_ON) -> FittedProjection:
    """PCA of ``rows`` [M,C] (float16/32): their mean (if ``centred``) and top-``dims`` right singular vectors.

    Computed from the C x C second-moment matrix, accumulated ``CHUNK_ROWS`` rows at a time (M is up to
    ``FIT_ROWS``, C 1792; 2-14 s on 2 shared cores), with each direction's sign fixed (its largest component
    positive) so equal inputs give equal files.
    """
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"expected [M,C] rows, got shape {list(rows.shape)}")
    check_dims(dims, rows.shape[1])
    if dims > len(rows):
        raise ProtoADError(
            f"bad --project-dims {dims}: more than the {len(rows):,} {fitted_on} the projection is fitted on"
        )
    c, starts = rows.shape[1], range(0, len(rows), CHUNK_ROWS)
    mean = np.zeros(c)
    if centred:
        for i in starts:
            mean += np.asarray(rows[i : i + CHUNK_ROWS], dtype=np.float64).sum(axis=0)
        mean /= len(rows)
    moment = np.zeros((c, c))
    for i in starts:  # float32 products (the BLAS's fast path), summed in float64
        chunk = (np.asarray(rows[i : i + CHUNK_ROWS], dtype=np.float64) - mean).astype(np.float32)
        moment += chunk.T @ chunk
    values, vectors = np.linalg.eigh(moment)  # all of them: 4x faster here than scipy's subset driver
    values, vectors = values[::-1][:dims], vectors[:, ::-1][:, :dims].T  # largest first, one direction per row
    signs = np.sign(vectors[np.arange(dims), np.abs(vectors).argmax(axis=1)])
    total = float(np.trace(moment))
    kept = float(np.clip(values, 0.0, None).sum() / total) if total > 0 else 1.0
    return FittedProjection(
        mean=mean.astype(np.float32),
        matrix=(vectors * signs[:, None]).astype(np.float32),
        centred=centred,
        fitted_on=fitted_on,
        rows=len(rows),
        variance_kept=kept,
    )


def load_projection(path: str | os.PathLike, record: dict[str, Any]) -> FittedProjection:
    """The ``NAME.projection.npz`` a bundle's sidecar ``record`` describes, checked against it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            mean, matrix = np.asarray(data["mean"], np.float32), np.asarray(data["matrix"], np.float32)
    except FileNotFoundError:
        raise ProtoADError(
            f"projection not found: {path} (written beside the model by protoad-export --project-dims)"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ProtoADError(f"cannot read projection {path}: {exc}") from None
    dims = record.get("dims")
    if matrix.shape != (dims, FEATURE_CHANNELS) or mean.shape != (FEATURE_CHANNELS,):
        raise ProtoADError(
            f"{path}: mean {list(mean.shape)} and matrix {list(matrix.shape)} do not match the "
            f"metadata ({dims} x {FEATURE_CHANNELS})"
        )
    return FittedProjection(
        mean=mean,
        matrix=matrix,
        centred=bool(record.get("centred", True)),
        fitted_on=str(record.get("fitted_on", FITTED_ON)),
        rows=int(record.get("rows", 0)),
        variance_kept=float(record.get("variance_kept", float("nan"))),
    )


def stage_flops(positions: int, prototypes: int, dims: int | None = None, channels: int = FEATURE_CHANNELS) -> int:
    """Multiply-add FLOPs per image of the prototype stage at ``positions`` (h*w) patches, including the
    projection when there is one: 2*hw*C*K (the paper) or 2*hw*D*(C + K)."""
    if dims is None:
        return 2 * positions * channels * prototypes
    return 2 * positions * dims * (channels + prototypes)
