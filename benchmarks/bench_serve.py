"""Many cameras: a protoad-serve under load from concurrent clients, a restart survived, and multi-source runs.

    python benchmarks/bench_serve.py --clients 1,4,16 --seconds 60 --sources 1,2,4 --write

All on 127.0.0.1 and bounded in count and time. The model is a real-shaped bundle built offline
(tests/conftest.py's ``make_bundle``: random weights, crop 224, ``--k`` prototypes), or ``--model``.

- **Load**: for each count in ``--clients``, that many client threads (each its own gRPC connection, the
  run loop's ``TritonBackend``) send one frame per request, back to back, for ``--seconds``; Triton's
  dynamic batcher gathers them (``--max-batch``). Throughput, latency p50/p99/max, and the checks: no
  request lost (failed after retries), none answered twice or out of order, every score equal to the
  local backend's for that frame within 1e-5.
- **Restart**: ``--restart-clients`` clients for ``--seconds`` while the server is stopped with SIGTERM a
  third of the way in and started again a second later; the clients retry (the reconnect policy of
  ``protoad-run --server``) and the same checks must hold.
- **Multi-source**: one ``protoad-run``-style run (``runtime.loop.run_many``) with 1, 2, 4 generated
  file sources of ``--frames`` frames on the local onnxruntime backend; frames per second of the whole run
  against one source.

The server runs in the serving environment (benchmarks/triton_server.py). ``--write`` puts the tables in
RESULTS.md (section ``serve``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from bench_common import command_line, machine_text, update_results  # noqa: E402
from bench_soak import GeneratedLine  # noqa: E402
from triton_server import Server  # noqa: E402

from protoad_edge.bundle import Bundle  # noqa: E402
from protoad_edge.errors import ProtoADError  # noqa: E402
from protoad_edge.preprocess import to_batch  # noqa: E402
from protoad_edge.runtime.backends.base import BackendOptions  # noqa: E402
from protoad_edge.runtime.backends.ort import OrtBackend  # noqa: E402
from protoad_edge.runtime.loop import RunOptions, run_many  # noqa: E402
from protoad_edge.runtime.serving.triton import TritonBackend  # noqa: E402
from protoad_edge.runtime.sources.capture import Reconnect  # noqa: E402

TOLERANCE = 1e-5
DISTINCT_FRAMES = 16
RESTART_GAP_S = 1.0


@dataclass
class Load:
    """What ``clients`` concurrent clients got in ``seconds``."""

    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    lost: int = 0  # requests that failed after every retry
    mismatched: int = 0  # answers whose score differs from the local backend's by more than TOLERANCE
    out_of_order: int = 0  # answers not in the order (and count) their client sent them
    retries: int = 0
    outage_s: float = 0.0  # how long the server was down (restart only)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def fps(self) -> float:
        return self.requests / self.seconds

    def ok(self) -> bool:
        return self.requests > 0 and self.lost == self.mismatched == self.out_of_order == 0


def reference(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """DISTINCT_FRAMES network inputs [N,3,S,S] (generated line frames, preprocessed) and the local backend's scores."""
    with OrtBackend(model, BackendOptions(), providers=["CPUExecutionProvider"]) as local:
        source = GeneratedLine(DISTINCT_FRAMES, size=(640, 480))
        frames = to_batch([local.info.preprocess(rgb) for rgb, _ in iter(source.read, None)])
        return frames, local.infer(frames)[1]


def load(
    server: Server,
    frames: np.ndarray,
    scores: np.ndarray,
    clients: int,
    seconds: float,
    restart_at: float | None = None,
) -> Load:
    """``clients`` threads sending single frames for ``seconds``; with ``restart_at``, the server restarted then."""
    result = Load(clients, seconds)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    backends = [TritonBackend(server.url, retry=Reconnect(give_up_after=120.0)) for _ in range(clients)]

    def client(index: int) -> None:
        backend = backends[index]
        answered: list[int] = []
        start.wait()
        end = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < end:
            frame = (index + seq) % len(frames)
            sent = time.perf_counter()
            try:
                score = backend.infer(frames[frame : frame + 1])[1][0]
            except ProtoADError:
                with lock:
                    result.lost += 1
                seq += 1
                continue
            latency = 1000 * (time.perf_counter() - sent)
            answered.append(seq)
            with lock:
                result.latencies_ms.append(latency)
                result.mismatched += int(abs(float(score) - float(scores[frame])) > TOLERANCE)
            seq += 1
        with lock:
            result.out_of_order += int(answered != sorted(set(answered)))
            result.retries += backend.retries

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    if restart_at is not None:
        time.sleep(restart_at)
        down = time.monotonic()
        server.stop()
        time.sleep(RESTART_GAP_S)
        server.start()
        result.outage_s = time.monotonic() - down
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - began
    for backend in backends:
        backend.close()
    return result


