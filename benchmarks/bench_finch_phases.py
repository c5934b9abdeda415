"""Where FINCH's time goes, phase by phase, within the build's memory budget and without one, side by side.

    OPENBLAS_NUM_THREADS=2 python benchmarks/bench_finch_phases.py --features /tmp/wt15-bench/real-3201856.npy

``--features``: an FP16 .npy of patch vectors (what the build's feature cache holds; ``bench_finch_scale.py``
materialises one under its ``--workdir``). Each method runs ``finch`` at the build's ``--max-prototypes``
in its own process, one after the other (``ours``: the build's default budget, spilling beside the features;
``unbounded``: every array in memory, the build before issue 15). ``--baseline REV`` adds a method that runs
FINCH from the code of git revision REV (say, the commit before issue 15: "today" in its speed goal) with no
budget, extracted into a temporary folder. ``--repeat N`` runs the methods N times, interleaved (A B A B), and
takes each phase's median, because this machine's speed moves by 10-20% from one run to the next. Before
each run the features are read whole (``warm``), so that every run starts with them in the page cache. The
search's and FINCH's phases are wrapped with timers that also read the process's I/O (``/proc/self/io``:
bytes read from and written to the disk), so a table shows, per level and phase, what spilling costs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from bench_common import ROOT, command_line, machine_text
from bench_finch_scale import budget_for

SEARCH_PHASES = ("project", "merge_projection", "scale_projection", "_kmeans", "_probes", "_candidates", "_rerank")
FINCH_PHASES = ("_components", "_group_sums", "sum_groups_in_place")
GB = 2**30
BASELINE = "baseline"  # the worker's method for --baseline's code: no budget


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
        record.append(
            {
                "phase": name.lstrip("_"),
                "seconds": time.perf_counter() - start,
                **{k: after[k] - before[k] for k in after},
            }
        )
        return out

    setattr(module, name, wrapper)


def work(features: Path, method: str, max_prototypes: int) -> dict:
    """One method's FINCH with every phase timed; the level each phase belongs to from the log."""
    from protoad_edge.builder import finch as finch_module
    from protoad_edge.builder import neighbours

    record: list[dict] = []
    for module, names in ((neighbours, SEARCH_PHASES), (finch_module, FINCH_PHASES)):
        for name in names:
            if hasattr(module, name):  # a baseline's code may have fewer
                timed(module, name, record)
    x = np.load(features, mmap_mode="r")
    # a baseline revision's code may predate the budget: it runs as it was called then
    given = {} if method == BASELINE else {"budget": budget_for(method, "auto", features.parent)}
    levels: list[int] = []  # phases recorded when each level ended

    def log(line: str) -> None:
        if line.startswith("FINCH level"):
            levels.append(len(record))

    start = time.perf_counter()
    result = finch_module.finch(
        x, max_prototypes, search=neighbours.make_search(**given, log=lambda _: None), **given, log=log
    )
    seconds = time.perf_counter() - start
    for i, phase in enumerate(record):
        phase["level"] = next((level for level, end in enumerate(levels) if i < end), len(levels))
    return {
        "seconds": seconds,
        "level_seconds": result.level_seconds,
        "counts": result.counts,
        "phases": record,
        "labels": hashlib.sha1(result.labels.tobytes()).hexdigest(),
        "code": str(Path(finch_module.__file__).parent),
    }


def warm(path: Path, chunk: int = 64 * 2**20) -> float:
    """Read ``path`` whole, so that the next run starts with it in the page cache; the seconds it took.

    Otherwise each run inherits what the one before left: after a run with 15.8 GB of anonymous memory only part of
    the 11.5 GB of features at 3.2M were cached, and the next run read 4 GB more from the disk (29 s in its
    projection phase) than the run after one of 7 GB."""
    start, buffer = time.perf_counter(), bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start


def median_run(runs: list[dict]) -> dict:
    """One method's repeated runs as one: FINCH's and every phase's median seconds and bytes (phases matched by
    level, name and order, which the same input keeps), the first run's partition."""
    phases = [
        {**first, **{k: statistics.median(r["phases"][i][k] for r in runs) for k in ("seconds", "read", "write")}}
        for i, first in enumerate(runs[0]["phases"])
    ]
    return {
        **runs[0],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "phases": phases,
        "labels_all": {r["labels"] for r in runs},
    }


def extract(revision: str, into: Path) -> Path:
    """The ``protoad_edge`` package of git ``revision``, written under ``into``: the folder to import it from."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "protoad_edge"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


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
        io = [
            f"{sum(p['read'] for p in mine[m]) / GB:.2f} / {sum(p['write'] for p in mine[m]) / GB:.2f}" for m in methods
        ]
        lines.append(
            f"| {level} | {phase} | " + " | ".join(f"{s:.1f}" for s in seconds) + " | " + " | ".join(io) + " |"
        )
    lines.append(
        "| all | FINCH | "
        + " | ".join(f"{results[m]['seconds']:.1f}" for m in methods)
        + " | "
        + " | ".join("" for _ in methods)
        + " |"
    )
    return lines


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="FP16 .npy of patch vectors")
    parser.add_argument("--methods", default="ours,unbounded")
    parser.add_argument("--max-prototypes", type=int, default=10_000)
    parser.add_argument(
        "--baseline", help="a git revision whose FINCH also runs (no budget), e.g. the commit before issue 15"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method, interleaved; medians reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.features, args.worker, args.max_prototypes)))
        return
    methods = {m: None for m in args.methods.split(",")}  # method -> the code it imports (None: this checkout)
    with tempfile.TemporaryDirectory(prefix="finch-baseline.") as folder:
        if args.baseline:
            methods[args.baseline] = extract(args.baseline, Path(folder))
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for repeat in range(args.repeat):
            for method, code in methods.items():
                warmed = warm(args.features)
                env = {
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(code or ROOT), os.environ.get("PYTHONPATH")])),
                }
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--features",
                        str(args.features),
                        "--max-prototypes",
                        str(args.max_prototypes),
                        "--worker",
                        BASELINE if code else method,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs[method].append(run)
                print(
                    f"run {repeat + 1} {method}: FINCH {run['seconds']:.1f} s, clusters {run['counts']}, "
                    f"code from {run['code']} (features read into the page cache before it: {warmed:.0f} s)",
                    flush=True,
                )
    results = {m: median_run(r) for m, r in runs.items()}
    first = next(iter(results))
    for method, r in results.items():
        ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs[first], runs[method])]
        print(
            f"{method}: FINCH median {r['seconds']:.1f} s; per run / {first}: " + ", ".join(f"{x:.3f}" for x in ratios)
        )
    same = len(set().union(*(r["labels_all"] for r in results.values()))) == 1
    print(
        f"{machine_text()}\n`{command_line(sys.argv)}`\n"
        f"same partition at the chosen level in every method and run: {same}\n"
    )
    print("\n".join(table(results)))


if __name__ == "__main__":
    main(sys.argv[1:])
