"""Approximate cosine first neighbours for large FINCH levels on the CPU, and the choice of search.

Exact search costs N^2 x D multiply-adds: for a category's ~600k-1M patch vectors of 1792 on a
few CPU cores, hours. Here rows are projected to a ``dims``-dimensional subspace (the top principal
directions of the uncentred second moment of a row sample, so dot products there approximate the
full ones) and split into k-means lists there (IVF); each row is compared, in the subspace, with
the members of its ``probes`` nearest lists only, keeps its ``candidates`` best, and the winner is
re-ranked among them in full dimension in float32. With about sqrt(N) lists the cost grows as
N^1.5 rather than N^2. A row's true neighbour is missed if it lies outside the probed lists or
outside the row's top candidates in the subspace.
"""

from __future__ import annotations

import functools
import math
import warnings
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
from .gpu_neighbours import gpu_first_neighbours
from .progress import progress_bar

# rows; below this exact search takes under a minute on 2 cores. Approximate is faster from about 20k,
# but on hard data (clusters far more numerous than the k-means lists) its recall there fell to 0.62.
APPROXIMATE_FROM = 50_000
DEFAULT_DIMS = 512  # real patch features: 256 ranked the true neighbour in the top 8 for only 92% of rows
DEFAULT_CANDIDATES = 8  # re-ranked per row; 16 found no more true neighbours on real-like features
DEFAULT_SAMPLE = 10_000
DEFAULT_PROBES = 4  # at 512 dims the true neighbour's list is among a row's 4 nearest for 98.8% of rows
DEFAULT_ITERATIONS = 10
LISTS_PER_ROOT = 2  # lists per sqrt(N): balances assigning rows to lists against searching them
TRAIN_PER_LIST = 16  # k-means sample rows per list: enough to place lists that are only probed


def make_search(device: str = "cpu", *, exact: bool = False, approximate_from: int = APPROXIMATE_FROM,
                scratch_bytes: int = DEFAULT_SCRATCH_BYTES, log: Callable[[str], None] = print) -> Search:
    """The first-neighbour search for ``finch(search=...)``.

    On a GPU: ``gpu_first_neighbours``, exact (FP16 products checked in FP32; with ``exact``, FP32
    products throughout). On the CPU: exact with ``exact``, for inputs below ``approximate_from`` rows
    (FINCH's later levels are much smaller than level 0, so they usually run exact) and for rows of
    at most ``DEFAULT_DIMS`` dimensions (nothing to gain); otherwise ``approximate_first_neighbours``.
    """
    if device != "cpu":
        return functools.partial(gpu_first_neighbours, device=device, precision="fp32" if exact else "fp16", log=log)
    exact_search = functools.partial(first_neighbours, scratch_bytes=scratch_bytes)
    if exact:
        return exact_search

    def search(x: np.ndarray, *, progress: str | None = None) -> Neighbours:
        if len(x) < approximate_from or x.shape[1] <= DEFAULT_DIMS:
            return exact_search(x, progress=progress)
        log(f"first neighbours: approximate ({DEFAULT_DIMS} of {x.shape[1]} dims, {DEFAULT_PROBES} nearest k-means "
            f"lists, top {DEFAULT_CANDIDATES} re-ranked exactly) for {len(x):,} rows; --exact-neighbours for exact")
        return approximate_first_neighbours(x, scratch_bytes=scratch_bytes, progress=progress)

    return search


