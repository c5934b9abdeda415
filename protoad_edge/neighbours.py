"""Approximate cosine first neighbours for large FINCH levels on the CPU, and the choice of search.

Exact search costs N^2 x D multiply-adds: for a category's ~600k-1M patch vectors of 1792 on a
few CPU cores, hours. Here the candidates come from a search in a ``dims``-dimensional subspace
(the top principal directions of the uncentred second moment of a row sample, so dot products
there approximate the full ones), ``candidates`` per row, and the winner is then re-ranked among
them in full dimension in float32. The cost is about D / dims times lower; a row's true neighbour
is missed only if it is not among its top candidates in the subspace.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from .errors import ProtoADError
from .finch import (
    DEFAULT_SCRATCH_BYTES,
    Neighbours,
    Search,
    first_neighbours,
    load_normalised,
)

APPROXIMATE_FROM = 50_000  # rows; below this exact search takes at most minutes on a CPU
DEFAULT_DIMS = 256
DEFAULT_CANDIDATES = 16
DEFAULT_SAMPLE = 10_000


def make_search(device: str = "cpu", *, exact: bool = False, approximate_from: int = APPROXIMATE_FROM,
                scratch_bytes: int = DEFAULT_SCRATCH_BYTES, log: Callable[[str], None] = print) -> Search:
    """The first-neighbour search for ``finch(search=...)``.

    Exact on a GPU (fast enough there), with ``exact``, for inputs below ``approximate_from`` rows
    (FINCH's later levels are much smaller than level 0, so they usually run exact) and for rows of
    at most ``DEFAULT_DIMS`` dimensions (nothing to gain); otherwise ``approximate_first_neighbours``.
    """
    exact_search = functools.partial(first_neighbours, device=device, scratch_bytes=scratch_bytes)
    if exact or device != "cpu":
        return exact_search

    def search(x: np.ndarray) -> Neighbours:
        if len(x) < approximate_from or x.shape[1] <= DEFAULT_DIMS:
            return exact_search(x)
        log(f"first neighbours: approximate ({DEFAULT_DIMS} of {x.shape[1]} dims, top {DEFAULT_CANDIDATES} "
            f"re-ranked exactly) for {len(x):,} rows; --exact-neighbours for exact")
        return approximate_first_neighbours(x, scratch_bytes=scratch_bytes)

    return search


def approximate_first_neighbours(x: np.ndarray, *, dims: int = DEFAULT_DIMS, candidates: int = DEFAULT_CANDIDATES,
                                 sample: int = DEFAULT_SAMPLE, seed: int = 0,
                                 scratch_bytes: int = DEFAULT_SCRATCH_BYTES) -> Neighbours:
    """Cosine first neighbours of the rows of ``x`` (float16/32, may be a memmap), approximately.

    Candidates: the ``candidates`` most similar rows in the projected space (tiled products,
    each tile within about ``scratch_bytes``); the answer: the most similar candidate in full
    float32, ties to the lowest index. Besides the tiles it holds the projection, N x ``dims`` float32.
    Inputs too small to gain (N <= candidates + 1, or dims >= D) are searched exactly.
    """
    n, dim = x.shape
    dims = min(dims, dim)
    if n <= candidates + 1 or dims >= dim:
        return first_neighbours(x, scratch_bytes=scratch_bytes)
    y = _project(x, _basis(x, dims, sample, seed), scratch_bytes)
    return _rerank(x, _candidates(y, candidates, scratch_bytes), scratch_bytes)


def _chunk(scratch_bytes: int, row_bytes: int) -> int:
    return max(1, scratch_bytes // max(1, row_bytes))


def _basis(x: np.ndarray, dims: int, sample: int, seed: int) -> np.ndarray:
    """float32 [D, dims]: top eigenvectors of the second moment of up to ``sample`` normalised rows."""
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False))
    s = np.asarray(x[rows], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(s).all(axis=1))
    if len(bad):
        raise ProtoADError(f"features row {rows[bad[0]]} contains NaN or infinite values")
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    d = x.shape[1]
    _, vectors = scipy.linalg.eigh(s.T @ s, subset_by_index=[d - dims, d - 1], driver="evr")
    return np.ascontiguousarray(vectors[:, ::-1])


def _project(x: np.ndarray, basis: np.ndarray, scratch_bytes: int) -> np.ndarray:
    """float32 [N, dims]: the normalised rows in the basis."""
    y = np.empty((len(x), basis.shape[1]), np.float32)
    buffer = np.empty((_chunk(scratch_bytes, 8 * x.shape[1]), x.shape[1]), np.float32)
    for start in range(0, len(x), len(buffer)):
        block = load_normalised(x, start, buffer)
        np.matmul(block, basis, out=y[start:start + len(block)])
    return y


def _candidates(y: np.ndarray, c: int, scratch_bytes: int) -> np.ndarray:
    """int64 [N, c]: each row's ``c`` most similar other rows of ``y`` (by dot product), in any order.

    Only tiles on and above the diagonal are computed; each serves its rows and its columns. A
    full top-k of every tile would cost more than its product, so each row keeps its best ``c`` so
    far (sorted), and a tile only offers the entries above a row's current c-th best: after the
    first tiles, few. A side of a tile with many such entries (a row's first offers) takes torch's
    top-k instead (several times faster than numpy's argpartition; the tile is shared, not copied).
    """
    n = len(y)
    b = min(n, max(c + 1, int(math.sqrt(scratch_bytes / 5))))  # float32 tile and a boolean mask of it
    vals = np.full((n, c), -np.inf, np.float32)
    idx = np.zeros((n, c), np.int64)
    tile = np.empty(b * b, np.float32)
    mask = np.empty(b * b, bool)

    def offer(start: int, s: np.ndarray, offset: int) -> None:
        """Offer tile ``s`` (rows: rows ``start...``; columns: rows ``offset...``) to the running best."""
        hit = mask[:s.size].reshape(s.shape)
        np.greater(s, vals[start:start + len(s), -1:], out=hit)
        local, col = np.nonzero(hit)
        if len(local) > 2 * c * len(s):
            top = torch.from_numpy(s).topk(min(c, s.shape[1]), dim=1)
            local = np.repeat(np.arange(len(s)), top.indices.shape[1])
            col = top.indices.numpy().ravel()
        if len(local) == 0:
            return
        rows = np.unique(local) + start
        all_rows = np.concatenate([np.repeat(rows, c), local + start])
        all_vals = np.concatenate([vals[rows].ravel(), s[local, col]])
        all_idx = np.concatenate([idx[rows].ravel(), col + offset])
        order = np.lexsort((-all_vals, all_rows))  # by row, then best first
        first = np.searchsorted(all_rows[order], rows)
        keep = order[(first[:, None] + np.arange(c)).ravel()]
        vals[rows] = all_vals[keep].reshape(-1, c)
        idx[rows] = all_idx[keep].reshape(-1, c)

    for i0 in range(0, n, b):
        a = y[i0:i0 + b]
        for j0 in range(i0, n, b):
            other = y[j0:j0 + b]
            s = tile[:len(a) * len(other)].reshape(len(a), len(other))
            np.matmul(a, other.T, out=s)
            if j0 == i0:
                np.fill_diagonal(s, -np.inf)
            offer(i0, s, j0)
            if j0 != i0:
                offer(j0, s.T, i0)
    return idx


def _rerank(x: np.ndarray, cand: np.ndarray, scratch_bytes: int) -> Neighbours:
    """The most similar candidate of each row in full float32; ties go to the lowest index."""
    n, dim = x.shape
    c = cand.shape[1]
    cand = np.sort(cand, axis=1)  # argmax takes the first maximum: the lowest index among ties
    index = np.empty(n, np.int64)
    similarity = np.empty(n, np.float32)
    rows = _chunk(scratch_bytes, 4 * dim * (c + 1))
    own = np.empty((rows, dim), np.float32)
    for start in range(0, n, rows):
        a = load_normalised(x, start, own)
        block = cand[start:start + len(a)]
        present, inverse = np.unique(block, return_inverse=True)
        others = load_normalised(np.asarray(x[present]), 0, np.empty((len(present), dim), np.float32))
        s = np.matmul(others[inverse.reshape(block.shape)], a[:, :, None])[:, :, 0]
        best = s.argmax(axis=1)
        index[start:start + len(a)] = block[np.arange(len(a)), best]
        similarity[start:start + len(a)] = s[np.arange(len(a)), best]
    return Neighbours(index, similarity)
