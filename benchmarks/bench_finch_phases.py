"""Where FINCH's time goes, phase by phase, within the build's memory budget and without one, side by side.

    OPENBLAS_NUM_THREADS=2 python benchmarks/bench_finch_phases.py --features /tmp/wt15-bench/real-3201856.npy

``--features``: an FP16 .npy of patch vectors (what the build's feature cache holds; ``bench_finch_scale.py``
materialises one under its ``--workdir``). Each method runs ``finch`` at the build's ``--max-prototypes``
in its own process, one after the other (``ours``: the build's default budget, spilling beside the features;
``unbounded``: every array in memory, the build before issue 15). The search's and FINCH's phases are
wrapped with timers that also read the process's I/O (``/proc/self/io``: bytes read from and written to the
disk), so a table shows, per level and phase, what spilling costs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench_common import command_line, machine_text
from bench_finch_scale import budget_for

SEARCH_PHASES = ("project", "merge_projection", "_kmeans", "_probes", "_candidates", "_rerank")
FINCH_PHASES = ("_components", "_group_sums")
GB = 2**30


def counters() -> dict[str, int]:
    """Bytes this process has read from and written to the disk so far."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read": int(io["read_bytes"]), "write": int(io["write_bytes"])}


def timed(module: Any, name: str, record: list[dict]) -> None:
    """Wrap ``module.name`` so that each call appends its phase, seconds and counter deltas to ``record``."""
    inner: Callable = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before, start = counters(), time.perf_counter()
        out = inner(*args, **kwargs)
        after = counters()
        record.append({"phase": name.lstrip("_"), "seconds": time.perf_counter() - start,
                       **{k: after[k] - before[k] for k in after}})
        return out

    setattr(module, name, wrapper)


def work(features: Path, method: str, max_prototypes: int) -> dict:
    """One method's FINCH with every phase timed; the level each phase belongs to from the log."""
    from protoad_edge.build import finch as finch_module
    from protoad_edge.build import neighbours

    record: list[dict] = []
    for name in SEARCH_PHASES:
        timed(neighbours, name, record)
    for name in FINCH_PHASES:
        timed(finch_module, name, record)
    x = np.load(features, mmap_mode="r")
    budget = budget_for(method, "auto", features.parent)
    levels: list[int] = []  # phases recorded when each level ended

    def log(line: str) -> None:
        if line.startswith("FINCH level"):
            levels.append(len(record))

    start = time.perf_counter()
    result = finch_module.finch(x, max_prototypes, search=neighbours.make_search(budget=budget, log=lambda _: None),
                                budget=budget, log=log)
    seconds = time.perf_counter() - start
    for i, phase in enumerate(record):
        phase["level"] = next((level for level, end in enumerate(levels) if i < end), len(levels))
    return {"seconds": seconds, "level_seconds": result.level_seconds, "counts": result.counts, "phases": record,
            "labels": hashlib.sha1(result.labels.tobytes()).hexdigest()}


def table(results: dict[str, dict]) -> list[str]:
    """Phases of each level as rows, the methods side by side: seconds, and GB read / written for each."""
    methods = list(results)
    keys = sorted({(p["level"], p["phase"]) for r in results.values() for p in r["phases"]})
    head = ["level", "phase", *[f"{m} s" for m in methods], *[f"{m} GB read / written" for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for level, phase in keys:
        mine = {m: [p for p in results[m]["phases"] if (p["level"], p["phase"]) == (level, phase)] for m in methods}
        seconds = [sum(p["seconds"] for p in mine[m]) for m in methods]
        if max(seconds) < 0.05:  # the small levels' phases
            continue
        io = [f"{sum(p['read'] for p in mine[m]) / GB:.2f} / {sum(p['write'] for p in mine[m]) / GB:.2f}" for m in methods]
        lines.append(f"| {level} | {phase} | " + " | ".join(f"{s:.1f}" for s in seconds) + " | " + " | ".join(io) + " |")
    lines.append("| all | FINCH | " + " | ".join(f"{results[m]['seconds']:.1f}" for m in methods) + " | "
                 + " | ".join("" for _ in methods) + " |")
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="FP16 .npy of patch vectors")
    parser.add_argument("--methods", default="ours,unbounded")
    parser.add_argument("--max-prototypes", type=int, default=10_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.features, args.worker, args.max_prototypes)))
        return
    results = {}
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--features", str(args.features), "--max-prototypes",
                              str(args.max_prototypes), "--worker", method], capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method}: FINCH {results[method]['seconds']:.1f} s, clusters {results[method]['counts']}", flush=True)
    same = len({r["labels"] for r in results.values()}) == 1
    print(f"{machine_text()}\n`{command_line(sys.argv)}`\nsame partition at the chosen level in every method: {same}\n")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main(sys.argv[1:])
