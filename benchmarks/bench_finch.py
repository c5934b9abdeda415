"""FINCH speed: our tiled exact first neighbours and levels against finch-clust's exact path, side by side.

    python benchmarks/bench_finch.py --n 20000 --dim 1792
    python benchmarks/bench_finch.py --n 100000 --features FEATURES.npy --approximate --no-reference

Random unit vectors by default (as for the finch-clust timing in FACTS.md); ``--features`` takes the
first N rows of a [M, D] .npy instead (e.g. a feature-cache entry: real patch features, whose
spectrum decays as the approximate search assumes - on random vectors its recall is meaningless).
``--approximate`` adds the approximate first-neighbour search: its time beside the exact one, and its
recall (same neighbour, or one exactly as similar). Also prints the BLAS rate of one float32 product
of the tile size, measured in the same run, to show how close the search gets to it.
Set the thread count as for real use (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS).
finch-clust's exact path holds dense N x N matrices (about 3 x 40 GB at N = 100k): use --no-reference there.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, TypeVar

import numpy as np

from protoad_edge.builder.finch import DEFAULT_SCRATCH_BYTES, finch, first_neighbours, tile_rows
from protoad_edge.builder.neighbours import (
    DEFAULT_CANDIDATES,
    DEFAULT_DIMS,
    DEFAULT_PROBES,
    EXACT_UP_TO,
    approximate_first_neighbours,
    make_search,
)

T = TypeVar("T")


def timed(f: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1792)
    parser.add_argument("--scratch-mb", type=int, default=DEFAULT_SCRATCH_BYTES // 2**20)
    parser.add_argument("--features", default=None, help="a [M, D] .npy of features; its first --n rows are used")
    parser.add_argument("--approximate", action="store_true", help="also time the approximate search")
    parser.add_argument("--dims", type=int, default=DEFAULT_DIMS)
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    parser.add_argument(
        "--probes", type=float, default=DEFAULT_PROBES, help="k-means lists searched per row, on average"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip finch-clust (it holds about 3 dense N x N float32 matrices)"
    )
    args = parser.parse_args()

    if args.features:
        x = np.load(args.features, mmap_mode="r")[: args.n]
        x = np.ascontiguousarray(x, dtype=np.float32)
        args.n, args.dim = x.shape
    else:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    scratch = args.scratch_mb * 2**20
    b = tile_rows(args.n, args.dim, 4, scratch)

    a, c = x[:b].copy(), x[args.n - b :].copy()
    np.matmul(a, c.T)  # warm-up
    _, t_tile = timed(lambda: np.matmul(a, c.T))
    peak = 2 * b * b * args.dim / t_tile / 1e9
    print(f"N={args.n} D={args.dim} tile={b} rows ({args.scratch_mb} MB scratch)")
    print(f"  one float32 tile product (numpy BLAS): {peak:.1f} GFLOP/s")

    ours, t_nn = timed(lambda: first_neighbours(x, scratch_bytes=scratch))
    useful = args.n * (args.n - 1) * args.dim / t_nn / 1e9  # half the matrix, 2 flops per multiply-add
    print(f"  ours  first neighbours: {t_nn:7.2f} s   ({useful:.1f} GFLOP/s of the half matrix it needs)")
    if args.approximate:
        approx, t_ap = timed(
            lambda: approximate_first_neighbours(
                x, dims=args.dims, candidates=args.candidates, probes=args.probes, scratch_bytes=scratch
            )
        )
        hit = (approx.index == ours.index) | (np.abs(approx.similarity - ours.similarity) <= 1e-6)
        print(
            f"  ours  approximate 1-NN: {t_ap:7.2f} s   ({t_nn / t_ap:.2f}x the exact speed; {args.dims} dims, "
            f"{args.probes} lists, top {args.candidates}); recall {hit.mean():.4f} "
            f"({(approx.index == ours.index).mean():.4f} same index)"
        )
        approx_finch, t_ap_finch = timed(
            lambda: finch(
                x,
                max_prototypes=1,
                scratch_bytes=scratch,
                log=lambda _: None,
                search=make_search(scratch_bytes=scratch, log=lambda _: None),
            )
        )
        print(
            f"  ours  FINCH as built:   {t_ap_finch:7.2f} s   (approximate above {EXACT_UP_TO:,} rows, "
            f"exact up to it) counts {approx_finch.counts}"
        )
    result, t_finch = timed(lambda: finch(x, max_prototypes=1, scratch_bytes=scratch, log=lambda _: None))
    print(f"  ours  all FINCH levels: {t_finch:7.2f} s   counts {result.counts}")
    if args.no_reference:
        return

    from finch import FINCH
    from finch.finch import clust_rank

    (_, _, ref_nn, _), t_ref_nn = timed(lambda: clust_rank(x, metric="cosine", ann_threshold=args.n + 1))
    print(
        f"  finch-clust exact 1-NN: {t_ref_nn:7.2f} s   (ours is {t_ref_nn / t_nn:.2f}x faster); "
        f"neighbours differing: {int((ref_nn != ours.index).sum())}"
    )
    (_, ref_counts, _), t_ref = timed(lambda: FINCH(x, ann_threshold=args.n + 1, verbose=False))
    print(
        f"  finch-clust FINCH:      {t_ref:7.2f} s   (ours is {t_ref / t_finch:.2f}x faster); counts {list(ref_counts)}"
    )


if __name__ == "__main__":
    main()