def approximate_first_neighbours(x: np.ndarray, *, dims: int = DEFAULT_DIMS, candidates: int = DEFAULT_CANDIDATES,
                                 sample: int = DEFAULT_SAMPLE, seed: int = 0, lists: int | None = None,
                                 probes: int = DEFAULT_PROBES, iterations: int = DEFAULT_ITERATIONS,
                                 scratch_bytes: int = DEFAULT_SCRATCH_BYTES, progress: str | None = None) -> Neighbours:
    """Cosine first neighbours of the rows of ``x`` (float16/32, may be a memmap), approximately.

    Candidates: the ``candidates`` most similar rows in the projected space among the members of
    the row's ``probes`` nearest k-means lists (``lists``, default about ``LISTS_PER_ROOT`` x sqrt(N));
    the answer: the most similar candidate in full float32, ties to the lowest index. Besides
    scratch it holds the projection (N x ``dims`` float32) and N x ``probes`` x ``candidates``
    partial results (12 bytes each). Inputs too small to gain (N <= candidates + 1, or dims >= D)
    are searched exactly. ``progress``: a progress bar's label (over the lists), or None.
    """
    n, dim = x.shape
    dims = min(dims, dim)
    if n <= candidates + 1 or dims >= dim:
        return first_neighbours(x, scratch_bytes=scratch_bytes, progress=progress)
    y = _project(x, _basis(x, dims, sample, seed), scratch_bytes)
    lists = min(n, lists or max(1, round(LISTS_PER_ROOT * math.sqrt(n))))
    centroids = _kmeans(y, lists, iterations, seed, scratch_bytes)
    near = _candidates(y, centroids, min(probes, lists), candidates, scratch_bytes, progress)
    return _rerank(x, near, scratch_bytes)


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


def _kmeans(y: np.ndarray, lists: int, iterations: int, seed: int, scratch_bytes: int) -> np.ndarray:
    """float32 [lists, dims]: spherical k-means centroids (Lloyd) of ``TRAIN_PER_LIST`` x ``lists`` sampled rows.

    Started from random sample rows; a list that empties keeps its previous centroid.
    """
    rng = np.random.default_rng(seed)
    train = y[np.sort(rng.choice(len(y), min(len(y), TRAIN_PER_LIST * lists), replace=False))]
    centroids = train[np.sort(rng.choice(len(train), lists, replace=False))].copy()
    for _ in range(iterations):
        label = _nearest(train, centroids, 1, scratch_bytes)[:, 0]
        order = np.argsort(label, kind="stable")
        present, first = np.unique(label[order], return_index=True)
        sums = np.add.reduceat(train[order], first, axis=0)
        centroids[present] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return centroids


def _nearest(y: np.ndarray, centroids: np.ndarray, p: int, scratch_bytes: int) -> np.ndarray:
    """int64 [N, p]: each row's ``p`` most similar centroids, best first (the first: its list)."""
    out = np.empty((len(y), p), np.int64)
    rows = _chunk(scratch_bytes, 8 * len(centroids))
    for start in range(0, len(y), rows):
        s = np.matmul(y[start:start + rows], centroids.T)
        out[start:start + len(s)] = torch.from_numpy(s).topk(p, dim=1).indices.numpy()
    return out


def _candidates(y: np.ndarray, centroids: np.ndarray, p: int, c: int, scratch_bytes: int,
                progress: str | None) -> np.ndarray:
    """int64 [N, c]: each row's ``c`` most similar other rows of ``y`` in its ``p`` nearest lists, any order.

    Every row belongs to its nearest centroid's list. List by list, the rows that probe it are
    multiplied with its members (query blocks within ``scratch_bytes``), so pairs cost about
    N x p x N / lists products instead of N^2 / 2; each (row, probe) keeps its best ``c``. A row
    whose probed lists hold no other row (degenerate lists) is searched against all rows.
    """
    n = len(y)
    near = _nearest(y, centroids, p, scratch_bytes)
    members = np.argsort(near[:, 0], kind="stable")  # by list, then by index
    member_bounds = np.concatenate([[0], np.cumsum(np.bincount(near[:, 0], minlength=len(centroids)))])
    probing = np.argsort(near.ravel(), kind="stable")  # (row, probe) entries by list
    probing_bounds = np.concatenate([[0], np.cumsum(np.bincount(near.ravel(), minlength=len(centroids)))])
    vals = np.full((n, p, c), -np.inf, np.float32)
    idx = np.full((n, p, c), -1, np.int64)
    for j in progress_bar(list(range(len(centroids))), progress or "", progress is not None):
        mine = members[member_bounds[j]:member_bounds[j + 1]]
        if len(mine) == 0:
            continue
        entries = probing[probing_bounds[j]:probing_bounds[j + 1]]
        k, block = min(c, len(mine)), y[mine]
        step = _chunk(scratch_bytes, 8 * len(mine))
        for q0 in range(0, len(entries), step):
            rows, slot = np.divmod(entries[q0:q0 + step], p)
            s = np.matmul(y[rows], block.T)
            own = np.flatnonzero(near[rows, 0] == j)  # the row itself is a member: never its own neighbour
            s[own, np.searchsorted(mine, rows[own])] = -np.inf
            # torch's top-k: several times faster than numpy's argpartition
            best, top = (t.numpy() for t in torch.from_numpy(s).topk(k, dim=1, sorted=False))
            vals[rows, slot, :k] = best
            idx[rows, slot, :k] = np.where(np.isfinite(best), mine[top], -1)
    return _best(y, vals.reshape(n, -1), idx.reshape(n, -1), c, scratch_bytes)


