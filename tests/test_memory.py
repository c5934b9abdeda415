"""The build's memory budget: sizes, the default limit, what spills and when, and that spilling changes nothing."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest

from protoad_edge.builder import memory
from protoad_edge.builder.memory import (
    GiB,
    MemoryBudget,
    arrays_within,
    available_bytes,
    default_limit,
    format_size,
    parse_size,
)
from protoad_edge.errors import ProtoADError


@pytest.mark.parametrize(
    "text, size",
    [
        ("8G", 8 * GiB),
        ("8g", 8 * GiB),
        ("8GB", 8 * GiB),
        ("8GiB", 8 * GiB),
        (" 8 G ", 8 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("512M", 512 * 2**20),
        ("64k", 64 * 1024),
        ("1T", 2**40),
        ("8000000000", 8_000_000_000),
        (".5G", GiB // 2),
    ],
)
def test_sizes_parse_in_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["banana", "", "G", "-1G", "8X", "8 G B", "1e9", "8G8"])
def test_a_bad_size_names_the_flag(text: str) -> None:
    with pytest.raises(ProtoADError, match=r"^bad --memory-limit .*expected a size such as 8G"):
        parse_size(text)


def test_sizes_print_in_the_largest_unit() -> None:
    assert [format_size(n) for n in (6.3 * GiB, 300 * 2**20, 2048, 12)] == ["6.3 GB", "300.0 MB", "2.0 KB", "12 B"]


def test_available_memory_is_memavailable(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684096 kB\nMemFree:         9950312 kB\nMemAvailable:   24097012 kB\n")
    assert available_bytes(meminfo) == 24097012 * 1024
    meminfo.write_text("MemTotal:       24684096 kB\n")
    with pytest.raises(ProtoADError, match="--memory-limit"):
        available_bytes(meminfo)
    assert available_bytes() > 0  # this machine's


def test_the_default_limit_is_a_third_of_the_available_memory() -> None:
    """24 GB available (these machines): 8 GB, the issue's bound; the rest caches the features and spilled arrays."""
    assert default_limit(24 * GiB) == 8 * GiB
    assert default_limit(15 * GiB) == 5 * GiB  # a 16 GB workstation
    assert default_limit(GiB) == memory.RESERVE + memory.MIN_ARRAYS  # never below what builds


def test_the_limit_leaves_the_arrays_all_but_the_reserve() -> None:
    assert arrays_within(8 * GiB) == 8 * GiB - memory.RESERVE
    least = memory.RESERVE + memory.MIN_ARRAYS
    assert arrays_within(least) == memory.MIN_ARRAYS
    with pytest.raises(ProtoADError, match=r"^--memory-limit 2.0 GB is too small to build: .* at least 2.0 GB"):
        arrays_within(least - 1)


def test_arrays_stay_in_memory_while_they_fit_and_count_until_freed(tmp_path: Path) -> None:
    lines: list[str] = []
    budget = MemoryBudget(1000, tmp_path, lines.append)
    a = budget.empty((100,), np.float64, "a")  # 800 bytes
    assert type(a) is np.ndarray and budget.held == 800
    b = budget.zeros((50,), np.float32, "b")  # 200 bytes: exactly full
    assert type(b) is np.ndarray and budget.held == 1000 and not b.any()
    view = a[10:]
    del a
    gc.collect()
    assert budget.held == 1000  # a view keeps it
    del view, b
    gc.collect()
    assert budget.held == 0 and lines == [] and budget.spilled == 0


def test_an_array_that_does_not_fit_spills_to_an_unlinked_file_and_says_so(tmp_path: Path) -> None:
    lines: list[str] = []
    budget = MemoryBudget(1000, tmp_path / "spill", lines.append)
    kept = budget.empty((100,), np.float64, "kept")
    spilled = budget.full((10, 30), -np.inf, np.float32, "the candidates")  # 1,200 bytes alone: over the budget
    assert isinstance(spilled, np.memmap) and (spilled == -np.inf).all()
    zeros = budget.zeros((300,), np.int64, "the sums")
    assert isinstance(zeros, np.memmap) and not zeros.any()
    assert budget.held == 800 and budget.spilled == 1200 + 2400
    assert list((tmp_path / "spill").iterdir()) == []  # the mappings hold the files, nothing is left behind
    assert lines[0] == (
        f"memory: spilled the candidates (1.2 KB) to a file in {tmp_path / 'spill'}: "
        "800 B of the arrays' 1000 B already in memory"
    )
    assert len(lines) == 2 and "the sums (2.3 KB)" in lines[1]
    zeros[:] = 7  # writable
    assert int(zeros.sum()) == 2100
    del kept


