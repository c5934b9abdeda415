"""FINCH clustering (Sarfraz et al., CVPR 2019) of patch features into prototypes, with cosine similarity.

Our own implementation rather than ``finch-clust``: that package computes exact neighbours with a dense
N x N distance matrix (and switches to approximate search above 20,000 points), while a category has
about a million patch vectors. Here the exact first neighbours come from tiled matrix products in
bounded memory, and the partitions equal ``finch-clust``'s exact path level by level (the tests check it).

``finch-clust`` rules replicated so that partitions match (its exact path, below ``ann_threshold``):

- Neighbours: the nearest non-self point by cosine similarity, ties to the lowest index.
- Clusters: weakly connected components of the graph i -> nn(i) (the paper's three linking rules).
- Level means are means of the original points (not means of means).
- A level that ends at 1 cluster, or merges at most one pair (count drops by <= 1), is discarded and
  the recursion stops.

Not replicated because it has no effect there: ``ensure_early_exit`` (default True) caps later levels'
edges at the largest level-0 first-neighbour distance, but it "removes" an edge by storing an explicit
zero in the sparse graph, which ``scipy.sparse.csgraph.connected_components`` still counts as an edge;
so its partitions are those without the cap, and so are ours (the tests compare with it switched on).

Partitions can differ from ``finch-clust`` only where two candidate neighbours are equally similar up
to rounding: it computes level 0 in float32 and later levels in float64, we compute all in float32,
with other summation orders (and it clips cosines above 1, so those all tie).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..errors import ProtoADError
from ..progress import progress_bar
from .memory import MemoryBudget, release_free_heap

DEFAULT_MAX_PROTOTYPES = 10_000
DEFAULT_SCRATCH_BYTES = 256 * 2**20


class Neighbours(NamedTuple):
    """Each row's first (nearest non-self) neighbour and the cosine similarity to it."""

    index: np.ndarray  # int64 [N]
    similarity: np.ndarray  # float32 [N]


class Search(Protocol):
    """A first-neighbour search: rows (any scale; cosine similarity) -> Neighbours, with a progress bar
    labelled ``progress`` unless it is None. ``first_neighbours`` is the exact CPU search; the others
    (approximate, GPU) plug into ``finch(search=...)`` through ``neighbours.make_search``.

    A search may also have ``next_level(labels, count)``: FINCH calls it after each level's search with how
    that level's rows are summed into the next level's (``count`` groups), or with None when there is no
    next level, so that a search can build the next level's input from what it kept (the approximate one
    sums its projections) and free the rest before FINCH allocates level 0's sums."""

    def __call__(self, x: np.ndarray, *, progress: str | None = None) -> Neighbours: ...


