"""The FINCH scale benchmark measures what it says: its exact truth, its data, and one tiny run end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("finch")
pytest.importorskip("sklearn")

from bench_finch_scale import RssSampler, chosen, exact_rows, make_synthetic, read_rows  # noqa: E402

from protoad_edge.builder.finch import first_neighbours  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "x.npy"
    make_synthetic(path, 1500, clusters=40)
    return path


def test_synthetic_vectors_are_unit_fp16(vectors: Path) -> None:
    x = np.load(vectors, mmap_mode="r")
    assert x.shape == (1500, 1792) and x.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_read_rows_and_exact_truth(vectors: Path) -> None:
    x = np.load(vectors, mmap_mode="r")
    np.testing.assert_array_equal(read_rows(vectors, 1000, np.float32), x[:1000].astype(np.float32))
    rows = np.array([0, 5, 499, 998, 999])
    index, similarity = exact_rows(vectors, 1000, rows)  # among the first 1000 rows only
    full = first_neighbours(np.asarray(x[:1000]))
    np.testing.assert_array_equal(index, full.index[rows])
    np.testing.assert_allclose(similarity, full.similarity[rows], atol=1e-6)


def test_chosen_level_is_the_builds() -> None:
    parts = [np.array([0]), np.array([1]), np.array([2])]
    assert chosen(parts, [500, 90, 7], 100)[1] == 1
    assert chosen(parts, [500, 300, 200], 100)[1] == 2  # none below: the last


def test_rss_sampler_keeps_the_peaks_of_anonymous_and_file_backed_memory() -> None:
    sampler = RssSampler()
    held = np.ones(64 * 2**20, np.uint8)  # 64 MB anonymous, touched
    peaks = sampler.finish()
    assert sorted(peaks) == ["peak_rssanon_gb", "peak_rssfile_gb"]
    assert peaks["peak_rssanon_gb"] >= 64 / 1024 and peaks["peak_rssfile_gb"] > 0
    del held


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_finch_scale.py"),
            "--sizes",
            "1200",
            "--data",
            "synthetic",
            "--clusters",
            "40",
            "--recall-rows",
            "300",
            "--methods",
            "ours,unbounded,finch-clust,exact",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = {
        cells[2]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in out.stdout.splitlines()
            if line.startswith("| synthetic | 1,200 |")
        )
    }
    assert sorted(rows) == ["exact", "finch-clust", "ours", "unbounded"]
    # All exact at this size: the same partitions, and every sampled neighbour right.
    for method, cells in rows.items():
        recall, ari_ours, ari_exact = cells[7], cells[9], cells[10]
        assert recall == "1.0000" and ari_ours == "1.0000" and ari_exact == "1.0000", (method, cells)
        assert cells[11].endswith(" GB") and cells[12].endswith(" GB"), cells  # peak RssAnon, RssFile
    assert rows["ours"][13] == "0.00 GB" and rows["finch-clust"][13] == "-"  # nothing spilled at this size
    assert len(rows["ours"][14].split(", ")) == len(rows["ours"][5].split(", "))  # seconds for every level


@pytest.mark.slow
def test_phases_are_timed_per_level_for_both_methods(tmp_path: Path) -> None:
    """Above EXACT_UP_TO rows the approximate search runs: its phases and FINCH's are timed per level, both methods
    give the same partition, and the table sets them side by side."""
    features = tmp_path / "x.npy"
    make_synthetic(features, 24_000, clusters=300)
    script = str(BENCH / "bench_finch_phases.py")
    worker = subprocess.run(
        [sys.executable, script, "--features", str(features), "--max-prototypes", "500", "--worker", "ours"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    record = json.loads(worker.stdout.strip().splitlines()[-1])
    phases = {(p["level"], p["phase"]) for p in record["phases"]}
    assert {(0, "project"), (0, "candidates"), (0, "rerank"), (0, "components"), (0, "group_sums")} <= phases
    assert len(record["level_seconds"]) == len(record["counts"]) and all(p["read"] >= 0 for p in record["phases"])
    out = subprocess.run(
        [
            sys.executable,
            script,
            "--features",
            str(features),
            "--max-prototypes",
            "500",
            "--baseline",
            "HEAD",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "same partition at the chosen level in every method and run: True" in out
    runs = re.findall(
        r"^run (\d) (\S+): FINCH [\d.]+ s, clusters \[.*\], code from (\S+) \(features read into "
        r"the page cache before it: \d+ s\)$",
        out,
        re.MULTILINE,
    )
    assert [(r, m) for r, m, _ in runs] == [(r, m) for r in "12" for m in ("ours", "unbounded", "HEAD")]  # interleaved
    assert {m: Path(c).parents[1] == BENCH.parent for _, m, c in runs} == {
        "ours": True,
        "unbounded": True,
        "HEAD": False,
    }  # HEAD: extracted
    assert re.search(r"^HEAD: FINCH median [\d.]+ s; per run / ours: [\d.]+, [\d.]+$", out, re.MULTILINE)
    assert (
        "| level | phase | ours s | unbounded s | HEAD s | ours GB read / written | unbounded GB read / written "
        "| HEAD GB read / written |"
    ) in out
    assert any(line.startswith("| 0 | candidates | ") for line in out.splitlines())