def test_an_array_larger_than_the_room_keeps_its_first_pages_in_memory_and_the_rest_in_a_file(tmp_path: Path) -> None:
    """One contiguous array: its first bytes, whole pages up to the budget's room, anonymous memory; the rest a
    file mapped behind them. Values cross the boundary intact, and each part counts where it lives."""
    lines: list[str] = []
    budget = MemoryBudget(64 * 2**20 + 1000, tmp_path, lines.append)  # room for 64 MB and a partial page
    anon, file = rss_anon(), rss_file()
    x = budget.zeros((1000, 40_000), np.float32, "the projection")  # 160 MB, a row (160,000 bytes) across the edge
    assert type(x) is np.ndarray and x.flags.writeable and x.shape == (1000, 40_000) and not x[::50].any()
    assert budget.held == 64 * 2**20 and budget.spilled == x.nbytes - 64 * 2**20
    assert lines == [
        f"memory: spilled the projection (152.6 MB) to a file in {tmp_path}: 0 B of the arrays' 64.0 MB "
        "already in memory; its first 64.0 MB fill the rest, 88.6 MB spilled"
    ]
    x[:] = np.arange(40_000, dtype=np.float32)
    edge = 64 * 2**20 // x.strides[0]
    assert (x[edge - 1 : edge + 2] == np.arange(40_000, dtype=np.float32)).all()
    assert abs((rss_anon() - anon) - 64 * 2**20) < 16 * 2**20  # the head in memory...
    assert abs((rss_file() - file) - 88.6 * 2**20) < 16 * 2**20  # ...the rest in the page cache
    assert float(x[:, 7].sum()) == 7 * 1000
    assert list(tmp_path.iterdir()) == []
    del x
    gc.collect()
    assert budget.held == 0 and rss_anon() - anon < 16 * 2**20


def test_a_shrunk_array_gives_back_the_memory_and_file_blocks_behind_its_first_rows(tmp_path: Path) -> None:
    """FINCH's next level lives in the first rows of the level before's array: the pages behind them go back to the
    system and to the budget's room at once, and a spilled part's pages are dropped, not written back."""
    page = mmap.PAGESIZE
    budget = MemoryBudget(64 * 2**20 + 1000, tmp_path, lambda _: None)
    anon, file = rss_anon(), rss_file()
    x = budget.zeros((1000, 40_000), np.float32, "the projection")  # 160 MB: 64 MB in memory, the rest in a file
    x[:] = np.arange(40_000, dtype=np.float32)
    assert rss_file() - file > 80 * 2**20
    head = budget.shrink(x[:300], 100)  # a view of the first rows, as FINCH passes it: 16 MB kept
    assert head.shape == (100, 40_000) and (head[99] == np.arange(40_000, dtype=np.float32)).all()
    assert 0 <= budget.held - head.nbytes < page
    assert abs((rss_anon() - anon) - head.nbytes) < 8 * 2**20 and rss_file() - file < 8 * 2**20
    again = budget.shrink(head, 10)  # and again, for the level after
    assert 0 <= budget.held - again.nbytes < page and (again[9] == np.arange(40_000, dtype=np.float32)).all()
    del x, head, again
    gc.collect()
    assert budget.held == 0
    budget.held = budget.arrays  # as if the room were taken: the next array spills whole
    whole = budget.zeros((1000, 70_000), np.float32, "too much")  # 280 MB, all in a file
    whole[:] = 1
    file = rss_file()
    assert budget.shrink(whole, 10).shape == (10, 70_000) and file - rss_file() > 250 * 2**20
    outside = np.ones((1000, 100), np.float32)
    assert budget.shrink(outside, 10).base is outside and budget.held == budget.arrays  # not the budget's: sliced


def vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds ``address`` (``hg``: huge pages advised)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_pages_are_advised_unless_asked_not_to(tmp_path: Path) -> None:
    """The search's projection is filled while the features fill the page cache: huge pages cost the kernel a
    compaction each there, so it asks for none; the other arrays get them, as numpy's would."""
    budget = MemoryBudget(64 * 2**20, tmp_path, lambda _: None)
    advised = budget.zeros((4 * 2**20,), np.float32, "sums")  # 16 MB in memory
    plain = budget.empty((4 * 2**20,), np.float32, "the projection", huge_pages=False)
    split = budget.empty((16 * 2**20,), np.float32, "the lists")  # 64 MB: 32 MB of room left
    assert "hg" in vm_flags(advised.ctypes.data) and "hg" not in vm_flags(plain.ctypes.data)
    assert "hg" in vm_flags(split.ctypes.data) and "hg" not in vm_flags(split.ctypes.data + split.nbytes - 1)
    del split
    gc.collect()
    plain_split = budget.empty((16 * 2**20,), np.float32, "the projection", huge_pages=False)  # 32 MB in memory
    assert budget.held == 64 * 2**20 and "hg" not in vm_flags(plain_split.ctypes.data)


def test_the_search_asks_no_huge_pages_for_its_projection() -> None:
    pytest.importorskip("torch")
    from protoad_edge.builder.neighbours import project

    x = np.random.default_rng(0).standard_normal((3000, 600)).astype(np.float16)
    assert "hg" not in vm_flags(project(x, 64, 1000, 0, MemoryBudget()).y.data_ptr())


