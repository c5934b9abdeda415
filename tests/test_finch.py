"""FINCH: exact first neighbours in bounded memory, and partitions equal to finch-clust's, level by level."""

from __future__ import annotations

import gc
import mmap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
finch_clust = pytest.importorskip("finch")

import protoad_edge.builder.finch as finch_module  # noqa: E402
from protoad_edge.builder import neighbours  # noqa: E402
from protoad_edge.builder.finch import Neighbours, finch, first_neighbours  # noqa: E402
from protoad_edge.builder.memory import MemoryBudget  # noqa: E402
from protoad_edge.builder.neighbours import approximate_first_neighbours, make_search  # noqa: E402
from protoad_edge.errors import ProtoADError  # noqa: E402


def blobs(seed: int, n: int, dim: int, groups: int, per_group: int, spread: float) -> np.ndarray:
    """Unit vectors in blobs around centres that are themselves grouped: several FINCH levels."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((groups, dim))
    centres = np.repeat(top, per_group, axis=0) + 0.8 * rng.standard_normal((groups * per_group, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered by first appearance, so that equal partitions give equal arrays."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def reference_levels(x: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """finch-clust's partitions on its exact path (ann_threshold above N), with its default early exit."""
    c, counts, _ = finch_clust.FINCH(
        x, distance="cosine", ann_threshold=len(x) + 1, ensure_early_exit=True, verbose=False
    )
    return [c[:, i] for i in range(c.shape[1])], list(counts)


