"""The soak benchmark's short version: a run of a few hundred frames with every output on leaks neither
memory, nor open files, nor threads (benchmarks/bench_soak.py runs 10,000 frames and records the figures)."""

from __future__ import annotations

from pathlib import Path

from bench_soak import GROWTH_LIMIT, soak, verdict


def test_a_long_run_does_not_grow(tiny_model: Path, tmp_path: Path) -> None:
    samples = soak(tiny_model, 400, 100, tmp_path)
    assert [s.frames for s in samples] == [100, 200, 300, 400]
    _, figures = verdict(samples)
    assert figures["rss_growth"] < GROWTH_LIMIT and figures["files_growth"] <= 0 and figures["threads_growth"] <= 0
    assert len((tmp_path / "soak.jsonl").read_text().splitlines()) == 400
    assert len(list((tmp_path / "masks").iterdir())) > 0 and (tmp_path / "soak.mp4").stat().st_size > 0
