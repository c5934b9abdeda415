"""The most similar prototype of every patch, exactly, without comparing every patch with every prototype.

Teaching compares each taught patch with the K prototypes of the bundle (is it covered, and its score before) and
with the new ones (its score after): 2 x 3,136 x 1792 x K multiply-adds a frame, 77 GFLOP at K 6,828, more than
the backbone. A one-level metric tree prunes most of it and stays exact: the prototypes are split into cells
around unit centres (a few rounds of spherical k-means), each cell keeps its radius R (the largest distance of its
prototypes from the centre), and by the triangle inequality no prototype of a cell lies nearer to a patch z than
|z - c| - R. Each patch is first compared with its own cell (the nearest centre), then only with the cells whose
bound could still beat the best distance found; the similarities themselves are the same float32 dot products
as the graph's. Distances of unit vectors: |a - b|^2 = 2 - 2 a.b. The bound is widened by :data:`MARGIN` for
float32 rounding, which only costs a few more comparisons.
"""

from __future__ import annotations

import numpy as np

CELLS = 128  # cells of the tree (at most one per 8 prototypes)
ROWS_PER_CELL = 8
ROUNDS = 6  # k-means rounds
MARGIN = 1e-4  # widening of the bound, in distance (float32 dot products of unit vectors err by ~1e-6)
BLOCK = 4096  # patches per product


def centres(rows: np.ndarray, cells: int = CELLS, rounds: int = ROUNDS, seed: int = 0) -> np.ndarray:
    """Unit centres [G, D] of ``rows`` [K, D] (unit vectors): seeded spherical k-means."""
    count = max(1, min(cells, len(rows) // ROWS_PER_CELL))
    rng = np.random.default_rng(seed)
    c = rows[np.sort(rng.choice(len(rows), count, replace=False))].astype(np.float32)
    for _ in range(rounds):
        own = np.argmax(rows @ c.T, axis=1)
        used, sums = group_sums(rows, own)
        c[used] = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return c


def group_sums(rows: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the groups that occur, in increasing order; the sum of their ``rows``). One contiguous slice summed per
    group after a sort: three to four times faster than ``np.add.reduceat`` over the rows, which walks them one
    by one."""
    order = np.argsort(group, kind="stable")
    used, starts = np.unique(group[order], return_index=True)
    ordered = rows[order]
    ends = [*starts[1:], len(rows)]
    return used, np.stack([ordered[a:b].sum(axis=0) for a, b in zip(starts, ends)])


def distance(similarity: np.ndarray) -> np.ndarray:
    """Euclidean distance of unit vectors from their dot product."""
    return np.sqrt(np.clip(2.0 - 2.0 * similarity.astype(np.float64), 0.0, None))


class Cells:
    """``rows`` (unit vectors) split by their nearest of ``centres``, with each cell's radius."""

    def __init__(self, rows: np.ndarray, centres_: np.ndarray) -> None:
        self.centres = centres_
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        similarity = rows @ centres_.T if len(rows) else np.zeros((0, len(centres_)), np.float32)
        own = np.argmax(similarity, axis=1)
        order = np.argsort(own, kind="stable")
        self.rows = rows[order]
        self.index = order  # position in ``rows`` as given
        self.starts = np.searchsorted(own[order], np.arange(len(centres_) + 1))
        radius = np.full(len(centres_), -np.inf)
        np.maximum.at(radius, own, distance(similarity[np.arange(len(rows)), own]))
        self.radius = radius  # -inf: an empty cell

    def cell(self, g: int) -> np.ndarray:
        return self.rows[self.starts[g] : self.starts[g + 1]]

    def best(self, z: np.ndarray, near: np.ndarray, floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(the highest similarity of each of ``z`` [M, D] to the rows, which row, as given) - exactly. ``near`` is
        ``z @ centres.T``; ``floor`` a similarity already reached elsewhere (a row no better is not looked for:
        its rows come back as -1 where none beats it)."""
        m = len(z)
        best = np.full(m, -np.inf, np.float32) if floor is None else floor.astype(np.float32).copy()
        which = np.full(m, -1, np.int64)
        if not len(self.rows):
            return best, which
        reach = distance(near) - self.radius[None, :]  # no row of cell g is nearer than this
        own = np.argmax(near, axis=1)
        self._visit(z, np.arange(m), own, best, which)
        bound = distance(best) + MARGIN
        for g in np.argsort(np.where(np.isfinite(self.radius), reach.mean(axis=0), np.inf)):
            if not np.isfinite(self.radius[g]):
                continue
            todo = np.flatnonzero((reach[:, g] < bound) & (own != g))
            if len(todo):
                self._visit(z, todo, np.full(len(todo), g), best, which)
                bound[todo] = distance(best[todo]) + MARGIN
        return best, which

    def _visit(
        self, z: np.ndarray, patches: np.ndarray, cells: np.ndarray, best: np.ndarray, which: np.ndarray
    ) -> None:
        """Compare ``patches`` with the rows of their ``cells``, keeping the best of each."""
        order = np.argsort(cells, kind="stable")
        patches, cells = patches[order], cells[order]
        used, starts = np.unique(cells, return_index=True)
        for g, start, end in zip(used, starts, [*starts[1:], len(cells)]):
            rows = self.cell(g)
            if not len(rows):
                continue
            for first in range(start, end, BLOCK):
                part = patches[first : min(end, first + BLOCK)]
                similarity = z[part] @ rows.T
                top = np.argmax(similarity, axis=1)
                value = similarity[np.arange(len(part)), top]
                better = value > best[part]
                best[part[better]] = value[better]
                which[part[better]] = self.index[self.starts[g] + top[better]]