def brute_force(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 cosine similarity matrix (diagonal -inf) and its row-wise first argmax."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    s = xn @ xn.T
    np.fill_diagonal(s, -np.inf)
    return s, s.argmax(axis=1)


DATASETS = {
    "d64": dict(seed=0, n=3000, dim=64, groups=6, per_group=5, spread=0.5),
    "d256": dict(seed=1, n=2500, dim=256, groups=10, per_group=8, spread=0.3),
    "d1792": dict(seed=2, n=1500, dim=1792, groups=4, per_group=4, spread=1.0),
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def case(request: pytest.FixtureRequest) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    x = blobs(**DATASETS[request.param])
    return (x, *reference_levels(x))


# ---------------------------------------------------------------- first neighbours


@pytest.mark.parametrize("block", [1, 7, 16, 49, 50, None])
def test_first_neighbours_breaks_exact_ties_by_lowest_index(block: int | None) -> None:
    # Rows with four entries of +-0.5: unit norm and every dot product exact, so ties are real ties,
    # spread over blocks (sizes not dividing N included).
    rng = np.random.default_rng(3)
    x = np.zeros((50, 8), np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    x[[4, 17, 31, 49]] = x[40]  # exact duplicates in different blocks
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    assert (s == s.max(axis=1, keepdims=True)).sum(axis=1).max() > 1  # the data really has ties
    nn = first_neighbours(x, block=block)
    np.testing.assert_array_equal(nn.index, s.argmax(axis=1))
    np.testing.assert_array_equal(nn.similarity, s.max(axis=1))
    assert list(nn.index[[4, 17, 31, 40, 49]]) == [17, 4, 4, 4, 4]


def test_first_neighbours_with_many_duplicate_and_zero_rows() -> None:
    # Columns whose maximum many rows share take another code path; the answer must not change.
    rng = np.random.default_rng(14)
    x = np.zeros((300, 8), np.float32)
    for row in x[:20]:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    x[20:290] = x[rng.integers(0, 20, 270)]  # rows 290-299 stay zero
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    for block in (64, 300):
        nn = first_neighbours(x, block=block)
        np.testing.assert_array_equal(nn.index, s.argmax(axis=1))
        np.testing.assert_array_equal(nn.similarity, s.max(axis=1))


@pytest.mark.parametrize("block", [64, 100, 301, None])
def test_first_neighbours_match_float64_brute_force(block: int | None) -> None:
    x = np.random.default_rng(4).standard_normal((301, 96)).astype(np.float32)
    s, ref = brute_force(x)
    nn = first_neighbours(x, block=block)
    assert nn.index.dtype == np.int64 and nn.similarity.dtype == np.float32
    np.testing.assert_allclose(nn.similarity, s.max(axis=1), atol=2e-6)
    # Where the best two are further apart than float32 rounding, the winner must be the same.
    top2 = np.sort(s, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(nn.index[clear], ref[clear])
    np.testing.assert_allclose(s[np.arange(len(x)), nn.index], s.max(axis=1), atol=2e-6)


def test_first_neighbours_normalise_rows_themselves() -> None:
    # Scaling rows by powers of two changes nothing, bit for bit (normalisation is exact then).
    x = blobs(5, 400, 32, 3, 3, 0.5)
    scales = 2.0 ** np.random.default_rng(5).integers(-6, 7, size=(400, 1))
    a = first_neighbours(x, block=97)
    b = first_neighbours((x * scales).astype(np.float32), block=97)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.similarity, b.similarity)


def test_first_neighbours_small_inputs() -> None:
    one = first_neighbours(np.ones((1, 4), np.float32))
    assert one.index.tolist() == [0] and one.similarity[0] == -np.inf
    two = first_neighbours(np.array([[1, 0], [1, 1]], np.float32))
    assert two.index.tolist() == [1, 0]
    zero = first_neighbours(np.array([[0, 0], [1, 0], [2, 0.1]], np.float32))  # a zero row stays harmless
    assert zero.index.tolist() == [1, 2, 1] and zero.similarity[0] == 0


def test_first_neighbours_keep_to_the_scratch_budget(tmp_path: Path) -> None:
    # A float16 memmap whose float32 copy (2 MB) and similarity matrix (64 MB) both exceed the budget.
    n, dim, budget = 4000, 128, 2**20
    x = blobs(6, n, dim, 5, 4, 0.5)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    features = np.load(tmp_path / "f.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        nn = first_neighbours(features, scratch_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert budget / 2 < peak <= budget  # the blocks are traced, and they fit
    np.testing.assert_array_equal(nn.index, first_neighbours(features.astype(np.float32), block=n).index)


def test_first_neighbours_reject_non_finite_rows() -> None:
    x = np.ones((20, 4), np.float32)
    x[13, 2] = np.nan
    with pytest.raises(ProtoADError, match="rows 7-13"):
        first_neighbours(x, block=7)


# ---------------------------------------------------------------- FINCH levels


def test_partitions_equal_finch_clust_at_every_level(case) -> None:
    x, ref_partitions, ref_counts = case
    assert len(ref_counts) >= 2
    result = finch(x, max_prototypes=1, log=lambda _: None)  # never satisfied: run until merging stops
    assert result.counts == ref_counts
    for ours, ref in zip(result.partitions, ref_partitions):
        np.testing.assert_array_equal(canonical(ours), canonical(ref))


def test_partitions_equal_finch_clust_on_unnormalised_rows() -> None:
    # Means are of the rows as given (finch-clust's cool_mean), not of normalised rows.
    x = blobs(7, 1200, 48, 5, 4, 0.6)
    x = (x * np.random.default_rng(7).uniform(0.2, 3.0, (len(x), 1))).astype(np.float32)
    ref_partitions, ref_counts = reference_levels(x)
    result = finch(x, max_prototypes=1, log=lambda _: None)
    assert result.counts == ref_counts
    for ours, ref in zip(result.partitions, ref_partitions):
        np.testing.assert_array_equal(canonical(ours), canonical(ref))


def test_stops_at_first_partition_below_max_prototypes(case) -> None:
    x, ref_partitions, ref_counts = case
    for limit in (ref_counts[0] + 1, ref_counts[0], ref_counts[1] + 1, ref_counts[-1], 1):
        below = [i for i, count in enumerate(ref_counts) if count < limit]
        chosen = below[0] if below else len(ref_counts) - 1
        result = finch(x, max_prototypes=limit, log=lambda _: None)
        assert result.chosen == chosen and result.counts == ref_counts[: chosen + 1]
        np.testing.assert_array_equal(canonical(result.labels), canonical(ref_partitions[chosen]))
        assert len(result.prototypes) == ref_counts[chosen]


def test_prototypes_are_normalised_cluster_means(case) -> None:
    x = case[0]
    result = finch(x, max_prototypes=50, log=lambda _: None)
    k = result.counts[-1]
    assert result.prototypes.dtype == np.float32 and result.prototypes.shape == (k, x.shape[1])
    assert set(np.unique(result.labels)) == set(range(k))
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, result.labels, x.astype(np.float64))
    means = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    np.testing.assert_allclose(result.prototypes, means, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(result.prototypes, axis=1), 1, atol=1e-6)


def test_deterministic_and_independent_of_block_size() -> None:
    x = blobs(8, 1500, 64, 5, 4, 0.5)
    a = finch(x, max_prototypes=1, log=lambda _: None)
    b = finch(x, max_prototypes=1, log=lambda _: None)
    c = finch(x, max_prototypes=1, scratch_bytes=200_000, log=lambda _: None)  # tiles of 137 rows
    for other in (b, c):
        assert other.counts == a.counts
        for p, q in zip(a.partitions, other.partitions):
            np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)


def test_float16_memmap_gives_the_float32_result(tmp_path: Path) -> None:
    x16 = blobs(9, 1500, 64, 5, 4, 0.5).astype(np.float16)
    np.save(tmp_path / "f.npy", x16)
    a = finch(np.load(tmp_path / "f.npy", mmap_mode="r"), max_prototypes=30, log=lambda _: None)
    b = finch(x16.astype(np.float32), max_prototypes=30, log=lambda _: None)
    assert a.counts == b.counts
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)


def test_logs_count_and_time_of_each_level() -> None:
    lines: list[str] = []
    result = finch(blobs(10, 800, 32, 4, 4, 0.5), max_prototypes=1, log=lines.append)
    for level, count in enumerate(result.counts):
        prefix = f"FINCH level {level}: {count} clusters"
        assert any(line.startswith(prefix) and " s)" in line for line in lines)
    assert len(result.level_seconds) == len(result.counts) and min(result.level_seconds) >= 0
    assert lines[-1] == f"FINCH chose level {result.chosen}: {result.counts[-1]} prototypes"


@pytest.mark.parametrize("exact_up_to", [10**9, 99], ids=["exact", "approximate"])
def test_progress_bar_for_every_level(exact_up_to: int, capsys: pytest.CaptureFixture[str]) -> None:
    x = low_rank_blobs(12, 1200, 600, 8, 30)  # wider than the projection: the approximate path runs
    search = make_search(exact_up_to=exact_up_to, log=lambda _: None)
    result = finch(x, max_prototypes=1, search=search, progress=True, log=lambda _: None)
    bars = capsys.readouterr().err
    for level in range(len(result.counts) + 1):  # the levels kept and the one that stopped the merging
        assert f"FINCH level {level}" in bars
    finch(x, max_prototypes=1, search=search, log=lambda _: None)
    assert "FINCH level" not in capsys.readouterr().err


class ScriptedSearch:
    """A search backend that answers with given first neighbours, level by level, and records its inputs."""

    def __init__(self, *levels: list[int]) -> None:
        self.levels, self.inputs, self.told = list(levels), [], []

    def __call__(self, x: np.ndarray, *, progress: str | None = None) -> Neighbours:
        self.inputs.append(np.array(x, np.float64))
        index = np.array(self.levels[len(self.inputs) - 1])
        return Neighbours(index, np.zeros(len(index), np.float32))

    def next_level(self, labels: np.ndarray | None, count: int = 0) -> None:
        """What FINCH said after each search: (searches so far, the labels as a list or None, count)."""
        self.told.append((len(self.inputs), None if labels is None else labels.tolist(), count))


def test_level_merging_one_pair_is_discarded() -> None:
    x = np.random.default_rng(11).standard_normal((8, 5)).astype(np.float32)
    # Level 0: pairs {0,1} {2,3} {4,5} {6,7}; level 1 would merge only clusters 0 and 1 (4 -> 3).
    search = ScriptedSearch([1, 0, 3, 2, 5, 4, 7, 6], [1, 0, 2, 3])
    result = finch(x, max_prototypes=1, search=search, log=lambda _: None)
    assert result.counts == [4] and len(search.inputs) == 2
    # Level 1 searches the sums of the original points (cosine: the directions of their means); the search was
    # told, before it, which level-0 rows each sum adds up, and after it that no level follows.
    np.testing.assert_allclose(search.inputs[1], x.reshape(4, 2, 5).astype(np.float64).sum(axis=1), atol=1e-6)
    assert search.told == [(1, [0, 0, 1, 1, 2, 2, 3, 3], 4), (2, None, 0)]


def test_level_reaching_one_cluster_is_discarded() -> None:
    x = np.random.default_rng(12).standard_normal((8, 5)).astype(np.float32)
    # Level 1 merges 4 -> 2 (kept); level 2 would merge the two into one (discarded).
    search = ScriptedSearch([1, 0, 3, 2, 5, 4, 7, 6], [1, 0, 3, 2], [1, 0])
    result = finch(x, max_prototypes=1, search=search, log=lambda _: None)
    assert result.counts == [4, 2] and len(search.inputs) == 3
    np.testing.assert_array_equal(canonical(result.labels), [0, 0, 0, 0, 1, 1, 1, 1])
    assert search.told == [(1, [0, 0, 1, 1, 2, 2, 3, 3], 4), (2, [0, 0, 1, 1], 2), (3, None, 0)]


def test_the_search_is_told_no_level_follows_once_a_partition_is_small_enough() -> None:
    """A level below ``max_prototypes`` ends FINCH: the search is not asked to prepare a level that never comes."""
    x = np.random.default_rng(13).standard_normal((8, 5)).astype(np.float32)
    search = ScriptedSearch([1, 0, 3, 2, 5, 4, 7, 6], [1, 0, 3, 2])
    assert finch(x, max_prototypes=5, search=search, log=lambda _: None).counts == [4]
    assert search.told == [(1, None, 4)]
    search = ScriptedSearch([1, 0, 3, 2, 5, 4, 7, 6], [1, 0, 3, 2])
    assert finch(x, max_prototypes=3, search=search, log=lambda _: None).counts == [4, 2]
    assert search.told == [(1, [0, 0, 1, 1, 2, 2, 3, 3], 4), (2, None, 2)]


# ---------------------------------------------------------------- approximate search


def low_rank_blobs(seed: int, n: int, dim: int, rank: int, groups: int) -> np.ndarray:
    """Clustered unit vectors whose variance decays over a few directions, as real patch features'."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T  # [rank, dim], orthonormal rows
    centres = rng.standard_normal((groups, rank)) * np.geomspace(3, 0.3, rank)
    z = centres[rng.integers(0, groups, n)] + rng.standard_normal((n, rank)) * np.geomspace(1, 0.05, rank)
    x = z @ basis + 0.01 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_neighbours_recall() -> None:
    x = low_rank_blobs(15, 4000, 256, 48, 20)
    exact = first_neighbours(x)
    # 3 probes: recall 0.991 (2: 0.954; 3 before pairs were found both ways: 0.943)
    approx = approximate_first_neighbours(x, dims=32, candidates=16, sample=2000, probes=3)
    # A hit: the exact neighbour, or one exactly as similar in float32 (the re-rank is full FP32).
    hit = (approx.index == exact.index) | (np.abs(approx.similarity - exact.similarity) <= 1e-6)
    assert hit.mean() >= 0.95
    assert (approx.index != np.arange(len(x))).all()
    s = x @ x.T  # every answer's similarity is the true one of the pair it names
    np.testing.assert_allclose(approx.similarity, s[np.arange(len(x)), approx.index], atol=1e-5)


def test_approximate_neighbours_compare_far_fewer_than_all_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every similarity the search computes (k-means, lists, lonely rows) comes out of ``products``, and
    the re-rank computes N x candidates more: count them. All pairs would be N^2 / 2 at any size,
    growing 16x from N to 4N."""
    counted = [0]
    products = neighbours.products

    def counting(a, b, out=None):
        result = products(a, b, out=out)
        counted[0] += result.numel()
        return result

    monkeypatch.setattr(neighbours, "products", counting)
    entries = {}
    for n in (5000, 20000):
        x = low_rank_blobs(18, n, 64, 24, 40)
        counted[0] = 0
        nn = approximate_first_neighbours(x, dims=16, candidates=8, sample=2000)
        entries[n] = counted[0] + n * 8
        assert (nn.index != np.arange(n)).all()
    assert entries[5000] >= 5000 * 8 * 2  # the counter sees the search: at least each row's probes
    assert entries[20000] < 0.2 * 20000**2 / 2
    assert entries[20000] < 10 * entries[5000]


def test_probes_go_to_rows_between_lists() -> None:
    """The probes beyond a row's own list go where the row lies nearly as close to another list:
    with 1.5 probes a row on average, the rows halfway between two lists probe both, the rows on a
    centroid only their own."""
    angles = np.radians([0, 90, 180, 270])
    centroids = torch.from_numpy(np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32))
    deep = np.repeat(angles, 3)[:10] + 0.01
    between = np.repeat(angles + np.radians(45), 3)[:10]
    a = np.concatenate([deep, between])
    y = torch.from_numpy(np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32))
    lists = len(centroids)
    near = neighbours._probes(y, centroids, 1.5, 2)
    assert (near[:, 0] == neighbours._nearest(y, centroids, 1)[1][:, 0]).all()  # own list first, always
    assert (near[:10, 1] == lists).all() and (near[10:, 1] < lists).all()
    assert set(map(tuple, near[10:].sort(dim=1).values.tolist())) <= {(0, 1), (1, 2), (2, 3), (0, 3)}
    assert (neighbours._probes(y, centroids, 1.0, 2)[:, 1] == lists).all()
    assert (neighbours._probes(y, centroids, 2.0, 2) < lists).all()


