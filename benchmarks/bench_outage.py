"""Stream outage: a live MJPEG stream on 127.0.0.1 is killed mid-run and restarted 10 s later.

    python benchmarks/bench_outage.py --gap 10 --write

protoad-run (a subprocess, as on a line) judges http://127.0.0.1:PORT/stream.mjpg (benchmarks/mjpeg_server.py,
25 frames/s) with a small real bundle (tests/conftest.py's ``make_bundle``) until --max-frames. After
--before frames the server is killed; --gap seconds later it is started again on the same port. Then a
second run is left without its server, to time how it ends (--reconnect-timeout). Prints what the run
reported (reconnects, the gap it measured, how long after the restart frames came again, every result
kept) and, with ``--write``, puts it in RESULTS.md. tests/test_outage.py is the short version.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from bench_common import command_line, machine_text, update_results  # noqa: E402

SERVER = Path(__file__).with_name("mjpeg_server.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    import socket

    server = subprocess.Popen([sys.executable, str(SERVER), str(port)])
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("the MJPEG server did not start")


def protoad_run(port: int, model: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from protoad_edge.cli.run import main; main()",
            f"http://127.0.0.1:{port}/stream.mjpg",
            "--model",
            str(model),
            "--status-every",
            "2",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def survive(model: Path, before: int, total: int, gap: float) -> dict:
    port = free_port()
    server = start_server(port)
    run = protoad_run(port, model, "--jsonl", "-", "--max-frames", str(total))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(run.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        while len(lines) < before:
            time.sleep(0.01)
        server.kill()
        server.wait()
        killed = time.time()
        time.sleep(gap)
        server = start_server(port)
        restarted = time.time()
        run.wait(timeout=300)
        reader.join(timeout=10)
        stderr = run.stderr.read()
    finally:
        run.kill()
        server.kill()
    records = [json.loads(line) for line in lines]
    after = [r["timestamp"] for r in records if r["timestamp"] >= restarted]
    summary = stderr[stderr.index("source      ") :].splitlines()
    return {
        "returncode": run.returncode,
        "records": len(records),
        "in_order": [r["frame"] for r in records] == sorted(r["frame"] for r in records),
        "server_down_s": restarted - killed,
        "frames_again_after_restart_s": (min(after) - restarted) if after else float("nan"),
        "summary": summary,
        "events": [line for line in stderr.splitlines() if "reconnect attempt" in line or "frames again" in line],
    }


def never_back(model: Path, timeout: float) -> dict:
    port = free_port()
    server = start_server(port)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "run.jsonl"
        run = protoad_run(port, model, "--jsonl", str(log), "--reconnect-timeout", str(timeout))
        try:
            time.sleep(3.0)
            server.kill()
            killed = time.monotonic()
            _, stderr = run.communicate(timeout=timeout + 60)
            ended = time.monotonic() - killed
        finally:
            run.kill()
            server.kill()
        kept = len(log.read_text().splitlines()) if log.exists() else 0
    return {
        "returncode": run.returncode,
        "ended_after_s": ended,
        "records_kept": kept,
        "error": next((line for line in stderr.splitlines() if line.startswith("error:")), ""),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gap", type=float, default=10.0, help="seconds the server stays down")
    parser.add_argument("--before", type=int, default=100, help="frames judged before the server is killed")
    parser.add_argument("--frames", type=int, default=300, help="--max-frames of the run")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="--reconnect-timeout of the run left without a server"
    )
    parser.add_argument("--write", action="store_true", help="put the figures into benchmarks/RESULTS.md")
    args = parser.parse_args(argv[1:])
    import torch
    from conftest import make_bundle

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="outage_") as tmp:
        model = make_bundle(Path(tmp))
        survived = survive(model, args.before, args.frames, args.gap)
        ended = never_back(model, args.timeout)
    ok = (
        survived["returncode"] == 0
        and survived["records"] == args.frames
        and survived["in_order"]
        and ended["returncode"] == 2
        and ended["records_kept"] > 0
    )
    body = "\n".join(
        [
            "## Stream outage: an MJPEG stream killed mid-run and restarted (CPU)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine_text()}; command: `{command_line(argv)}`.",
            f"protoad-run on http://127.0.0.1 (benchmarks/mjpeg_server.py, 25 frames/s), --max-frames {args.frames}; "
            "the server "
            f"was killed after {args.before} frames and restarted {args.gap:g} s later on the same port.",
            "",
            f"- Exit status {survived['returncode']}; {survived['records']} of {args.frames} records, frame indices "
            "in order: "
            f"{survived['in_order']}; the server was down {survived['server_down_s']:.1f} s; the first frame after the "
            f"restart was captured {survived['frames_again_after_restart_s']:.1f} s after it (the reconnect pause in "
            "progress).",
            "- What the run logged: " + "; ".join(f"`{e}`" for e in survived["events"]),
            "- Its summary: " + " / ".join(f"`{line.strip()}`" for line in survived["summary"]),
            f"- Left without a server (--reconnect-timeout {args.timeout:g}): exit status {ended['returncode']} "
            f"{ended['ended_after_s']:.1f} s after the kill, {ended['records_kept']} records kept in the finalised "
            f"log, one line: `{ended['error']}`",
            "",
            f"Verdict: {'pass' if ok else 'FAIL'}.",
        ]
    )
    print(body)
    if args.write:
        print(f"\nwrote {update_results('outage', body)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
