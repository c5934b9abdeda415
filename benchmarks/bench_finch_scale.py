"""FINCH at the issue's sizes: ours as the build runs it against finch-clust, side by side in one run.

    OPENBLAS_NUM_THREADS=2 python benchmarks/bench_finch_scale.py --sizes 20000,100000,627200 \
        --data synthetic --data real --data-root ../shared/data/mvtec --category bottle --write

For each data kind the largest size is materialised once as an FP16 .npy under ``--workdir`` (what
the build's feature cache holds), and each size is its first N rows:

- ``synthetic``: clustered unit vectors (``--clusters`` centres, noise around them), with a spectrum
  that decays over the dimensions like real patch features';
- ``real``: random-weight (``--weights none``) wide_resnet50_2 patch features of the category's first
  ceil(N / 3136) training images at 224 x 224, extracted by the build's own code.

Every method runs in its own process, one after another, so its wall time and peak resident memory
are its own: VmHWM (memory-mapped pages it touched count too), and RssAnon and RssFile from
/proc/self/status sampled every ``SAMPLE_SECONDS`` (anonymous memory, which only the process can free,
and file-backed pages, which the kernel writes back and drops under pressure), each at its own peak:

- ``ours``: ``finch`` on the FP16 memmap with the build's search (``make_search``: exact up to
  ``EXACT_UP_TO`` rows, as finch-clust, approximate above), all levels, within the build's memory budget
  (``--memory-limit``, default the build's: a share of the available memory), spilling in ``--workdir``;
- ``unbounded``: the same with no budget, every array in memory (the build before issue 15);
- ``finch-clust``: ``FINCH(data, distance="cosine")`` with its defaults (exact up to 20,000 rows,
  PyNNDescent above) on the rows as float32, all levels;
- ``exact`` (with ``--methods``, up to ``--exact-up-to`` rows): ours with exact search at every level,
  the partition the approximate searches are judged against.

The partition each would hand the build is its first level with fewer than ``--max-prototypes``
clusters (else its last); agreement between two is their adjusted Rand index (ARI). First-neighbour recall is
measured on ``--recall-rows`` sampled rows against their exact neighbours among all N rows (a hit:
the same neighbour, or one as similar within 1e-6): ours from its level-0 search, finch-clust's
from its own level-0 search (``clust_rank``, run once more, up to ``--reference-recall-up-to`` rows).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_common import DEFAULT_DATA, command_line, machine_text, update_results

ROOT = Path(__file__).resolve().parents[1]
PATCHES = 56 * 56  # patch vectors per 224 x 224 image
DIM = 1792
RECALL_TOLERANCE = 1e-6
METHODS = ("ours", "unbounded", "finch-clust", "exact")
SAMPLE_SECONDS = 0.1
REFERENCE_ANN_THRESHOLD = 20_000  # finch-clust's FINCH default: exact up to this many rows, PyNNDescent above


# ----------------------------------------------------------------------------- data


def make_synthetic(path: Path, n: int, clusters: int, seed: int = 0) -> None:
    """``n`` clustered unit vectors of ``DIM`` as FP16 at ``path``: centre + noise, both with a 1/sqrt(i) spectrum."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(np.arange(1, DIM + 1))).astype(np.float32)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32) * scale
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        x = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, DIM), dtype=np.float32) * scale
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()


def make_real(path: Path, n: int, data_root: Path, category: str) -> None:
    """The first ``n`` patch vectors of the category's training images (random weights), as FP16 at ``path``."""
    import torch

    from protoad_edge.builder.datasets import load_crops, open_dataset
    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.pipeline import extract_vectors
    from protoad_edge.preprocess import Preprocess

    images = math.ceil(n / PATCHES)
    train = open_dataset(category, data_root).train
    if len(train) < images:
        raise SystemExit(f"{category} has {len(train)} training images; {n:,} vectors need {images}")
    backbone, _ = build_backbone("none")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(images * PATCHES, DIM))
    extract_vectors(
        PatchFeatures(backbone, 224), load_crops(train[:images], Preprocess()), torch.device("cpu"), 8, False, out
    )
    out.flush()