def test_candidates_are_found_from_either_side_of_a_pair() -> None:
    """Row 0 probes only its own list, but its nearest row (1, in the other list) probes row 0's list:
    the products of that list read the other way give row 0 its neighbour."""
    a = np.radians([44, 46, 0, 90])
    y = torch.from_numpy(np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32))
    none = 2
    near = torch.tensor([[0, none], [1, 0], [0, none], [1, none]])
    assert neighbours._candidates(y, near, 2, 1, None, MemoryBudget())[:, 0].tolist() == [1, 0, 0, 1]


def test_approximate_neighbours_search_rows_alone_in_their_lists_against_all() -> None:
    """One list per row and one probe: no row finds another in its lists, so every row takes the
    fallback (all rows in the projected space), and the answers are still the exact ones."""
    x = low_rank_blobs(19, 300, 64, 12, 5)
    exact = first_neighbours(x)
    nn = approximate_first_neighbours(x, dims=16, candidates=4, lists=300, probes=1, sample=300)
    hit = (nn.index == exact.index) | (np.abs(nn.similarity - exact.similarity) <= 1e-6)
    assert hit.mean() >= 0.95
    assert (nn.index != np.arange(len(x))).all()


def test_merged_projection_equals_projecting_the_sums() -> None:
    """FINCH's next level is projected by summing the last level's projections (the projection is
    linear): the same rows and inverse norms as projecting the sums themselves, in the same basis."""
    x = low_rank_blobs(21, 3000, 96, 24, 20)
    labels = by_first_row(np.random.default_rng(21).integers(0, 700, len(x)))
    sums = np.zeros((labels.max() + 1, x.shape[1]), np.float32)
    np.add.at(sums, labels, x)
    first = neighbours.project(x, 32, 1000, 0)
    merged = neighbours.scale_projection(first.basis, neighbours.merge_projection(first, labels, len(sums)), sums)
    assert merged.y.data_ptr() == first.y.data_ptr()  # in the first rows of the level's own
    direct = torch.empty(len(sums), 32)
    inverse = neighbours._project(torch.from_numpy(sums), first.basis, direct)
    torch.testing.assert_close(merged.y, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged.inverse, inverse)
    with pytest.raises(ValueError, match="merged"):
        neighbours.merge_projection(first, labels[:-1], len(sums))
    with pytest.raises(ValueError, match="merged"):
        neighbours.merge_projection(first, labels, len(sums) + 1)
    with pytest.raises(ValueError, match="projected rows for"):
        neighbours.scale_projection(first.basis, merged.y, sums[:-1])