def tile_rows(n: int, dim: int, itemsize: int, scratch_bytes: int) -> int:
    """Side of the square tiles for N rows: about N/8, at least 1024, and within ``scratch_bytes``.

    With t tiles per side the diagonal tiles, computed whole, add about 1/t to the half matrix's
    work, so t should not be small; but every tile reloads a row block, and below about 1024 rows
    that costs more than it saves. Scratch per tile: two float32 row blocks (b x dim each), a staging
    block in the input dtype (b x dim x itemsize), the float32 similarity tile and a boolean mask of
    it (b x b each).
    """
    p = (8 + itemsize) * dim
    fits = int((-p + math.sqrt(p * p + 20 * scratch_bytes)) / 10)
    return max(1, min(n, fits, max(1024, -(-n // 8))))


def first_neighbours(
    x: np.ndarray, *, scratch_bytes: int = DEFAULT_SCRATCH_BYTES, block: int | None = None, progress: str | None = None
) -> Neighbours:
    """Exact cosine first neighbours of the rows of ``x`` (float16/32/64, may be a ``np.memmap``).

    Rows need not be normalised: each block is converted to float32 and L2-normalised as it is loaded
    (zero rows stay zero), so the input is never copied whole. Only the tiles on and above the
    diagonal of the similarity matrix are computed, ``block`` x ``block`` each (default: ``tile_rows``,
    within ``scratch_bytes``); a tile serves the row-wise and the column-wise search, so each pair's
    similarity is computed once and no N x N matrix ever exists. Ties go to the lowest index. This is
    the CPU search (float32 BLAS); ``gpu_neighbours`` is the GPU one, with the same answers.
    A single row has no non-self neighbour: it gets itself, with similarity -inf.
    """
    n, dim = _check_features(x)
    b = min(n, block or tile_rows(n, dim, x.dtype.itemsize, scratch_bytes))
    tiles = _NumpyTiles(x, b)
    best = np.full(n, -np.inf, np.float32)
    arg = np.zeros(n, np.int64)
    starts = list(range(0, n, b))
    for i0 in progress_bar(
        starts, progress or "", progress is not None, unit="vectors", sizes=[min(b, n - i) for i in starts]
    ):
        a = tiles.load(i0, 0)
        for j0 in range(i0, n, b):
            diagonal = j0 == i0
            s = tiles.similarities(a, a if diagonal else tiles.load(j0, 1), diagonal)
            _offer(best, arg, i0, *tiles.row_max(s), j0)
            if not diagonal:
                _offer(best, arg, j0, *tiles.col_max(s), i0)
    return Neighbours(arg, best)


@dataclass
class FinchResult:
    """The FINCH levels up to the chosen one (the last) and its prototypes."""

    partitions: list[np.ndarray]  # int64 labels [N] per level, 0..count-1
    counts: list[int]  # clusters per level
    prototypes: np.ndarray  # float32 [K, D]: L2-normalised means of the chosen partition's clusters
    level_seconds: list[float]  # wall time per level

    @property
    def chosen(self) -> int:
        """Index of the chosen level."""
        return len(self.partitions) - 1

    @property
    def labels(self) -> np.ndarray:
        """Cluster of each input row in the chosen partition (row k of ``prototypes``)."""
        return self.partitions[-1]


def finch(
    x: np.ndarray,
    max_prototypes: int = DEFAULT_MAX_PROTOTYPES,
    *,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    search: Search | None = None,
    progress: bool = False,
    budget: MemoryBudget | None = None,
    log: Callable[[str], None] = print,
) -> FinchResult:
    """FINCH levels on the rows of ``x`` (L2-normalised patch features, float16/32, may be a memmap).

    Stops at the first partition with fewer than ``max_prototypes`` clusters, or, if none gets there,
    at the last partition before merging stops (the module docstring lists the rules). Prototypes are
    the re-normalised means of the chosen clusters, so a 1x1 convolution with them gives cosines.
    ``search`` defaults to the exact CPU ``first_neighbours`` within ``scratch_bytes``
    (``neighbours.make_search`` picks the build's: approximate for large inputs, or the GPU's).
    Cluster sums are accumulated in float32 ([K0, D] at level 0: 1.2 GB for 161k clusters of 1792;
    float64 would double the largest allocation of a build for digits the search cannot use), through
    ``budget`` (default: unbounded): spilled to disk when they do not fit, the same float32 either way.
    Each later level's sums are summed in the first rows of the level before's (``sum_groups_in_place``).
    ``progress`` shows a bar per level's search.
    """
    n, dim = _check_features(x)
    if max_prototypes < 1:
        raise ValueError(f"max_prototypes must be >= 1, got {max_prototypes}")
    search = search or functools.partial(first_neighbours, scratch_bytes=scratch_bytes)
    budget = budget or MemoryBudget()

    next_level = getattr(search, "next_level", None) or (lambda labels, count=0: None)  # optional (Search)

    start = time.perf_counter()
    labels, count = _components(search(x, progress=_label(0, progress)).index)
    release_free_heap()
    next_level(labels if count >= max_prototypes else None, count)
    what = "FINCH level 0 cluster sums"
    sums = _group_sums(x, labels, budget.zeros((count, dim), np.float32, what), scratch_bytes)
    partitions, counts, seconds = [labels], [count], [time.perf_counter() - start]
    log(f"FINCH level 0: {count:,} clusters of {n:,} vectors ({seconds[-1]:.1f} s)")

    while count >= max_prototypes:
        start = time.perf_counter()
        level = len(partitions)
        merged, new_count = _components(search(sums, progress=_label(level, progress)).index)
        release_free_heap()
        if new_count == 1 or count - new_count <= 1:
            next_level(None)
            log(
                f"FINCH level {level}: {new_count:,} clusters ({time.perf_counter() - start:.1f} s): "
                f"merging stopped, keeping level {level - 1}"
            )
            break
        labels, count = merged[labels], new_count
        next_level(merged if count >= max_prototypes else None, count)
        sums = budget.shrink(sum_groups_in_place(torch.from_numpy(sums), merged, count, scratch_bytes).numpy(), count)
        partitions.append(labels)
        counts.append(count)
        seconds.append(time.perf_counter() - start)
        log(f"FINCH level {level}: {count:,} clusters ({seconds[-1]:.1f} s)")

    log(f"FINCH chose level {len(partitions) - 1}: {count:,} prototypes")
    return FinchResult(partitions, counts, _normalised(sums), seconds)


def _label(level: int, progress: bool) -> str | None:
    return f"FINCH level {level}" if progress else None


def _check_features(x: np.ndarray) -> tuple[int, int]:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind != "f":
        raise ValueError(
            f"expected a 2-D float array of features, got {type(x).__name__} "
            f"{getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}"
        )
    if len(x) == 0:
        raise ValueError("no feature vectors to cluster")
    return x.shape


def _check_norms(norms: np.ndarray, start: int) -> None:
    if not np.isfinite(norms).all():
        raise ProtoADError(f"features rows {start}-{start + len(norms) - 1} contain NaN or infinite values")


def load_normalised(x: np.ndarray, start: int, buffer: np.ndarray) -> np.ndarray:
    """Rows ``start...`` of ``x`` (as many as fit in the float32 ``buffer``), L2-normalised in it.

    Zero rows stay zero; a non-finite row raises ProtoADError naming the rows.
    """
    src = x[start : start + len(buffer)]
    out = buffer[: len(src)]
    np.copyto(out, src, casting="same_kind")
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    _check_norms(norms, start)
    out /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
    return out


def _offer(best: np.ndarray, arg: np.ndarray, start: int, vals: np.ndarray, idx: np.ndarray, offset: int) -> None:
    """Offer a tile's maxima (at indices ``offset + idx``) to rows ``start...`` of the running best.

    A row's candidates arrive in increasing index order and each maximum is the first one in its
    tile, so the strict comparison keeps the lowest index among ties.
    """
    rows = slice(start, start + len(vals))
    better = vals > best[rows]
    best[rows][better] = vals[better]
    arg[rows][better] = idx[better] + offset


class _NumpyTiles:
    """CPU tiles: numpy's BLAS for the products, numpy reductions between them.

    Not torch: alternating torch's OpenMP pool with OpenBLAS's threads was several times slower on a
    busy machine, and numpy's allocations are visible to tracemalloc (the tests check the budget).
    """

    def __init__(self, x: np.ndarray, rows: int) -> None:
        self.x = x
        self.blocks = [np.empty((rows, x.shape[1]), np.float32) for _ in range(2)]
        self.tile = np.empty(rows * rows, np.float32)
        self.hit = np.empty(rows * rows, bool)

    def load(self, start: int, slot: int) -> np.ndarray:
        """Rows ``start...`` as a normalised float32 block in buffer ``slot``."""
        return load_normalised(self.x, start, self.blocks[slot])

    def similarities(self, a: np.ndarray, c: np.ndarray, diagonal: bool) -> np.ndarray:
        s = self.tile[: len(a) * len(c)].reshape(len(a), len(c))
        np.matmul(a, c.T, out=s)
        if diagonal:
            np.fill_diagonal(s, -np.inf)
        return s

    def row_max(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = s.argmax(axis=1)
        return s[np.arange(len(s)), idx], idx

    def col_max(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # numpy's argmax along axis 0 copies the tile; a maximum along it does not. The first row
        # reaching each column's maximum is the smallest row among the hits, in row-major order.
        vals = s.max(axis=0)
        hit = self.hit[: s.size].reshape(s.shape)
        np.equal(s, vals, out=hit)
        if np.count_nonzero(hit) > 4 * s.shape[1]:  # many tied rows (duplicates): slower, bounded
            return vals, np.concatenate([hit[:, c : c + 256].argmax(axis=0) for c in range(0, s.shape[1], 256)])
        rows, cols = np.divmod(np.flatnonzero(hit), s.shape[1])
        idx = np.full(s.shape[1], len(s))
        np.minimum.at(idx, cols, rows)
        return vals, idx


def _components(nn: np.ndarray) -> tuple[np.ndarray, int]:
    """Weakly connected components of the graph i -> nn[i], numbered in the order of their first rows (so that
    every row's label is at most its index: ``sum_groups_in_place`` relies on it).

    scipy numbers them so, visiting rows in order; should it not, they are renumbered here."""
    n = len(nn)
    graph = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), nn)), shape=(n, n))
    count, labels = connected_components(graph, directed=True, connection="weak")
    labels = labels.astype(np.int64)
    if (labels > np.arange(n)).any():
        first = np.full(count, n)
        np.minimum.at(first, labels, np.arange(n))
        rank = np.empty(count, np.int64)
        rank[np.argsort(first)] = np.arange(count)
        labels = rank[labels]
    return labels, count


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """``x`` (an array or a read-only memmap) as a torch tensor sharing its memory, for reading only."""
    with warnings.catch_warnings():  # read-only memmap: torch warns that it cannot protect it; nothing writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(x))


def _group_sums(x: np.ndarray, labels: np.ndarray, out: np.ndarray, scratch_bytes: int) -> np.ndarray:
    """``out``, float32 [K, D] zeros (may be partly spilled), filled with the sums of the rows of x per label,
    in chunks within about ``scratch_bytes`` (x may be a memmap).

    In torch: its FP16 -> FP32 copy and ``index_add_`` summed 627k x 1792 FP16 rows in 1.4 s, where
    numpy's conversion and a sparse one-hot product took 8.8 s. No N x K matrix is formed. Each cluster's rows are
    added in row order, so the sums are the same bit for bit however ``out`` is held.
    """
    chunk = max(1, scratch_bytes // (4 * x.shape[1]))
    source, index, sums = as_tensor(x), torch.from_numpy(labels), torch.from_numpy(out)
    buffer = None if source.dtype == torch.float32 else torch.empty(min(chunk, len(x)), x.shape[1])
    for start in range(0, len(x), chunk):
        block = source[start : start + chunk]
        if buffer is not None:
            block = buffer[: len(block)].copy_(block)
        sums.index_add_(0, index[start : start + chunk], block)
    return out


def sum_groups_in_place(
    rows: torch.Tensor, labels: np.ndarray, count: int, chunk_bytes: int, divide: torch.Tensor | None = None
) -> torch.Tensor:
    """``rows[:count]``, float32 [count, D], overwritten with the sums of ``rows`` grouped by ``labels`` (each row
    divided by ``divide[row]`` first, if given); the rows behind ``count`` are left used up.

    FINCH's next level in the pages the level before already has, instead of a new array beside it: at 3.2
    million vectors a new one had to spill (level 1's sums, 1.9 GB), while these pages are in memory, and the
    rest can be given back at once (``MemoryBudget.shrink``). It works because a group's label is at most the
    index of its first row (``_components`` numbers them so): a chunk of rows is copied out, then only rows
    already read are written. Each group's rows are added in row order, as ``_group_sums`` adds them, so the
    sums are the same bit for bit. Chunks of about ``chunk_bytes``.
    """
    n, dim = rows.shape
    if len(labels) != n or count > n or (n and (labels.max() >= count or (labels > np.arange(n)).any())):
        raise ValueError(f"labels must number {count} groups of the {n} rows, each at most its row's index")
    chunk = max(1, chunk_bytes // (4 * dim))
    index, buffer = torch.from_numpy(labels), torch.empty(min(chunk, n), dim)
    for start in range(0, n, chunk):
        block = buffer[: min(chunk, n - start)].copy_(rows[start : start + chunk])
        if divide is not None:
            block /= divide[start : start + len(block), None]
        rows[start : min(start + len(block), count)] = 0  # nothing summed into them yet: earlier rows' labels < start
        rows.index_add_(0, index[start : start + len(block)], block)
    return rows[:count]


def _normalised(sums: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero).

    Norms by ``einsum``: ``np.linalg.norm(axis=1)`` took 20 times longer (2 s for 179k x 1792).
    """
    norms = np.sqrt(np.einsum("ij,ij->i", sums, sums))[:, None]
    return (sums / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)