def test_kept_room_is_taken_from_what_is_allocated_before_it_until_given_back(tmp_path: Path) -> None:
    lines: list[str] = []
    budget = MemoryBudget(1 << 20, tmp_path, lines.append)
    give_back = budget.reserve(3 << 18)  # 768 KB of 1 MB kept for later
    first = budget.zeros((1 << 18,), np.uint8, "the projection")  # 256 KB: exactly the rest
    second = budget.zeros((4096,), np.uint8, "more")
    assert type(first) is np.ndarray and isinstance(second, np.memmap) and len(lines) == 1
    give_back()
    give_back()  # once only
    assert budget.held == 1 << 18 and budget.room() == 3 << 18
    assert type(budget.zeros((3 << 18,), np.uint8, "the lists")) is np.ndarray and len(lines) == 1


def test_a_full_disk_is_an_error_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(memory.os, "posix_fallocate", no_space)
    with pytest.raises(ProtoADError, match=r"^no room to spill the sums \(8.0 KB\) in .*raise --memory-limit"):
        MemoryBudget(10, tmp_path).zeros((1024,), np.float64, "the sums")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_array_spills_when_kept_room_overfills_the_budget(tmp_path: Path) -> None:
    budget = MemoryBudget(1000, tmp_path, lambda _: None)
    budget.reserve(2000)  # more than the budget: nothing fits, not even 0 bytes
    assert budget.zeros((0, 512), np.float32, "the sums").shape == (0, 512)


def test_unbounded_spills_nothing(tmp_path: Path) -> None:
    budget = MemoryBudget(spill_dir=tmp_path)
    assert type(budget.empty((1000, 1000), np.float32, "x")) is np.ndarray and budget.spilled == 0


@pytest.mark.parametrize(
    ("limit", "split", "whole", "in_memory"),
    [
        # 64 MB: room is kept for the candidate lists (written at random), so the projection (written once, in order)
        # spills its end instead; summed into the next level's in its first rows, it gives the rest back to the sums
        (64_000_000, ("the search's projection",), (), ("the search's candidate", "FINCH level 0 cluster sums")),
        # 3 MB: the lists alone (6 MB) are more than the budget: the projection spills whole, the lists split
        (3_000_000, ("the search's candidate indices", "FINCH level 0 cluster sums"), ("the search's projection",), ()),
    ],
)
@pytest.mark.slow
def test_finch_within_a_small_budget_spills_and_gives_the_same_partitions(
    tmp_path: Path, limit: int, split: tuple[str, ...], whole: tuple[str, ...], in_memory: tuple[str, ...]
) -> None:
    """Spilled arrays keep their dtype: every level's partition and the prototypes are bit for bit the same, whichever
    arrays the budget splits."""
    torch = pytest.importorskip("torch")
    from protoad_edge.builder.finch import finch
    from protoad_edge.builder.neighbours import make_search

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, 600)).astype(np.float32)
    x = (centres[rng.integers(0, 300, 30_000)] + 0.7 * rng.standard_normal((30_000, 600), np.float32)).astype(
        np.float16
    )

    def run(budget: MemoryBudget):
        return finch(
            x,
            max_prototypes=20,
            search=make_search(exact_up_to=2000, budget=budget, log=lambda _: None),
            budget=budget,
            log=lambda _: None,
        )

    lines: list[str] = []
    small = MemoryBudget(limit, tmp_path, lines.append)
    spilled, unbounded = run(small), run(MemoryBudget())
    assert spilled.counts == unbounded.counts and len(spilled.counts) >= 3
    for a, b in zip(spilled.partitions, unbounded.partitions):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(spilled.prototypes, unbounded.prototypes)
    said = "\n".join(lines)
    for what in split:  # in memory up to the room, the rest in a file
        assert re.search(f"memory: spilled {what} .*; its first [\\d.]+ [KM]B fill the rest", said)
    for what in whole:  # no room left: all in a file
        assert re.search(f"memory: spilled {what} .* already in memory$", said, re.MULTILINE)
    for what in in_memory:
        assert f"memory: spilled {what}" not in said
    assert list(tmp_path.iterdir()) == []


def rss_file() -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("RssFile:")
    )


def rss_anon() -> int:
    return next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("RssAnon:")
    )


def test_free_heap_memory_goes_back_to_the_system() -> None:
    """Small buffers freed among live ones stay in glibc's heap (anonymous memory the budget cannot see) until
    it is trimmed."""
    from protoad_edge.builder.memory import release_free_heap

    chunks = [np.ones(100_000, np.uint8) for _ in range(3000)]  # below glibc's mmap threshold: on the heap
    kept = chunks[::10]
    del chunks
    gc.collect()
    before = rss_anon()
    release_free_heap()
    assert before - rss_anon() > 200 * 2**20
    assert all(int(k[0]) == 1 for k in kept)