def by_first_row(labels: np.ndarray) -> np.ndarray:
    """Random labels renumbered as FINCH's components are: in the order of their first rows."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def test_groups_are_summed_in_place_bit_for_bit_as_in_a_new_array() -> None:
    """FINCH's later levels sum the rows into the first rows of the same array, chunk by chunk: each group's rows are
    still added in row order, so the sums are those of a new array bit for bit, whatever the chunk."""
    rows = np.random.default_rng(3).standard_normal((5000, 24)).astype(np.float32)
    labels = by_first_row(np.random.default_rng(4).integers(0, 1200, len(rows)))
    count = labels.max() + 1
    expected = torch.zeros(count, 24).index_add_(0, torch.from_numpy(labels), torch.from_numpy(rows))
    for chunk_rows in (1, 7, 4096, 5000):  # a group's rows in one chunk or many; its label's row in the same chunk
        a = torch.from_numpy(rows.copy())
        out = finch_module.sum_groups_in_place(a, labels, count, chunk_rows * 24 * 4)
        assert out.data_ptr() == a.data_ptr() and torch.equal(out, expected), chunk_rows
    with pytest.raises(ValueError, match="at most its row's index"):
        finch_module.sum_groups_in_place(torch.from_numpy(rows.copy()), labels[::-1].copy(), count, 4096)


def test_components_are_numbered_by_their_first_row(monkeypatch: pytest.MonkeyPatch) -> None:
    nn = np.random.default_rng(5).integers(0, 3000, 3000)
    labels, count = finch_module._components(nn)
    assert (labels <= np.arange(len(nn))).all()
    original = finch_module.connected_components
    monkeypatch.setattr(
        finch_module,
        "connected_components",  # numbered the other way round
        lambda *a, **k: (lambda c, labels: (c, c - 1 - labels))(*original(*a, **k)),
    )
    renumbered, again = finch_module._components(nn)
    assert again == count and np.array_equal(renumbered, labels)


def test_merged_projection_sums_each_group_in_row_order() -> None:
    """Visiting the rows group by group changes no bit: each group's rows are still added in row order."""
    x = low_rank_blobs(23, 5000, 96, 24, 20)
    labels = by_first_row(np.random.default_rng(23).integers(0, 900, len(x)))
    first = neighbours.project(x, 32, 1000, 0)
    in_row_order = torch.zeros(labels.max() + 1, 32).index_add_(
        0, torch.from_numpy(labels), first.y / first.inverse[:, None]
    )
    assert torch.equal(neighbours.merge_projection(first, labels, labels.max() + 1), in_row_order)


