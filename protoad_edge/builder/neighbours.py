"""Approximate cosine first neighbours for large FINCH levels on the CPU, and the choice of search.

Exact search costs N^2 x D multiply-adds: for a category's ~600k-1M patch vectors of 1792 on a
few CPU cores, hours. Here rows are projected to a ``dims``-dimensional subspace (the top principal
directions of the uncentred second moment of a row sample, so dot products there approximate the
full ones) and split into k-means lists placed in its first ``COARSE_DIMS`` coordinates (IVF); each
row is compared, in the subspace, with the members of its nearest lists only (``probes`` of them on
average: more for rows between lists, fewer for rows deep inside one), keeps its ``candidates`` best,
and the winner is re-ranked among them in full dimension in float32. Each list's products are read
both ways, so a row also meets the rows of other lists that probe its own. With about sqrt(N) lists
the cost grows as N^1.5 rather than N^2. A row's true neighbour is missed if neither row probes the
other's list, or if it falls outside the row's top candidates in the subspace. FINCH's later levels,
whose rows are sums of the level before's, are projected by summing its projections
(``merge_projection``, as soon as FINCH knows the groups: ``ApproximateSearch.next_level``).

Every product and top-k runs in torch (one thread pool: alternating it with numpy's OpenBLAS pool
list by list cost a third more), into buffers allocated once (fresh 100 MB buffers per chunk cost
page faults that tripled the re-rank's time).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy as np
import scipy.linalg
import torch

from ..errors import ProtoADError
from ..progress import progress_bar
from .finch import (
    DEFAULT_SCRATCH_BYTES,
    Neighbours,
    Search,
    as_tensor,
    first_neighbours,
    sum_groups_in_place,
)
from .gpu_neighbours import gpu_first_neighbours
from .memory import MemoryBudget, release_free_heap

# As finch-clust: exact up to 20,000 rows, approximate above. A 627k-row category's third level
# (about 40k cluster means) took 20 s exact and 3.5 s approximate.
EXACT_UP_TO = 20_000
DEFAULT_DIMS = 512  # real patch features: 256 ranked the true neighbour in the top 8 for only 92% of rows (recall 0.93)
COARSE_DIMS = 128  # k-means placement: as good as 512 for the probed lists (recall 0.985 vs 0.987), 4x cheaper
DEFAULT_CANDIDATES = 4  # kept per probed list and re-ranked per row: 8 found the true neighbour for 0.2% more rows
DEFAULT_SAMPLE = 10_000
# Lists probed per row on average, and at most PROBE_SPREAD times as many. Real features at 627k, with
# pairs found both ways: 1.5 recall 0.943, 2 0.9795, 2.5 0.9865, 3 0.993 (one way, 3 found 0.979).
DEFAULT_PROBES = 2.0
PROBE_SPREAD = 2
DEFAULT_ITERATIONS = 10
LISTS_PER_ROOT = 2  # lists per sqrt(N): balances assigning rows to lists against searching them
TRAIN_PER_LIST = 16  # k-means sample rows per list: enough to place lists that are only probed
CHUNK_ROWS = 4096  # rows per product or gather chunk: larger chunks only leave the CPU caches
RERANK_ROWS = 128  # rows per re-rank chunk: their gathered candidates (128 x 4 x 1792 FP16/FP32) fit the caches


class Projection(NamedTuple):
    """Rows in a ``dims``-dimensional principal subspace: what the search compares in, and what FINCH's
    next level starts from (``merge_projection``)."""

    basis: torch.Tensor  # float32 [D, dims]
    y: torch.Tensor  # float32 [N, dims]: the normalised rows in the basis
    inverse: torch.Tensor  # float32 [N]: the rows' inverse norms


def make_search(
    device: str = "cpu",
    *,
    exact: bool = False,
    exact_up_to: int | None = None,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    budget: MemoryBudget | None = None,
    log: Callable[[str], None] = print,
) -> Search:
    """The first-neighbour search for ``finch(search=...)``.

    On a GPU: ``gpu_first_neighbours``, exact (FP16 products checked in FP32; with ``exact``, FP32
    products throughout). On the CPU: exact with ``exact``, for inputs of at most ``exact_up_to`` rows
    (FINCH's later levels are much smaller than level 0, so the last ones run exact) and for rows of
    at most ``DEFAULT_DIMS`` dimensions (nothing to gain); otherwise ``ApproximateSearch``, whose
    projections and candidate lists are allocated through ``budget`` (default: unbounded).
    """
    if device != "cpu":
        return functools.partial(gpu_first_neighbours, device=device, precision="fp32" if exact else "fp16", log=log)
    exact_search = functools.partial(first_neighbours, scratch_bytes=scratch_bytes)
    if exact:
        return exact_search
    return ApproximateSearch(
        exact_search, EXACT_UP_TO if exact_up_to is None else exact_up_to, budget or MemoryBudget(), log
    )


class ApproximateSearch:
    """The CPU search for FINCH: exact up to ``exact_up_to`` rows, ``search_projection`` above, and each level's
    projection summed into the next level's (``next_level``) instead of projecting that level's rows again."""

    def __init__(self, exact: Search, exact_up_to: int, budget: MemoryBudget, log: Callable[[str], None]) -> None:
        self.exact, self.exact_up_to, self.budget, self.log = exact, exact_up_to, budget, log
        self._kept: Projection | None = None  # the last approximate call's projection, until next_level
        self._summed: tuple[torch.Tensor, torch.Tensor] | None = None  # the next level's basis and raw projection
        self._lists_room: Callable[[], None] = lambda: None  # gives back the room kept for the next lists

    def __call__(self, x: np.ndarray, *, progress: str | None = None) -> Neighbours:
        summed, self._summed, self._kept = self._summed, None, None
        if len(x) <= self.exact_up_to or x.shape[1] <= DEFAULT_DIMS:
            self._lists_room()
            return self.exact(x, progress=progress)
        self.log(
            f"first neighbours: approximate ({DEFAULT_DIMS} of {x.shape[1]} dims, {DEFAULT_PROBES:g} nearest "
            f"k-means lists a row on average, top {DEFAULT_CANDIDATES} re-ranked exactly) for {len(x):,} rows; "
            "--exact-neighbours for exact"
        )
        if summed is None:
            self._lists_room = self.budget.reserve(candidate_bytes(len(x)))
        projection = (
            scale_projection(*summed, x)
            if summed is not None
            else project(x, DEFAULT_DIMS, DEFAULT_SAMPLE, 0, self.budget)
        )
        self._kept = projection
        self._lists_room()
        return search_projection(x, projection, progress=progress, budget=self.budget)

    def next_level(self, labels: np.ndarray | None, count: int = 0) -> None:
        """FINCH's next level searches the sums of the last searched rows grouped by ``labels`` (``count``
        groups), or None: there is no next level. The last projection is summed into the next level's now, in
        its own first rows, and the rest freed, before FINCH allocates level 0's cluster sums: at 3.2 million
        vectors it holds 6.1 GB of the budget, of which the sums (6.9 GB) then get 3.9 GB."""
        kept, self._kept = self._kept, None
        if kept is not None and labels is not None and count > self.exact_up_to:
            self._summed = kept.basis, merge_projection(kept, labels, count, self.budget)
            self._lists_room = self.budget.reserve(candidate_bytes(count))  # before FINCH's sums take the room


def approximate_first_neighbours(
    x: np.ndarray,
    *,
    dims: int = DEFAULT_DIMS,
    candidates: int = DEFAULT_CANDIDATES,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    lists: int | None = None,
    probes: float = DEFAULT_PROBES,
    iterations: int = DEFAULT_ITERATIONS,
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    progress: str | None = None,
) -> Neighbours:
    """Cosine first neighbours of the rows of ``x`` (float16/32, may be a memmap), approximately:
    ``search_projection`` in the top ``dims`` principal directions of ``sample`` rows (``project``).

    Inputs too small to gain (N <= candidates + 1, or dims >= D) are searched exactly.
    """
    n, dim = x.shape
    if n <= candidates + 1 or dims >= dim:
        return first_neighbours(x, scratch_bytes=scratch_bytes, progress=progress)
    return search_projection(
        x,
        project(x, dims, sample, seed),
        candidates=candidates,
        seed=seed,
        lists=lists,
        probes=probes,
        iterations=iterations,
        progress=progress,
    )


def search_projection(
    x: np.ndarray,
    projection: Projection,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    seed: int = 0,
    lists: int | None = None,
    probes: float = DEFAULT_PROBES,
    iterations: int = DEFAULT_ITERATIONS,
    progress: str | None = None,
    budget: MemoryBudget | None = None,
) -> Neighbours:
    """Approximate cosine first neighbours of the rows of ``x``, compared in ``projection`` (of x).

    Candidates: the ``candidates`` most similar rows in the projected space among the members of
    the row's nearest k-means lists (``lists``, default about ``LISTS_PER_ROOT`` x sqrt(N)): its own,
    and others by how close the row lies to them, ``probes`` a row on average and at most
    ``PROBE_SPREAD`` x ``probes``; and the most similar of the other lists' rows that probe the
    row's list. The answer: the most similar candidate in full float32, ties to the lowest index.
    Besides the projection and chunks of ``CHUNK_ROWS`` rows it holds
    N x (``PROBE_SPREAD`` x ``probes`` x ``candidates`` + 1) partial results (12 bytes each), through
    ``budget`` (default: unbounded). ``progress``: a progress bar's label (over the lists), or None.
    """
    y = projection.y
    n = len(y)
    coarse = y[:, : min(COARSE_DIMS, y.shape[1])]  # principal directions come first
    lists = min(n, lists or max(1, round(LISTS_PER_ROOT * math.sqrt(n))))
    centroids = _kmeans(coarse, lists, iterations, seed)
    near = _probes(coarse, centroids, probes, min(max(1, round(PROBE_SPREAD * probes)), lists))
    found = _candidates(y, near, lists, candidates, progress, budget or MemoryBudget())
    del near
    release_free_heap()  # the lists' product buffers
    return _rerank(as_tensor(x), projection.inverse, found)


def project(x: np.ndarray, dims: int, sample: int, seed: int, budget: MemoryBudget | None = None) -> Projection:
    """The rows of ``x`` in the top ``dims`` principal directions of ``sample`` of them (through ``budget``)."""
    basis = _basis(x, dims, sample, seed)
    y = torch.from_numpy(
        (budget or MemoryBudget()).empty((len(x), dims), np.float32, "the search's projection", huge_pages=False)
    )
    return Projection(basis, y, _project(as_tensor(x), basis, y))


def merge_projection(
    previous: Projection, merged: np.ndarray, count: int, budget: MemoryBudget | None = None
) -> torch.Tensor:
    """float32 [count, dims]: the raw (not normalised) projections of the sums of ``previous``'s rows grouped by
    ``merged`` (``scale_projection`` normalises them once the sums exist), in ``previous``'s first rows: it is
    used up, and ``budget`` (default: unbounded) gets the rest of its memory back.

    Projection is linear, so a sum's projection is the sum of its rows' raw projections: the sums are not
    multiplied with the basis again (4 s of 14 at a 627k category's level 1). Summed in place
    (``finch.sum_groups_in_place``), the next level's projection is in the pages of this level's that were in
    memory: at 3.2 million vectors a new array had to spill (2 GB written in 9 s) beside this level's.
    """
    if len(merged) != len(previous.y) or merged.max() + 1 != count:
        raise ValueError(
            f"merged: {len(merged)} labels up to {merged.max()} for {len(previous.y)} projected rows "
            f"summed into {count}"
        )
    y = sum_groups_in_place(previous.y, merged, count, CHUNK_ROWS * previous.y.shape[1] * 4, divide=previous.inverse)
    return torch.from_numpy((budget or MemoryBudget()).shrink(y.numpy(), count))


def scale_projection(basis: torch.Tensor, raw: torch.Tensor, x: np.ndarray) -> Projection:
    """The projection of rows ``x`` from their raw projections ``raw`` (``merge_projection``): x is read for its
    norms only, and ``raw`` is scaled in place."""
    if len(raw) != len(x):
        raise ValueError(f"{len(raw)} projected rows for {len(x)} rows")
    source = as_tensor(x)
    inverse = torch.cat(
        [_inverse_norms(source[start : start + CHUNK_ROWS].float(), start) for start in range(0, len(x), CHUNK_ROWS)]
    )
    raw *= inverse[:, None]
    return Projection(basis, raw, inverse)


def products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T: every similarity the search computes comes from here (the tests count them)."""
    return torch.mm(a, b.T, out=out)


def _basis(x: np.ndarray, dims: int, sample: int, seed: int) -> torch.Tensor:
    """float32 [D, dims]: top eigenvectors of the second moment of up to ``sample`` normalised rows,
    the largest eigenvalue first."""
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False))
    s = np.asarray(x[rows], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(s).all(axis=1))
    if len(bad):
        raise ProtoADError(f"features row {rows[bad[0]]} contains NaN or infinite values")
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    d = x.shape[1]
    _, vectors = scipy.linalg.eigh(s.T @ s, subset_by_index=[d - dims, d - 1], driver="evr")
    return torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1]))


