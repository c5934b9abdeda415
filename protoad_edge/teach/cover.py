"""Which patches of the taught frames need a prototype, and the prototypes that cover them.

The rule: a patch is uncovered when its patch score, 1 - its highest cosine to a prototype, is above the pixel
threshold in force (the bundle's, capped at its image threshold: ``decision.capped_pixel_threshold``), that is
when no prototype reaches the cosine ``1 - pixel threshold`` (:func:`level`). The uncovered patches are grouped
among themselves by cosine, greedily: a patch that no group yet covers at that level starts one, and each group's
prototype is the normalised mean of its members (as FINCH's are), checked to cover every member at the level;
a member it does not cover goes to the next round, and after :data:`ROUNDS` the rest are prototypes themselves.

So after teaching, no patch of a taught frame scores above the pixel threshold, and since the map is a convex
combination of patch scores (bilinear upsampling and a normalised Gaussian blur), no pixel does: every taught
frame is judged normal and outlines nothing. The grouping compares a patch only with the groups of its cell (the
nearest of a few k-means centres of the uncovered patches, ``teach.search``): a patch that a group of another cell
would have covered gets its own, which costs a prototype, never coverage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..decision import capped_pixel_threshold
from ..metadata import ModelInfo
from .search import centres, group_sums

ROUNDS = 3
PATCHES_PER_CELL = 512  # the grouping's cells: about this many uncovered patches each
MAX_CELLS = 64
BLOCK = 1024  # patches grouped at once


def level(info: ModelInfo) -> float:
    """The cosine a patch must reach to some prototype to be covered: 1 - the pixel threshold in force."""
    return 1.0 - capped_pixel_threshold(info.pixel_threshold, info.image_threshold)


@dataclass
class Cover:
    """New prototypes and which of them covers each uncovered patch."""

    prototypes: np.ndarray  # float32 [P, 1792]: unit vectors (the rows of NAME.prototypes.npy)
    rows: np.ndarray  # float32 [P, D]: the same as the graph compares them (projected where it projects)
    owner: np.ndarray  # int [M]: the row that covers each patch given
    centres: np.ndarray  # float32 [G, D]: the cells' centres


def cover(
    compared: np.ndarray,
    unit: np.ndarray | None,
    cosine: float,
    to_graph: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
) -> Cover:
    """Prototypes covering every row of ``compared`` [M, D] (uncovered patches, unit vectors as the graph compares
    them; ``unit`` [M, 1792] the same before any projection, None where the graph does not project) at ``cosine``;
    ``to_graph`` maps 1792-d prototypes to the graph's space."""
    m = len(compared)
    unit = compared if unit is None else unit
    rng = np.random.default_rng(seed)
    sample = compared[np.sort(rng.choice(m, min(m, 8192), replace=False))]
    c = centres(sample, max(1, min(MAX_CELLS, m // PATCHES_PER_CELL)), seed=seed)
    protos, rows = [], []
    owner = np.full(m, -1, np.int64)
    pending = np.arange(m)
    for round_ in range(ROUNDS + 1):
        if not len(pending):
            break
        if round_ == ROUNDS:  # what no group's mean covered: each patch its own prototype
            leader = pending
            group = np.arange(len(pending))
        else:
            z = compared if len(pending) == m else compared[pending]
            leader = _leaders(z, np.argmax(z @ c.T, axis=1), cosine)
            _, group = np.unique(leader, return_inverse=True)
        every = len(pending) == m  # the first round: no copy of the patches
        _, sums = group_sums(unit if every else unit[pending], group)
        new = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        graph_rows = to_graph(new)
        reach = np.einsum("ij,ij->i", compared if every else compared[pending], graph_rows[group])
        covered = reach >= cosine if round_ < ROUNDS else np.ones(len(pending), bool)
        kept = np.unique(group[covered])  # groups covering at least one member
        renumber = np.full(len(new), -1, np.int64)
        renumber[kept] = sum(len(r) for r in rows) + np.arange(len(kept))
        protos.append(new[kept])
        rows.append(graph_rows[kept])
        owner[pending[covered]] = renumber[group[covered]]
        pending = pending[~covered]
    return Cover(np.concatenate(protos), np.concatenate(rows), owner, c)


def _leaders(z: np.ndarray, cell: np.ndarray, cosine: float) -> np.ndarray:
    """For each of ``z`` (unit rows), the position of its group's leader: greedily, in order, within each cell, a
    row no leader of its cell reaches at ``cosine`` leads a group of the rows it reaches."""
    leader = np.empty(len(z), np.int64)
    for g in np.unique(cell):
        mine = np.flatnonzero(cell == g)
        heads: list[int] = []
        for start in range(0, len(mine), BLOCK):
            part = mine[start : start + BLOCK]
            if heads:
                similarity = z[part] @ z[heads].T
                best = np.argmax(similarity, axis=1)
                reached = similarity[np.arange(len(part)), best] >= cosine
                leader[part[reached]] = np.asarray(heads)[best[reached]]
                part = part[~reached]
            if not len(part):
                continue
            within = (z[part] @ z[part].T) >= cosine
            free = np.ones(len(part), bool)
            for j in range(len(part)):
                if free[j]:
                    members = free & within[j]
                    leader[part[members]] = part[j]
                    free &= ~members
                    heads.append(int(part[j]))
    return leader