def test_the_search_sums_its_projection_before_finch_sums_the_level_and_keeps_nothing_after() -> None:
    """``next_level`` folds the last projection into the next level's (FINCH's cluster sums are allocated after
    it, with its budget back) and frees it, keeping room for the next search's candidate lists; with None, or once
    the next level is searched, nothing is kept."""
    x = low_rank_blobs(24, 3000, 600, 8, 300)
    budget = MemoryBudget()
    lists: list[int] = []
    full = budget.full
    budget.full = lambda shape, *a: lists.append(int(np.prod(shape)) * np.dtype(a[1]).itemsize) or full(shape, *a)
    search = make_search(exact_up_to=999, budget=budget, log=lambda _: None)
    search(x)
    assert sum(lists) == neighbours.candidate_bytes(len(x))  # the room kept for them is what they take
    held = budget.held
    labels = np.arange(len(x)) // 2
    search.next_level(labels, len(x) // 2)
    gc.collect()
    # the level's projection given back but for its first rows, which hold the next one's (up to the page they end
    # in), and room kept for the next level's candidate lists
    kept = held - 3000 * 512 * 4 + 1500 * 512 * 4 + neighbours.candidate_bytes(1500)
    assert 0 <= budget.held - kept < 2 * mmap.PAGESIZE
    sums = np.zeros((1500, 600), np.float32)
    np.add.at(sums, labels, x.astype(np.float32))
    search(sums)
    search.next_level(None)
    gc.collect()
    assert budget.held == 0
    search(x)
    search.next_level(np.arange(len(x)) // 4, 750)  # the next level is searched exactly: nothing to prepare
    gc.collect()
    assert budget.held == 0


@pytest.mark.slow
def test_finch_levels_reuse_the_first_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Approximate levels after the first take their projection from the level before: one basis."""
    bases = []
    basis = neighbours._basis
    monkeypatch.setattr(neighbours, "_basis", lambda *a: bases.append(1) or basis(*a))
    x = low_rank_blobs(22, 3000, 600, 8, 300)
    lines: list[str] = []
    finch(x, max_prototypes=1, search=make_search(exact_up_to=99, log=lines.append), log=lambda _: None)
    assert sum("approximate" in line for line in lines) >= 3 and len(bases) == 1


def test_approximate_neighbours_name_a_non_finite_row() -> None:
    x = low_rank_blobs(20, 3000, 96, 24, 20)
    x[2005, 3] = np.inf  # outside the basis sample: the projection finds it
    with pytest.raises(ProtoADError, match="features row 2005 "):
        approximate_first_neighbours(x, dims=32, sample=10)


def test_approximate_neighbours_break_ties_by_lowest_index() -> None:
    x = low_rank_blobs(16, 600, 64, 16, 5)
    x[[30, 300, 500]] = x[200]
    nn = approximate_first_neighbours(x, dims=16, candidates=8, sample=300)
    assert list(nn.index[[30, 200, 300, 500]]) == [200, 30, 30, 30]


def test_search_choice() -> None:
    x = low_rank_blobs(17, 1500, 640, 24, 8)  # wider than the default projection
    exact = first_neighbours(x)
    lines: list[str] = []
    for search in (make_search(log=lines.append), make_search(exact=True, exact_up_to=9, log=lines.append)):
        got = search(x)  # below the threshold, or exact forced: the exact answer
        np.testing.assert_array_equal(got.index, exact.index)
        np.testing.assert_array_equal(got.similarity, exact.similarity)
    assert lines == []
    approx = make_search(exact_up_to=999, log=lines.append)(x)
    assert len(lines) == 1 and "approximate" in lines[0] and "1,500 rows" in lines[0]
    assert (approx.index == exact.index).mean() >= 0.95
    a = finch(x, max_prototypes=1, search=make_search(exact=True), log=lambda _: None)
    b = finch(x, max_prototypes=1, log=lambda _: None)
    assert a.counts == b.counts
    for p, q in zip(a.partitions, b.partitions):
        np.testing.assert_array_equal(p, q)