def _best(y: np.ndarray, vals: np.ndarray, idx: np.ndarray, c: int, scratch_bytes: int) -> np.ndarray:
    """int64 [N, c]: the ``c`` best of each row's partial results; slots without one repeat its best."""
    n = len(y)
    out = np.empty((n, c), np.int64)
    step = _chunk(scratch_bytes, 12 * vals.shape[1])
    for start in range(0, n, step):
        v, i = vals[start:start + step], idx[start:start + step]
        top = np.argpartition(v, v.shape[1] - c, axis=1)[:, v.shape[1] - c:]
        cand, cand_vals = np.take_along_axis(i, top, axis=1), np.take_along_axis(v, top, axis=1)
        first = np.take_along_axis(cand, cand_vals.argmax(axis=1)[:, None], axis=1)
        out[start:start + len(v)] = np.where(cand >= 0, cand, first)
    lonely = np.flatnonzero(out[:, 0] < 0)
    step = _chunk(scratch_bytes, 8 * n)
    for start in range(0, len(lonely), step):
        rows = lonely[start:start + step]
        s = np.matmul(y[rows], y.T)
        s[np.arange(len(rows)), rows] = -np.inf
        out[rows] = np.argpartition(s, n - c, axis=1)[:, n - c:]
    return out


def _rerank(x: np.ndarray, cand: np.ndarray, scratch_bytes: int) -> Neighbours:
    """The most similar candidate of each row in full float32; ties go to the lowest index.

    Rows were checked finite by the projection. This pass reads N x candidates rows in random
    order, so it runs in torch: a gather of the stored rows (FP16 from the cache) and one batched
    product, with the norms applied to the products instead of to the rows.
    """
    n, dim = x.shape
    c = cand.shape[1]
    with warnings.catch_warnings():  # read-only memmap: torch warns that it cannot protect it; nothing writes
        warnings.simplefilter("ignore", UserWarning)
        xt = torch.from_numpy(np.asarray(x))
    rows = _chunk(scratch_bytes, 4 * dim * (c + 1) + xt.element_size() * dim * c)
    inverse = torch.empty(n)
    for start in range(0, n, rows):
        norms = torch.linalg.vector_norm(xt[start:start + rows].float(), dim=1)
        inverse[start:start + rows] = 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny)
    cand = torch.from_numpy(np.sort(cand, axis=1))  # max takes the first maximum: the lowest index among ties
    index = torch.empty(n, dtype=torch.int64)
    similarity = torch.empty(n)
    for start in range(0, n, rows):
        a = xt[start:start + rows].float()
        block = cand[start:start + len(a)]
        others = xt.index_select(0, block.reshape(-1)).float().view(len(a), c, dim)
        s = torch.bmm(others, a[:, :, None])[:, :, 0] * inverse[block] * inverse[start:start + len(a), None]
        best, pick = s.max(dim=1)
        index[start:start + len(a)] = block.gather(1, pick[:, None])[:, 0]
        similarity[start:start + len(a)] = best
    return Neighbours(index.numpy(), similarity.numpy())
