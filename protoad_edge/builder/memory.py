"""The build's memory budget: how much anonymous memory FINCH's large arrays may hold, and where the rest goes.

At VisA and BTAD scale (3.2 million patch vectors of 1792) FINCH's largest arrays - level 0's cluster
sums (float32 [K0, 1792], 6-9 GB), the search's projection (float32 [N, 512], 6.6 GB) and its candidate
lists - outgrow a 16 GB workstation together. Each one is allocated through a ``MemoryBudget``: in memory
while the arrays it holds fit within the limit; else its first bytes, as many as the limit still has room
for, in memory and the rest in a file in the spill folder (the feature cache's, which already holds the
features), mapped behind them in one address range, so the code that uses it sees one plain array. The
spilled part keeps its dtype, so the arithmetic, and the partition, are the same; its pages are the
kernel's page cache, written back and dropped under pressure instead of filling memory that only the OOM
killer can free.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import re
import tempfile
import weakref
from dataclasses import dataclass
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
MAP_FIXED = 0x10  # linux/mman.h: map the file exactly behind an array's part in memory
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
        raise ProtoADError(
            f"--memory-limit {format_size(limit)} is too small to build: the build needs "
            f"{format_size(RESERVE)} for itself and at least {format_size(MIN_ARRAYS)} for its arrays "
            f"(give at least {format_size(RESERVE + MIN_ARRAYS)})"
        )
    return limit - RESERVE


class MemoryBudget:
    """Allocates FINCH's large arrays in memory while they fit within ``arrays`` bytes, else partly spilled.

    An array's bytes in memory count against the budget until it is garbage-collected (with every view of it).
    One that does not fit keeps its first bytes, up to the budget's room (whole pages), in memory, and the rest
    is a shared mapping of a file in ``spill_dir`` placed right behind them: one contiguous array, so nothing
    that reads or writes it changes. At 3.2 million vectors this keeps 5.5 GB of the search's 6.1 GB projection
    in memory; spilled whole (it missed the default budget by a few MB), the kernel wrote it back as it was filled
    and the search read it back from the page cache, 4 KB at a time. The file is unlinked at once
    (the mapping keeps it until the array goes), with its blocks reserved up front so that a full disk is an error
    here, not a SIGBUS later. Every spill is logged: what, how big, where.
    """

    def __init__(
        self, arrays: float = math.inf, spill_dir: Path | None = None, log: Callable[[str], None] = print
    ) -> None:
        """``arrays``: bytes in memory (default: unbounded, nothing spills; a build's: ``arrays_within``);
        ``spill_dir`` default: the temporary folder."""
        self.arrays = arrays
        self.spill_dir = Path(spill_dir or tempfile.gettempdir())
        self.log = log
        self.held = 0  # bytes of the live in-memory arrays
        self.spilled = 0  # bytes spilled so far, all told
        self._live: dict[int, _Allocation] = {}  # by data address: the live arrays, for ``shrink``

    def empty(self, shape: tuple[int, ...], dtype: type, what: str, huge_pages: bool = True) -> np.ndarray:
        """An uninitialised array (in memory or spilled).

        ``huge_pages``: advise 2 MB pages for the part in memory, as numpy does for its large arrays. Off for an
        array filled while the features fill the page cache: at 3.2 million vectors the search's projection filled
        3.8 s slower in huge pages (48.6 s against 44.8 s, the mean of two side by side), the kernel compacting
        memory for them, while level 0's sums, allocated just after 5.5 GB were freed, are summed faster in them."""
        return self._allocate(shape, np.dtype(dtype), what, huge_pages)

    def zeros(self, shape: tuple[int, ...], dtype: type, what: str, huge_pages: bool = True) -> np.ndarray:
        """A zero-filled array: new anonymous memory and a new spill file both read as zeros."""
        return self._allocate(shape, np.dtype(dtype), what, huge_pages)

    def full(self, shape: tuple[int, ...], value: float, dtype: type, what: str) -> np.ndarray:
        out = self.empty(shape, dtype, what)
        out.fill(value)
        return out

    def reserve(self, nbytes: int) -> Callable[[], None]:
        """Keep ``nbytes`` of room for an array allocated later; returns the call that gives it back (once).

        The search's candidate lists are written at random, a few bytes at a time: spilled, the kernel wrote 6.6 GB
        back for 0.65 GB of lists at 3.2 million vectors. Kept room puts them in memory and spills instead the end of
        the projection allocated before them, which is written once, in order."""
        self.held += nbytes
        given = []

        def give_back() -> None:
            if not given:
                given.append(True)
                self.held -= nbytes

        return give_back

    def shrink(self, array: np.ndarray, rows: int) -> np.ndarray:
        """``array[:rows]``, with the memory and file blocks behind those rows given back now: the pages in memory to
        the system and to the budget's room, the spilled ones dropped from the file without being written back.

        FINCH sums each level's rows into the first rows of the same array (``finch.sum_groups_in_place``): the
        next level's rows then take the pages already in memory, and what the level before no longer needs is
        freed here instead of when the whole array goes. The rows behind ``rows`` must not be used again (they
        read as zeros). ``array`` may be the array or a view of its first rows; one the budget did not allocate is
        only sliced."""
        out = array[:rows]
        live = self._live.get(array.ctypes.data)
        if live is None or not array.flags.c_contiguous:
            return out
        start = array.ctypes.data
        keep = _page_up(start + out.nbytes)
        in_memory = max(0, start + live.counted - keep) // mmap.PAGESIZE * mmap.PAGESIZE
        if in_memory:
            _madvise(keep, in_memory, mmap.MADV_DONTNEED)  # anonymous pages: freed, and read as zeros after
            self.held -= in_memory
            live.counted -= in_memory
        spilled_from = max(keep, start + live.head)
        if spilled_from < start + live.nbytes:  # the file's blocks: punched out, dirty pages dropped unwritten
            _madvise(spilled_from, start + live.nbytes - spilled_from, getattr(mmap, "MADV_REMOVE", 9), strict=False)
        return out

    def room(self) -> float:
        """Bytes that more in-memory arrays may take now (infinite when unbounded)."""
        return max(0.0, self.arrays - self.held)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more stay in memory with the arrays held now."""
        return self.held + nbytes <= self.arrays

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype, what: str, huge_pages: bool) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        if self.fits(nbytes):
            out = _mapped(nbytes, nbytes, shape, dtype, huge_pages)
            self._count(out, nbytes, nbytes)
            return out
        return self._spill(shape, dtype, nbytes, what, huge_pages)

    def _count(self, out: np.ndarray, head: int, nbytes: int) -> None:
        """Hold ``out``'s first ``head`` bytes (in memory) until it and every view of it are garbage-collected."""
        owner = out
        while isinstance(owner.base, np.ndarray):  # what every view of ``out`` refers to: the array on the buffer
            owner = owner.base
        live = self._live[out.ctypes.data] = _Allocation(head, head, nbytes)
        self.held += head
        weakref.finalize(owner, self._release, out.ctypes.data, live)

    def _release(self, address: int, live: _Allocation) -> None:
        self.held -= live.counted
        self._live.pop(address, None)

    def _spill(self, shape: tuple[int, ...], dtype: np.dtype, nbytes: int, what: str, huge_pages: bool) -> np.ndarray:
        head = int(self.room()) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages in memory: what room is left
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".protoad-spill.", suffix=".bin", dir=self.spill_dir)
        try:
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes - head))  # 0 bytes is EINVAL
            except OSError as exc:
                raise ProtoADError(
                    f"no room to spill {what} ({format_size(nbytes - head)}) in {self.spill_dir}: "
                    f"{exc.strerror}; free disk space there or raise --memory-limit"
                ) from None
            out = (
                np.memmap(name, dtype=dtype, mode="r+", shape=shape)
                if head == 0
                else _mapped(head, nbytes, shape, dtype, huge_pages, fd)
            )
        finally:
            os.close(fd)
            os.unlink(name)
        said = (
            f"memory: spilled {what} ({format_size(nbytes)}) to a file in {self.spill_dir}: "
            f"{format_size(self.held)} of the arrays' {format_size(self.arrays)} already in memory"
        )
        if head:
            said += f"; its first {format_size(head)} fill the rest, {format_size(nbytes - head)} spilled"
        self._count(out, head, nbytes)
        self.spilled += nbytes - head
        self.log(said)
        return out