def multi_source(model: Path, counts: list[int], frames: int) -> dict[int, float]:
    """Frames per second of one run over ``n`` generated sources, for each ``n``."""
    fps = {}
    with OrtBackend(model, BackendOptions(), providers=["CPUExecutionProvider"]) as backend:
        backend.infer(to_batch([backend.info.preprocess(GeneratedLine(1).read()[0])]))  # warm up
        for n in counts:
            started = time.perf_counter()
            summaries = run_many(
                [GeneratedLine(frames) for _ in range(n)], backend, RunOptions(status_every=0, log=lambda message: None)
            )
            seconds = time.perf_counter() - started
            assert all(s.frames == frames and not s.error for s in summaries), [s.lines() for s in summaries]
            fps[n] = n * frames / seconds
    return fps


def load_table(rows: list[Load], restart: Load | None) -> str:
    lines = [
        "| clients | seconds | requests | frames/s | p50 ms | p99 ms | max ms | lost | mismatched | out of order | "
        "retries |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows + ([restart] if restart else []):
        p50, p99 = np.percentile(r.latencies_ms, [50, 99]) if r.latencies_ms else (float("nan"),) * 2
        name = f"{r.clients}, server restarted ({r.outage_s:.1f} s down)" if r is restart else str(r.clients)
        lines.append(
            f"| {name} | {r.seconds:.0f} | {r.requests:,} | {r.fps:.2f} | {p50:.0f} | {p99:.0f} | "
            f"{max(r.latencies_ms, default=float('nan')):.0f} | {r.lost} | {r.mismatched} | {r.out_of_order} | "
            f"{r.retries} |"
        )
    return "\n".join(lines)


def source_table(fps: dict[int, float]) -> str:
    one = fps[min(fps)]
    lines = ["| sources | frames/s, all sources | vs 1 source |", "| --- | --- | --- |"]
    lines += [f"| {n} | {v:.2f} | {v / one:.2f}x |" for n, v in fps.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="A bundle's NAME.onnx (default: build one, crop 224).")
    parser.add_argument("--k", type=int, default=1000, help="Prototypes of the built model.")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--restart-clients", type=int, default=4, help="0: no restart phase.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--sources", default="1,2,4")
    parser.add_argument("--frames", type=int, default=48, help="Frames per source in the multi-source runs.")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from conftest import make_bundle

            model = make_bundle(Path(tmp) / "models", name="line", crop=224, resize=256, k=args.k)
        frames, scores = reference(model)
        with Server(model, Path(tmp) / "serve.log", max_batch=args.max_batch) as server:
            rows = [load(server, frames, scores, int(c), args.seconds) for c in args.clients.split(",")]
            restart = (
                load(server, frames, scores, args.restart_clients, args.seconds, restart_at=args.seconds / 3)
                if args.restart_clients
                else None
            )
        fps = multi_source(model, [int(n) for n in args.sources.split(",")], args.frames)
    info = Bundle.of(args.model).info() if args.model else None
    shape = (
        f"crop 224, K {args.k}" if info is None else f"{args.model.name}: crop {info.crop}, K {info.num_prototypes:,}"
    )
    body = (
        f"## Serving many lines: protoad-serve under load, and multi-source runs (issue 16)\n\n"
        f"Command: `{command_line(argv)}`\n\nMachine: {machine_text()}\n\n"
        f"Model: {shape}, random weights; server: protoad-serve (PyTriton, onnxruntime CPU, dynamic "
        f"batching up to {args.max_batch}) on 127.0.0.1; each client sends one frame per request, back to back.\n\n"
        f"{load_table(rows, restart)}\n\n"
        f"One run over several generated file sources (local onnxruntime, {args.frames} frames each, their waiting "
        f"frames judged in one batch):\n\n{source_table(fps)}\n"
    )
    print(body)
    passed = all(r.ok() for r in rows + ([restart] if restart else []))
    print("PASS: no request lost, repeated or mismatched" if passed else "FAIL: see the table")
    if args.write:
        print(f"\nwrote {update_results('serve', body)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