def _project(x: torch.Tensor, basis: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, float32 [N, dims], filled with the normalised rows in the basis; returns float32 [N]: the
    rows' inverse norms.

    Raw rows are projected and the products scaled, so no normalised copy of a row is written; zero
    rows stay zero. A non-finite row raises ProtoADError naming it. Each chunk is scaled while it is in
    cache: y is written once (a spilled y: its pages dirtied once).
    """
    n, dim = x.shape
    inverse = torch.empty(n)
    buffer = torch.empty(CHUNK_ROWS, dim)
    for start in range(0, n, CHUNK_ROWS):
        block = buffer[: min(CHUNK_ROWS, n - start)].copy_(x[start : start + CHUNK_ROWS])  # FP16 -> FP32 here
        rows = slice(start, start + len(block))
        inverse[rows] = _inverse_norms(block, start)
        torch.mm(block, basis, out=y[rows]).mul_(inverse[rows, None])
    return inverse


def _inverse_norms(block: torch.Tensor, start: int) -> torch.Tensor:
    """float32 [rows]: 1 / the L2 norms of float32 rows ``start...`` (zero rows: 1 / tiny); a non-finite
    row raises ProtoADError naming it."""
    norms = torch.linalg.vector_norm(block, dim=1)
    bad = torch.nonzero(~torch.isfinite(norms))
    if len(bad):
        raise ProtoADError(f"features row {start + int(bad[0])} contains NaN or infinite values")
    return 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny)


def _kmeans(y: torch.Tensor, lists: int, iterations: int, seed: int) -> torch.Tensor:
    """float32 [lists, d]: spherical k-means centroids (Lloyd) of ``TRAIN_PER_LIST`` x ``lists`` sampled rows.

    Started from random sample rows; a list that empties keeps its previous centroid.
    """
    rng = np.random.default_rng(seed)
    train = y[torch.from_numpy(np.sort(rng.choice(len(y), min(len(y), TRAIN_PER_LIST * lists), replace=False)))]
    centroids = train[torch.from_numpy(np.sort(rng.choice(len(train), lists, replace=False)))]
    for _ in range(iterations):
        label = _nearest(train, centroids, 1)[1][:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, label, train)
        present = torch.bincount(label, minlength=lists) > 0
        norms = torch.linalg.vector_norm(sums[present], dim=1, keepdim=True)
        centroids[present] = sums[present] / norms.clamp_min(torch.finfo(torch.float32).tiny)
    return centroids


def _nearest(y: torch.Tensor, centroids: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 and int64 [N, p]: each row's ``p`` highest similarities to centroids and those
    centroids, best first (the first: the row's list)."""
    vals = torch.empty(len(y), p)
    out = torch.empty(len(y), p, dtype=torch.int64)
    s = torch.empty(CHUNK_ROWS, len(centroids))
    for start in range(0, len(y), CHUNK_ROWS):
        block = y[start : start + CHUNK_ROWS]
        torch.topk(
            products(block, centroids, out=s[: len(block)]),
            p,
            dim=1,
            out=(vals[start : start + len(block)], out[start : start + len(block)]),
        )
    return vals, out


def _probes(y: torch.Tensor, centroids: torch.Tensor, probes: float, most: int) -> torch.Tensor:
    """int64 [N, most]: the lists each row probes, best first, ``len(centroids)`` past its last.

    Every row probes its own list; the other (row, list) pairs, up to ``most`` lists a row, are taken
    in order of the list's similarity gap to the row's own until they average ``probes`` a row: a row
    between lists probes them all, a row deep inside its list only that one. On real features
    this finds the true neighbour's list for as many rows as a fixed 4 probes with 3 on average.
    """
    vals, near = _nearest(y, centroids, most)
    extra = round((probes - 1) * len(y))
    gaps = (vals[:, :1] - vals[:, 1:]).reshape(-1)
    if extra <= 0:
        near[:, 1:] = len(centroids)
    elif extra < len(gaps):
        near[:, 1:].masked_fill_((gaps > torch.kthvalue(gaps, extra).values).view(len(y), -1), len(centroids))
    return near


def _candidates(
    y: torch.Tensor, near: torch.Tensor, lists: int, c: int, progress: str | None, budget: MemoryBudget
) -> torch.Tensor:
    """int64 [N, c]: each row's ``c`` most similar other rows of ``y`` found in its probed lists, or
    among the rows that probe its list, any order.

    Every row belongs to its nearest centroid's list (``near[:, 0]``) and probes the lists in ``near``
    (``lists`` in a slot: none). List by list, the rows that probe it (its members first) are
    multiplied with its members, so pairs cost about N x p x N / lists products instead of N^2 / 2.
    Each (row, probe) keeps its best ``c``, and each member keeps the best of the other lists' rows
    that probed its list: the products read both ways, so a pair is found if either row probes the
    other's list (at 627k real features, 2 probes a row then find as many true neighbours as 3 did
    one way). A row whose probed lists hold no other row (degenerate lists) is searched against all rows.
    The partial results are allocated through ``budget``.
    """
    n, p = near.shape
    slots = near.T.reshape(-1)  # (probe, row) entries, probe-major: sorted by list, a list's members come first
    entries = torch.argsort(slots, stable=True)
    bounds = _bounds(slots, lists)  # unprobed slots (= lists) sort last
    sizes = torch.bincount(near[:, 0], minlength=lists).tolist()
    # per row: c per probe, then the best row probing its list
    vals = torch.from_numpy(budget.full((n, p * c + 1), -math.inf, np.float32, "the search's candidate similarities"))
    idx = torch.from_numpy(budget.full((n, p * c + 1), -1, np.int64, "the search's candidate indices"))
    found_vals, found_idx = vals[:, :-1].view(n, p, c), idx[:, :-1].view(n, p, c)
    for j in progress_bar(list(range(lists)), progress or "", progress is not None, unit="vectors", sizes=sizes):
        m = sizes[j]
        if m == 0:
            continue
        entry = entries[bounds[j] : bounds[j + 1]]
        probe, rows = entry // n, entry % n
        mine = rows[:m]
        probing = y[rows]
        s = products(probing, probing[:m])
        s[:m].fill_diagonal_(-math.inf)  # a member is never its own neighbour
        k = min(c, m)
        best, top = s.topk(k, dim=1, sorted=False)
        found_vals[rows, probe, :k] = best
        found_idx[rows, probe, :k] = torch.where(torch.isfinite(best), mine[top], -1)
        if len(rows) > m:
            best, top = s[m:].max(dim=0)
            vals[mine, -1] = best
            idx[mine, -1] = rows[m:][top]
    vals[:, -1].masked_fill_((idx[:, :-1] == idx[:, -1:]).any(dim=1), -math.inf)  # found both ways: count it once
    return _best(y, vals, idx, c)


def candidate_bytes(n: int, probes: float = DEFAULT_PROBES, candidates: int = DEFAULT_CANDIDATES) -> int:
    """Bytes of the partial results ``_candidates`` allocates for ``n`` rows (float32 and int64 per slot)."""
    return n * (round(PROBE_SPREAD * probes) * candidates + 1) * 12


def _bounds(labels: torch.Tensor, lists: int) -> torch.Tensor:
    """int64 [lists + 1]: where each list's run starts in ``labels`` sorted, then its end (labels equal
    to ``lists``, unprobed slots, sort after it)."""
    counts = torch.bincount(labels, minlength=lists)[:lists]
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


def _best(y: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, c: int) -> torch.Tensor:
    """int64 [N, c]: the ``c`` best of each row's partial results; slots without one repeat its best."""
    n = len(y)
    out = torch.empty(n, c, dtype=torch.int64)
    for start in range(0, n, CHUNK_ROWS):
        v, i = vals[start : start + CHUNK_ROWS], idx[start : start + CHUNK_ROWS]
        cand = i.gather(1, v.topk(c, dim=1).indices)  # sorted: the first is the best
        out[start : start + len(v)] = torch.where(cand >= 0, cand, cand[:, :1])
    lonely = torch.nonzero(out[:, 0] < 0)[:, 0]
    step = max(1, CHUNK_ROWS * CHUNK_ROWS // n)  # similarity rows of N: at most a 64 MB chunk
    for start in range(0, len(lonely), step):
        rows = lonely[start : start + step]
        s = products(y[rows], y)
        s[torch.arange(len(rows)), rows] = -math.inf
        out[rows] = s.topk(c, dim=1).indices
    return out


def _rerank(x: torch.Tensor, inverse: torch.Tensor, cand: torch.Tensor) -> Neighbours:
    """The most similar candidate of each row in full float32; ties go to the lowest index.

    Rows were checked finite by the projection. This pass reads N x candidates rows in random
    order: a gather of the stored rows (FP16 from the cache), multiplied with their row in float32
    and summed, with the inverse norms applied to the sums instead of to the rows. ``RERANK_ROWS``
    rows at a time, so that the gathered rows are still in cache when they are multiplied (4,096
    rows and a batched product took twice as long).
    """
    n, dim = x.shape
    c = cand.shape[1]
    cand = cand.sort(dim=1).values  # max takes the first maximum: the lowest index among ties
    rows = RERANK_ROWS
    gathered = torch.empty(rows * c, dim, dtype=x.dtype)
    a = torch.empty(rows, 1, dim)
    terms = torch.empty(rows, c, dim)
    index = torch.empty(n, dtype=torch.int64)
    similarity = torch.empty(n)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        block = cand[start : start + m]
        torch.index_select(x, 0, block.reshape(-1), out=gathered[: m * c])
        a[:m, 0].copy_(x[start : start + m])
        s = torch.mul(gathered[: m * c].view(m, c, dim), a[:m], out=terms[:m]).sum(dim=2)
        best, pick = (s * inverse[block] * inverse[start : start + m, None]).max(dim=1)
        index[start : start + m] = block.gather(1, pick[:, None])[:, 0]
        similarity[start : start + m] = best
    return Neighbours(index.numpy(), similarity.numpy())
