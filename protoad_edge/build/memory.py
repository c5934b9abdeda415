"""The build's memory budget: how much anonymous memory FINCH's large arrays may hold, and where the rest goes.

At VisA and BTAD scale (3.2 million patch vectors of 1792) FINCH's largest arrays - level 0's cluster
sums (float32 [K0, 1792], 6-9 GB), the search's projection (float32 [N, 512], 6.6 GB) and its candidate
lists - outgrow a 16 GB workstation together. Each one is allocated through a ``MemoryBudget``: in memory
while the arrays it holds fit within the limit, else as a file-backed memmap in the spill folder (the
feature cache's, which already holds the features). The spilled array keeps its dtype, so the arithmetic,
and the partition, are the same; its pages are the kernel's page cache, written back and dropped under
pressure instead of filling memory that only the OOM killer can free.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import tempfile
import weakref
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ProtoADError

GiB = 2**30
# The build process's own anonymous memory beside the budgeted arrays: the interpreter, torch and the
# backbone, the training crops, FINCH's per-row labels and indices, tile and chunk buffers: about 1.1 GB
# in the 3.2-million-vector export (5.3 GB at its peak with about 4.2 GB of budgeted arrays live;
# benchmarks/RESULTS.md, "FINCH at 3.2 million vectors: memory").
RESERVE = 3 * GiB // 2
MIN_ARRAYS = GiB // 2  # the least a limit must leave for the arrays: less builds nothing but tiny categories
# Default limit: this share of MemAvailable. The rest is page cache for the memory-mapped features (11.5 GB
# at 3.2 million vectors) and spilled arrays, which the search reads back at random: spilling is fast only
# while they stay cached.
DEFAULT_SHARE = 1 / 3
MADV_PAGEOUT = 21  # linux/mman.h: write back and reclaim these pages (Linux 5.4+; elsewhere the advice is ignored)
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def release_free_heap() -> None:
    """Give the heap memory that is free back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed heap memory in the process, and FINCH's searches free many chunk-sized buffers among
    long-lived arrays: after level 0's search at 3.2 million vectors 4.9 GB of anonymous memory was free heap,
    which the budget cannot see (9.3 GB anonymous within a 4.7 GB budget; 4.4 GB after a trim).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return
    trim(0)


def parse_size(text: str, flag: str = "--memory-limit") -> int:
    """Bytes of a size such as ``8G``, ``512M``, ``1.5GiB`` or ``8000000000`` (K, M, G, T: powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ProtoADError(f"bad {flag} {text!r}: expected a size such as 8G, 512M or 1.5GiB")
    return int(float(match[1]) * UNITS[match[2].upper()])


def format_size(n: float) -> str:
    """``n`` bytes for a log line: ``6.3 GB`` (GiB, as --memory-limit counts)."""
    for unit, scale in (("GB", GiB), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable: what the kernel can give without swapping (free memory and reclaimable cache)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ProtoADError(f"no MemAvailable in {meminfo}: give --memory-limit")


def default_limit(available: int) -> int:
    """The limit without --memory-limit: ``DEFAULT_SHARE`` of the available memory, at least the least that builds."""
    return max(RESERVE + MIN_ARRAYS, int(available * DEFAULT_SHARE))


def arrays_within(limit: int) -> int:
    """The bytes a build's anonymous memory ``limit`` leaves FINCH's large arrays; a limit too small to build is
    an error naming the flag."""
    if limit < RESERVE + MIN_ARRAYS:
        raise ProtoADError(f"--memory-limit {format_size(limit)} is too small to build: the build needs "
                           f"{format_size(RESERVE)} for itself and at least {format_size(MIN_ARRAYS)} for its arrays "
                           f"(give at least {format_size(RESERVE + MIN_ARRAYS)})")
    return limit - RESERVE


class MemoryBudget:
    """Allocates FINCH's large arrays in memory while they fit within ``arrays`` bytes, else spilled.

    An in-memory array counts against the budget until it is garbage-collected (with every view of it).
    A spilled one is a memmap of a file in ``spill_dir`` that is unlinked at once (the mapping keeps it
    until the array goes), with its blocks reserved up front so that a full disk is an error here, not a
    SIGBUS later. Every spill is logged: what, how big, where.
    """

    def __init__(self, arrays: float = math.inf, spill_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        """``arrays``: bytes in memory (default: unbounded, nothing spills; a build's: ``arrays_within``);
        ``spill_dir`` default: the temporary folder."""
        self.arrays = arrays
        self.spill_dir = Path(spill_dir or tempfile.gettempdir())
        self.log = log
        self.held = 0  # bytes of the live in-memory arrays
        self.spilled = 0  # bytes spilled so far, all told
        self._files: dict[int, int] = {}  # the live spilled arrays: address -> bytes

    def empty(self, shape: tuple[int, ...], dtype: type, what: str) -> np.ndarray:
        """An uninitialised array (in memory or spilled)."""
        return self._allocate(shape, np.dtype(dtype), what, np.empty)

    def zeros(self, shape: tuple[int, ...], dtype: type, what: str) -> np.ndarray:
        """A zero-filled array (a spilled file starts as zeros)."""
        return self._allocate(shape, np.dtype(dtype), what, np.zeros)

    def full(self, shape: tuple[int, ...], value: float, dtype: type, what: str) -> np.ndarray:
        out = self.empty(shape, dtype, what)
        out.fill(value)
        return out

    def park(self, address: int) -> None:
        """Write back the spilled array at ``address`` and drop its pages from the page cache, as it will sit idle
        (the search's projection between FINCH levels): at 3.2 million vectors the features, the projection and
        level 0's cluster sums (24.5 GB) outgrow a 24 GB machine's page cache, and level 0's sums read the
        features at random. Its pages come back from the disk when next read; an array in memory is left alone."""
        nbytes = self._files.get(address)
        if nbytes:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), MADV_PAGEOUT)

    def in_file(self, array: np.ndarray) -> bool:
        """Whether ``array`` is one of the live spilled arrays this budget made."""
        return array.ctypes.data in self._files

    def room(self) -> float:
        """Bytes that more in-memory arrays may take now (infinite when unbounded)."""
        return max(0.0, self.arrays - self.held)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more stay in memory with the arrays held now."""
        return self.held + nbytes <= self.arrays

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype, what: str,
                  make: Callable[..., np.ndarray]) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        if self.fits(nbytes):
            out = make(shape, dtype)
            self.held += nbytes
            weakref.finalize(out, self._release, nbytes)
            return out
        return self._spill(shape, dtype, nbytes, what)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes

    def _spill(self, shape: tuple[int, ...], dtype: np.dtype, nbytes: int, what: str) -> np.ndarray:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".protoad-spill.", suffix=".bin", dir=self.spill_dir)
        try:
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))
            except OSError as exc:
                raise ProtoADError(f"no room to spill {what} ({format_size(nbytes)}) in {self.spill_dir}: "
                                   f"{exc.strerror}; free disk space there or raise --memory-limit") from None
            out = np.memmap(name, dtype=dtype, mode="r+", shape=shape)
        finally:
            os.close(fd)
            os.unlink(name)
        self.spilled += nbytes
        self._files[out.ctypes.data] = nbytes
        weakref.finalize(out, self._files.pop, out.ctypes.data, None)
        self.log(f"memory: spilled {what} ({format_size(nbytes)}) to a file in {self.spill_dir}: "
                 f"{format_size(self.held)} of the arrays' {format_size(self.arrays)} already in memory")
        return out