def materialise(kind: str, n: int, args: argparse.Namespace) -> Path:
    """The FP16 .npy of ``kind`` with at least ``n`` rows under the work directory (made once)."""
    path = Path(args.workdir) / f"{kind}-{n}.npy"
    if not path.exists():
        start = time.perf_counter()
        tmp = path.with_suffix(".partial.npy")
        if kind == "synthetic":
            make_synthetic(tmp, n, args.clusters)
        else:
            make_real(tmp, n, Path(args.data_root), args.category)
        tmp.rename(path)
        print(f"  {kind}: {n:,} vectors written to {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def read_rows(path: Path, n: int, dtype: type) -> np.ndarray:
    """The first ``n`` rows of an .npy read (not mapped: its pages stay out of RSS) into a new ``dtype`` array."""
    header = np.load(path, mmap_mode="r")
    out = np.empty((n, header.shape[1]), dtype)
    buffer = np.empty((65_536, header.shape[1]), header.dtype)
    with open(path, "rb") as f:
        f.seek(header.offset)
        for start in range(0, n, len(buffer)):
            part = buffer[: min(len(buffer), n - start)]
            f.readinto(memoryview(part).cast("B"))
            out[start : start + len(part)] = part
    return out


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: reset at exec, unlike a child's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


class RssSampler:
    """Peak RssAnon and RssFile of this process, sampled from /proc/self/status on a thread (the kernel keeps
    only the peak of their sum, VmHWM)."""

    def __init__(self, status: Path = Path("/proc/self/status")) -> None:
        self.status = status
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()
        self.sample()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for line in self.status.read_text().splitlines():
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self.sample()

    def finish(self) -> dict[str, float]:
        """Stop; the peaks in GB (GiB)."""
        self.stop.set()
        self.thread.join()
        self.sample()
        return {f"peak_{key.lower()}_gb": value / 2**30 for key, value in self.peak.items()}


def exact_rows(path: Path, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine first neighbours (index, similarity) of ``rows`` among the first ``n`` rows, in float32."""
    from protoad_edge.builder.finch import load_normalised

    x = np.load(path, mmap_mode="r")[:n]
    buffer = np.empty((max(len(rows), 1), x.shape[1]), np.float32)
    queries = np.empty((len(rows), x.shape[1]), np.float32)
    for i, r in enumerate(rows):  # sorted rows: one normalised row at a time
        queries[i] = load_normalised(x, int(r), buffer[:1])[0]
    best = np.full(len(rows), -np.inf, np.float32)
    arg = np.zeros(len(rows), np.int64)
    block = np.empty((16_384, x.shape[1]), np.float32)
    for start in range(0, n, len(block)):
        s = queries @ load_normalised(x, start, block).T
        inside = (rows >= start) & (rows < start + s.shape[1])
        s[np.flatnonzero(inside), rows[inside] - start] = -np.inf
        j = s.argmax(axis=1)
        v = s[np.arange(len(rows)), j]
        better = v > best
        best[better], arg[better] = v[better], j[better] + start
    return arg, best


# ----------------------------------------------------------------------------- workers (one process each)


def chosen(partitions: list[np.ndarray], counts: list[int], max_prototypes: int) -> tuple[np.ndarray, int]:
    """The first partition with fewer than ``max_prototypes`` clusters, else the last: what the build keeps."""
    level = next((i for i, c in enumerate(counts) if c < max_prototypes), len(counts) - 1)
    return partitions[level], level


def budget_for(method: str, memory_limit: str, spill_dir: Path):
    """The memory budget ``method`` runs within: the build's (``--memory-limit``, or its default), or none."""
    from protoad_edge.builder.memory import MemoryBudget, arrays_within, available_bytes, default_limit, parse_size

    if method == "unbounded":
        return MemoryBudget()
    limit = default_limit(available_bytes()) if memory_limit == "auto" else parse_size(memory_limit)
    return MemoryBudget(arrays_within(limit), spill_dir, log=lambda line: print(f"    {line}", flush=True))


def work_ours(path: Path, n: int, rows: np.ndarray, max_prototypes: int, method: str, memory_limit: str) -> dict:
    from protoad_edge.builder.finch import finch
    from protoad_edge.builder.neighbours import make_search

    x = np.load(path, mmap_mode="r")[:n]
    budget = budget_for(method, memory_limit, path.parent)
    search = make_search(exact=method == "exact", budget=budget, log=lambda _: None)
    first: list = []

    def capture(v: np.ndarray, *, progress: str | None = None):
        found = search(v, progress=progress)  # keep level 0's neighbours for the recall
        if not first:
            first.append(found)
        return found

    capture.next_level = getattr(search, "next_level", None)  # the search's own (finch.Search)

    start = time.perf_counter()
    result = finch(x, max_prototypes=1, search=capture, budget=budget, log=lambda _: None)
    seconds = time.perf_counter() - start
    labels, level = chosen(result.partitions, result.counts, max_prototypes)
    return dict(
        seconds=seconds,
        counts=result.counts,
        level=level,
        labels=labels,
        level_seconds=result.level_seconds,
        nn=first[0].index[rows],
        sim=first[0].similarity[rows],
        spilled_gb=budget.spilled / 2**30,
    )


def work_reference(path: Path, n: int, rows: np.ndarray, max_prototypes: int, recall: bool) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from finch import FINCH
    from finch.finch import clust_rank

    x = read_rows(path, n, np.float32)
    start = time.perf_counter()
    c, counts, _ = FINCH(x, distance="cosine", ann_threshold=REFERENCE_ANN_THRESHOLD, verbose=False)
    seconds = time.perf_counter() - start
    counts = [int(k) for k in counts]
    labels, level = chosen([c[:, i] for i in range(c.shape[1])], counts, max_prototypes)
    out = dict(seconds=seconds, counts=counts, level=level, labels=labels.astype(np.int64))
    if recall:
        _, _, nn, _ = clust_rank(x, metric="cosine", ann_threshold=REFERENCE_ANN_THRESHOLD)
        picked = x[nn[rows]] / np.linalg.norm(x[nn[rows]], axis=1, keepdims=True)
        own = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
        out.update(nn=nn[rows].astype(np.int64), sim=np.einsum("ij,ij->i", picked, own).astype(np.float32))
    return out


def worker(args: argparse.Namespace) -> None:
    rows = np.load(args.rows)
    sampler = RssSampler()
    if args.worker == "finch-clust":
        out = work_reference(Path(args.path), args.n, rows, args.max_prototypes, args.reference_recall)
    else:
        out = work_ours(Path(args.path), args.n, rows, args.max_prototypes, args.worker, args.memory_limit)
    out.update(sampler.finish(), peak_gb=peak_rss_gb())
    np.savez(args.result, **{k: np.asarray(v) for k, v in out.items()})


def run_worker(method: str, path: Path, n: int, rows_file: Path, args: argparse.Namespace) -> dict:
    """Run one method in a child process; its results (with its wall time and peak RSS)."""
    result = Path(args.workdir) / f"result-{method}.npz"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--path",
        str(path),
        "--n",
        str(n),
        "--rows",
        str(rows_file),
        "--result",
        str(result),
        "--max-prototypes",
        str(args.max_prototypes),
        "--memory-limit",
        args.memory_limit,
    ]
    if n <= args.reference_recall_up_to:
        cmd.append("--reference-recall")
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0:
        return dict(failed=f"exit {code} after {time.perf_counter() - start:.0f} s")
    data = dict(np.load(result))
    result.unlink()
    return data


# ----------------------------------------------------------------------------- the comparison


def compare(kind: str, n: int, args: argparse.Namespace) -> list[str]:
    """Run each method on the first ``n`` rows of ``kind``; one table row per method."""
    from sklearn.metrics import adjusted_rand_score

    path = materialise(kind, args.sizes[-1], args)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(n, min(args.recall_rows, n), replace=False))
    rows_file = Path(args.workdir) / "rows.npy"
    np.save(rows_file, rows)
    start = time.perf_counter()
    truth, truth_sim = exact_rows(path, n, rows)
    print(
        f"  {kind} N={n:,}: exact neighbours of {len(rows):,} sampled rows in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    results = {}
    for method in args.methods:
        if method == "exact" and n > args.exact_up_to:
            continue
        results[method] = r = run_worker(method, path, n, rows_file, args)
        if "failed" in r:
            print(f"  {kind} N={n:,} {method}: FAILED ({r['failed']})", flush=True)
            continue
        r["recall"] = (
            float(np.mean((r["nn"] == truth) | (np.abs(r["sim"] - truth_sim) <= RECALL_TOLERANCE)))
            if "nn" in r
            else None
        )
        same = (
            "-"
            if method == "ours" or "failed" in results.get("ours", {"failed": ""})
            else (np.array_equal(results["ours"]["labels"], r["labels"]))
        )
        print(
            f"  {kind} N={n:,} {method}: {float(r['seconds']):.1f} s, peak {r['peak_gb']:.2f} GB (RssAnon "
            f"{r['peak_rssanon_gb']:.2f} GB, RssFile {r['peak_rssfile_gb']:.2f} GB), counts "
            f"{[int(c) for c in r['counts']]}, recall {r['recall']}, chosen partition identical to ours: {same}",
            flush=True,
        )

    def versus(method: str, r: dict) -> str:
        other = results.get(method, {"failed": ""})
        return "-" if "failed" in other or "failed" in r else f"{adjusted_rand_score(other['labels'], r['labels']):.4f}"

    lines = []
    for method, r in results.items():
        if "failed" in r:
            lines.append(f"| {kind} | {n:,} | {method} | {r['failed']} | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        level = int(r["level"])
        recall = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        ours = results.get("ours", {"failed": ""})
        ratio = "-" if "failed" in ours else f"{float(r['seconds']) / float(ours['seconds']):.2f}"
        lines.append(
            f"| {kind} | {n:,} | {method} | {float(r['seconds']):.1f} s | {r['peak_gb']:.2f} GB | "
            f"{', '.join(f'{int(c):,}' for c in r['counts'])} | {int(r['counts'][level]):,} | {recall} | "
            f"{ratio} | {versus('ours', r)} | {versus('exact', r)} | {r['peak_rssanon_gb']:.2f} GB | "
            f"{r['peak_rssfile_gb']:.2f} GB | {spilled(r)} | {per_level(r)} |"
        )
    return lines


def spilled(r: dict) -> str:
    return f"{float(r['spilled_gb']):.2f} GB" if "spilled_gb" in r else "-"


def per_level(r: dict) -> str:
    """Seconds per FINCH level (ours), level 0 first."""
    return ", ".join(f"{s:.1f}" for s in r["level_seconds"]) if "level_seconds" in r else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000,627200", help="comma-separated row counts")
    parser.add_argument("--data", action="append", choices=("synthetic", "real"), help="repeatable (default both)")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--clusters", type=int, default=20_000, help="synthetic centres")
    parser.add_argument(
        "--methods",
        default="ours,finch-clust",
        help="comma-separated, of: ours (as the build runs), unbounded (ours, no memory budget), "
        "finch-clust, exact (ours, exact search)",
    )
    parser.add_argument(
        "--memory-limit", default="auto", help="ours: the build's --memory-limit (e.g. 8G); auto: the build's default"
    )
    parser.add_argument("--exact-up-to", type=int, default=100_000, help="run the exact method up to this size")
    parser.add_argument("--max-prototypes", type=int, default=10_000)
    parser.add_argument("--recall-rows", type=int, default=2000)
    parser.add_argument(
        "--reference-recall-up-to",
        type=int,
        default=100_000,
        help="measure finch-clust's recall up to this size (it costs its level-0 search again)",
    )
    parser.add_argument("--workdir", default=None, help="where the vectors go (default: a temporary directory)")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--section", default="finch-scale", help="the RESULTS.md section --write replaces")
    parser.add_argument("--title", default="FINCH at scale: ours against finch-clust", help="its heading")
    # worker mode (internal)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--reference-recall", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    args.methods = [m for m in METHODS if m in args.methods.split(",")]
    kinds = args.data or ["synthetic", "real"]
    with tempfile.TemporaryDirectory(prefix="bench-finch-") as tmp:
        args.workdir = args.workdir or tmp
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        print(f"{machine_text()}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}", flush=True)
        lines = []
        for kind in kinds:
            for n in args.sizes:
                lines += compare(kind, n, args)
    table = "\n".join(
        [
            "| data | N | method | FINCH time | peak RSS | clusters per level | chosen | 1-NN recall | time / ours | "
            "ARI vs ours | ARI vs exact | peak RssAnon | peak RssFile | spilled | s per level |",
            "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *lines,
        ]
    )
    print(table)
    if args.write:
        body = f"## {args.title}\n\nMachine: {machine_text()}.\n\nCommand: `{command_line(sys.argv)}`\n\n{table}\n"
        print(f"updated {update_results(args.section, body)}")


if __name__ == "__main__":
    main()
