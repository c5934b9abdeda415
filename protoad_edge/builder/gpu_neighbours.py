"""Exact cosine first neighbours on a GPU at reduced-precision speed: FP16/TF32 tiles, FP32 check of the winners.

All N^2 x D products of exact search take seconds on a GPU's tensor cores in FP16 or TF32, several
times longer in full FP32. Reduced precision alone could pick the wrong neighbour where two are nearly
as similar, so the result is made exact:

1. each tile of the fast product keeps, per row, its ``candidates`` best columns;
2. those are re-scored in FP32 from the source rows, and the row's best so far is the FP32 winner;
3. a row is settled when its FP32 winner beats the best fast score it left out (the top score
   outside the kept candidates, over all tiles) by more than twice ``error_bound``, the largest
   possible difference between a fast and an FP32 similarity; no column left out can then be as similar;
4. the rows not settled are searched again with FP32 products throughout.

So the answer is the FP32 one (neighbour and similarity; ties to the lowest index, as in
``finch.first_neighbours``) whatever the data, and the time is the fast product's wherever
neighbours are separated by more than the error bound (the log says how many rows needed step 4).

Memory: the source rows stay on the device in their own dtype (FP16 from the feature cache: 2.2 GB
for 627k x 1792) when they fit in ``memory_bytes``; otherwise column blocks are streamed from the host
for every row block. Besides that, a few tiles of ``block`` x ``block`` scratch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Callable

import numpy as np
import torch

from ..errors import ProtoADError
from ..progress import progress_bar
from .finch import Neighbours

# Fast product dtype and its unit roundoff (TF32 keeps 10 mantissa bits, as FP16 does).
PRECISIONS = {"fp16": (torch.float16, 2.0**-11), "tf32": (torch.float32, 2.0**-11), "fp32": (torch.float32, 0.0)}
DEFAULT_PRECISION = "fp16"
DEFAULT_CANDIDATES = 4
DEFAULT_BLOCK = 8192
FP32_EPS = 2.0**-24


def error_bound(precision: str, dim: int) -> float:
    """Largest |fast - FP32| cosine of two unit rows of ``dim``: rounding both inputs (2u + u^2), float32
    accumulation over ``dim`` terms (about dim x 2^-24, worst case), and for FP16 rounding the result (u)."""
    _, u = PRECISIONS[precision]
    if u == 0.0:
        return 0.0
    output = u if precision == "fp16" else FP32_EPS
    return 2 * u + u * u + dim * FP32_EPS + output


def gpu_first_neighbours(
    x: np.ndarray,
    *,
    device: str = "cuda",
    precision: str = DEFAULT_PRECISION,
    candidates: int = DEFAULT_CANDIDATES,
    block: int = DEFAULT_BLOCK,
    memory_bytes: int | None = None,
    progress: str | None = None,
    log: Callable[[str], None] = print,
) -> Neighbours:
    """Exact cosine first neighbours of the rows of ``x`` (float16/32, may be a memmap) on a torch device.

    ``precision``: "fp16" or "tf32" (fast products, checked as the module docstring says) or "fp32".
    ``device`` is any torch device ("cpu" too, for tests; the speed is a GPU's). ``memory_bytes`` bounds
    the rows kept on the device (default: half its free memory). ``progress``: a progress bar's label,
    or None. A single row gets itself, -inf.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype.kind != "f" or len(x) == 0:
        raise ValueError(f"expected a non-empty 2-D float array of features, got {getattr(x, 'shape', type(x))}")
    dev = _device(device)
    rows = _Rows(x, dev, memory_bytes if memory_bytes is not None else _default_memory(dev))
    n = len(x)
    with _matmul_precision(precision):
        best, arg, settled = _scan(rows, np.arange(n), precision, candidates, block, progress)
        retry = np.flatnonzero(~settled)
        if len(retry):
            with _matmul_precision("fp32"):
                best[retry], arg[retry], _ = _scan(
                    rows, retry, "fp32", 1, block, progress and f"{progress} (FP32 re-check)"
                )
    if precision != "fp32":
        log(
            f"first neighbours: {precision} products on {dev}, checked in FP32; "
            f"{len(retry):,} of {n:,} rows ({len(retry) / n:.1%}) searched again in FP32"
        )
    return Neighbours(arg, best)


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProtoADError(f"device {device!r}: torch sees no CUDA device (use --device cpu)")
    return dev


def _default_memory(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 2**62
    free, _ = torch.cuda.mem_get_info(dev)
    return free // 2


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """TF32 on for "tf32" and off otherwise; no reduced-precision FP16 reductions (the bound assumes float32 sums)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = saved[1]


class _Rows:
    """The source rows and their inverse norms on the device: resident if they fit, else fetched per block."""

    def __init__(self, x: np.ndarray, dev: torch.device, memory_bytes: int) -> None:
        self.x, self.dev = x, dev
        self.dtype = torch.float16 if x.dtype == np.float16 else torch.float32
        chunk = 65_536
        resident = x.shape[0] * x.shape[1] * (2 if self.dtype == torch.float16 else 4) <= memory_bytes
        self.data = torch.empty(x.shape, dtype=self.dtype, device=dev) if resident else None
        norms = torch.empty(len(x), device=dev)
        for start in range(0, len(x), chunk):
            part = self._upload(x[start : start + chunk])
            norms[start : start + len(part)] = torch.linalg.vector_norm(part.float(), dim=1)
            if self.data is not None:
                self.data[start : start + len(part)] = part
        bad = torch.nonzero(~torch.isfinite(norms)).flatten()
        if len(bad):
            raise ProtoADError(f"features row {int(bad[0])} contains NaN or infinite values")
        self.inverse = 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny)

    def _upload(self, rows: np.ndarray) -> torch.Tensor:
        # a copy: torch will not wrap a read-only memmap, and the pages must be read anyway
        host = torch.from_numpy(np.array(rows, dtype=np.float16 if self.dtype == torch.float16 else np.float32))
        return host.to(self.dev, non_blocking=False)

    def get(self, index: np.ndarray | slice) -> torch.Tensor:
        """Rows ``index`` (sorted indices or a slice) as unit float32 rows on the device."""
        key = index if isinstance(index, slice) else torch.from_numpy(index).to(self.dev)
        raw = self._upload(self.x[index]) if self.data is None else self.data[key]
        return raw.float() * self.inverse[key][:, None]


def _scan(
    rows: _Rows, queries: np.ndarray, precision: str, candidates: int, block: int, progress: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First neighbours of the sorted row indices ``queries`` among all rows: (similarity, index, settled)."""
    fast, _ = PRECISIONS[precision]
    margin = 2 * error_bound(precision, rows.x.shape[1])
    n = len(rows.x)
    best = np.full(len(queries), -np.inf, np.float32)
    arg = np.zeros(len(queries), np.int64)
    settled = np.ones(len(queries), bool)
    starts = list(range(0, len(queries), block))
    for q0 in progress_bar(
        starts,
        progress or "",
        progress is not None,
        unit="vectors",
        sizes=[min(block, len(queries) - q) for q in starts],
    ):
        q = queries[q0 : q0 + block]
        a32 = rows.get(q)
        a = a32.to(fast)
        q_dev = torch.from_numpy(q).to(rows.dev)
        top = torch.full((len(q),), -math.inf, device=rows.dev)
        idx = torch.zeros(len(q), dtype=torch.int64, device=rows.dev)
        left_out = torch.full((len(q),), -math.inf, device=rows.dev)  # best fast score not re-scored
        for j0 in range(0, n, block):
            c32 = rows.get(slice(j0, min(n, j0 + block)))
            s = a @ c32.to(fast).T
            mine = torch.nonzero((q_dev >= j0) & (q_dev < j0 + len(c32))).flatten()
            s[mine, q_dev[mine] - j0] = -math.inf
            if precision == "fp32":
                vals, cols = s.max(dim=1)  # the first maximum: lowest index among ties
            else:
                k = min(candidates, len(c32))
                scores, cols = s.topk(min(k + 1, len(c32)), dim=1)
                if k < len(c32):  # the (k+1)-th best fast score is the best one left out
                    left_out = torch.maximum(left_out, scores[:, k].float())
                    scores, cols = scores[:, :k], cols[:, :k]
                cols, order = cols.sort(dim=1)  # lowest index first among FP32 ties
                # elementwise, not a matmul: under "tf32" a matmul here would round to TF32 as well
                exact = (c32[cols] * a32[:, None, :]).sum(dim=2)
                exact[torch.isinf(scores.gather(1, order))] = -math.inf  # the row itself
                vals, pick = exact.max(dim=1)
                cols = cols.gather(1, pick[:, None])[:, 0]
            better = vals > top
            top = torch.where(better, vals, top)
            idx = torch.where(better, cols + j0, idx)
        best[q0 : q0 + len(q)] = top.cpu().numpy()
        arg[q0 : q0 + len(q)] = idx.cpu().numpy()
        if precision != "fp32":
            settled[q0 : q0 + len(q)] = (top > left_out + margin).cpu().numpy()
    return best, arg, settled
