"""Soak: protoad-run's loop over many frames, watching for leaks - resident memory, open files, threads, FPS.

    python benchmarks/bench_soak.py --frames 10000 --write

A small real bundle (random weights, crop 64, K 48; tests/conftest.py's ``make_bundle``) judges a
generated 320x240 source (a part on a belt, every tenth frame with a defect) with the outputs a line
uses: a JSON-lines log, an overlay video and a mask per anomalous frame. Every ``--every`` frames the
loop's own process is sampled (/proc/self/status VmRSS, RssAnon and Threads; /proc/self/fd). Passes
when resident memory grows less than 5% after the first sample, open files and threads do not grow,
and the FPS of the last block is within 25% of the first. Prints the figures; ``--write`` puts them
in RESULTS.md. The test suite runs a short version (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from bench_common import command_line, machine_text, update_results  # noqa: E402

from protoad_edge.preprocess import to_batch  # noqa: E402
from protoad_edge.runtime.backends.base import BackendOptions  # noqa: E402
from protoad_edge.runtime.backends.ort import OrtBackend  # noqa: E402
from protoad_edge.runtime.loop import RunOptions, run  # noqa: E402
from protoad_edge.runtime.sources.source import Source  # noqa: E402

GROWTH_LIMIT = 0.05  # resident memory after the first sample
FPS_SPREAD = 0.25  # last block's FPS within this share of the first's


class GeneratedLine(Source):
    """``frames`` frames of a part on a belt, decoded-camera style (RGB uint8); every tenth carries a defect."""

    live = False
    fps = 25.0

    def __init__(self, frames: int, size: tuple[int, int] = (320, 240)) -> None:
        self.name = "generated line"
        self.frames = frames
        rng = np.random.default_rng(0)
        width, height = size
        yy, xx = np.mgrid[0:height, 0:width]
        part = 120 + 50 * np.sin(2 * np.pi * (xx / 97 + yy / 131))
        self.base = np.clip(part[..., None] + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)
        self.position = 0

    def open(self) -> None:
        self.position = 0

    def read(self) -> tuple[np.ndarray, str] | None:
        if self.position >= self.frames:
            return None
        frame = np.roll(self.base, self.position % 7, axis=1)
        if self.position % 10 == 9:
            frame = frame.copy()
            frame[100:140, 150:160] = (250, 240, 230)
        self.position += 1
        return frame, self.name


@dataclass
class Sample:
    frames: int
    seconds: float
    rss_mb: float
    anon_mb: float
    threads: int
    open_files: int


def proc_status() -> dict[str, int]:
    """VmRSS and RssAnon in kB, and Threads, of this process."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "Threads"):
            values[key] = int(value.split()[0])
    return values


def soak(model: Path, frames: int, every: int, out: Path) -> list[Sample]:
    """Run ``frames`` frames through ``model`` with every output on; sample the process every ``every`` frames.

    The threshold is set at the 80th percentile of the first 20 frames' scores, so about a fifth of the
    frames are anomalous and the mask and region paths are exercised too (the random-weight model's own
    threshold flags none of this source)."""
    samples: list[Sample] = []
    started = time.perf_counter()

    def sample(result: object) -> None:
        index = result.index + 1
        if index % every == 0:
            status = proc_status()
            samples.append(
                Sample(
                    index,
                    time.perf_counter() - started,
                    status["VmRSS"] / 1024,
                    status["RssAnon"] / 1024,
                    status["Threads"],
                    len(os.listdir("/proc/self/fd")),
                )
            )

    with OrtBackend(model, BackendOptions(threads=2), providers=["CPUExecutionProvider"]) as backend:
        probe = GeneratedLine(20)
        first = [frame for frame, _ in iter(probe.read, None)]
        scores = backend.infer(to_batch([backend.info.preprocess(f) for f in first]))[1]
        summary = run(
            GeneratedLine(frames),
            backend,
            RunOptions(
                threshold=float(np.quantile(scores, 0.8)),
                jsonl=out / "soak.jsonl",
                save=out / "soak.mp4",
                save_masks=out / "masks",
                status_every=0,
                on_frame=sample,
                log=lambda message: None,
            ),
        )
    assert summary.frames == frames, summary.lines()
    return samples


def verdict(samples: list[Sample]) -> tuple[bool, dict[str, float]]:
    """Growth of resident memory after the first sample, of threads and open files; FPS of the last block vs the
    first."""
    first = samples[0]
    fps = [(b.frames - a.frames) / (b.seconds - a.seconds) for a, b in zip(samples, samples[1:])]
    figures = {
        "rss_growth": (max(s.rss_mb for s in samples[1:]) - first.rss_mb) / first.rss_mb,
        "anon_growth": (max(s.anon_mb for s in samples[1:]) - first.anon_mb) / first.anon_mb,
        "threads_growth": max(s.threads for s in samples) - first.threads,
        "files_growth": max(s.open_files for s in samples) - first.open_files,
        "fps_first": fps[0],
        "fps_last": fps[-1],
    }
    ok = (
        figures["rss_growth"] < GROWTH_LIMIT
        and figures["threads_growth"] <= 0
        and figures["files_growth"] <= 0
        and abs(fps[-1] - fps[0]) <= FPS_SPREAD * fps[0]
    )
    return ok, figures


def table(samples: list[Sample]) -> str:
    rows = [
        "| frames | seconds | FPS (block) | RSS MB | anonymous MB | threads | open files |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    previous = None
    for s in samples:
        fps = "-" if previous is None else f"{(s.frames - previous.frames) / (s.seconds - previous.seconds):.1f}"
        rows.append(
            f"| {s.frames:,} | {s.seconds:,.1f} | {fps} | {s.rss_mb:.1f} | {s.anon_mb:.1f} | {s.threads} | "
            f"{s.open_files} |"
        )
        previous = s
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--write", action="store_true", help="put the figures into benchmarks/RESULTS.md")
    args = parser.parse_args(argv[1:])
    import torch
    from conftest import make_bundle

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        work = Path(tmp)
        model = make_bundle(work / "model")
        samples = soak(model, args.frames, args.every, work / "out")
        written = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
    ok, figures = verdict(samples)
    body = "\n".join(
        [
            "## Soak: protoad-run over many frames (CPU)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine_text()}; command: `{command_line(argv)}`.",
            f"{args.frames:,} frames of a generated 320x240 source through a crop-64, K-48 bundle with a JSONL log, "
            "an overlay",
            f"video and masks ({written / 2**20:,.1f} MB written), sampled every {args.every:,} frames. Timings vary "
            "with load.",
            "",
            table(samples),
            "",
            f"Resident memory after the first sample: {100 * figures['rss_growth']:+.2f}% at most (anonymous "
            f"{100 * figures['anon_growth']:+.2f}%; limit {100 * GROWTH_LIMIT:.0f}%); threads "
            f"{figures['threads_growth']:+d}, open files {figures['files_growth']:+d}; FPS {figures['fps_first']:.1f} "
            "in the "
            f"first block, {figures['fps_last']:.1f} in the last. Verdict: {'pass' if ok else 'FAIL'}.",
        ]
    )
    print(body)
    if args.write:
        print(f"\nwrote {update_results('soak', body)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