@dataclass
class _Allocation:
    """A live array's bytes: in memory and counted now, in memory when allocated (the rest is a file), in all."""

    counted: int
    head: int
    nbytes: int


def _page_up(address: int) -> int:
    return -(-address // mmap.PAGESIZE) * mmap.PAGESIZE


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, for the calls Python's mmap module does not make on an address (64-bit pointers and sizes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return libc


def _errno_error(call: str) -> OSError:
    return OSError(ctypes.get_errno(), f"{call}: {os.strerror(ctypes.get_errno())}")


def _madvise(address: int, length: int, advice: int, strict: bool = True) -> None:
    """madvise(2) on a range of an array's pages; ``strict=False``: a filesystem that cannot punch holes keeps them."""
    if _libc().madvise(address, length, advice) != 0 and strict:
        raise _errno_error("madvise")


def _mapped(
    head: int, nbytes: int, shape: tuple[int, ...], dtype: np.dtype, huge_pages: bool, fd: int | None = None
) -> np.ndarray:
    """An array of ``nbytes`` whose first ``head`` bytes (whole pages, or all of it) are anonymous memory, in huge
    pages if ``huge_pages``, and the rest the file ``fd`` from offset 0, mapped right behind them. Freeing the array
    unmaps both (the anonymous mapping's range covers the file's)."""
    area = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)  # anonymous, private: the process's own memory
    if huge_pages and head and hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        area.madvise(mmap.MADV_HUGEPAGE, 0, head)
    out = np.frombuffer(area, dtype=dtype, count=math.prod(shape)).reshape(shape)
    if fd is None:
        return out
    tail = out.ctypes.data + head
    if _libc().mmap(tail, nbytes - head, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, fd, 0) != tail:
        raise _errno_error("cannot map a spill file")
    return out
