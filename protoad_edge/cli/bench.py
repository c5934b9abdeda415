"""``protoad-bench``: throughput and latency of a model, from a decoded frame to its score (trtexec style)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..errors import ProtoADError
from .common import user_errors


def parse_batches(values: tuple[str, ...]) -> list[int]:
    """``("1", "8")`` or ``("1,8",)`` -> [1, 8] (order kept, duplicates dropped)."""
    out: list[int] = []
    for value in values or ("1",):
        for part in value.split(","):
            part = part.strip()
            if not re.fullmatch(r"\d+", part) or int(part) < 1:
                raise ProtoADError(f"bad --batch {value!r}: give positive integers, e.g. --batch 1 --batch 8 or --batch 1,8")
            if int(part) not in out:
                out.append(int(part))
    return out


def parse_size(value: str) -> tuple[int, int]:
    """``1280x720`` -> (1280, 720)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ProtoADError(f"bad --frame-size {value!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
    return int(m.group(1)), int(m.group(2))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TensorRT plan (NAME.plan, with NAME.json beside it).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="ONNX model, run by onnxruntime (its best available execution provider).")
@click.option("--torch", "torch_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Bundle NAME.json: the eager PyTorch network (FP16 on a GPU, FP32 on the CPU).")
@click.option("--batch", "batches", multiple=True, metavar="N[,N...]",
              help="Batch size(s); repeat or comma-separate (default 1).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed iterations first.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Timed iterations per batch size, at least (default 10, or 1 with --duration).")
@click.option("--duration", type=click.FloatRange(min=0.0), default=None,
              help="Seconds per batch size, at least (default 0).")
@click.option("--frame-size", default="1280x720", show_default=True,
              help="Size of the synthetic decoded frame that preprocessing starts from.")
@click.option("--image", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Start from this image file instead of a synthetic frame.")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="CPU threads for onnxruntime (intra-op) or torch; 0 = library default (one per physical core).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device for --torch.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the full report to this JSON file (atomically).")
@user_errors
def main(engine: Path | None, onnx_path: Path | None, torch_path: Path | None, batches: tuple[str, ...],
         warmup: int, iterations: int | None, duration: float | None, frame_size: str, image: Path | None,
         threads: int, device: str, json_path: Path | None) -> None:
    """Benchmark one model: host preprocessing, inference (H2D / GPU compute / D2H on TensorRT) and end
    to end latency (min / mean / median / p90 / p95 / p99 / max) and throughput, per batch size,
    beside the paper's RTX 2080 Ti figures. --onnx and --engine do not need PyTorch."""
    from ..bench import benchmark, make_frame, open_backend_for

    chosen = [(kind, p) for kind, p in (("engine", engine), ("onnx", onnx_path), ("torch", torch_path)) if p is not None]
    if len(chosen) != 1:
        raise ProtoADError("give exactly one model: --engine NAME.plan, --onnx NAME.onnx or --torch NAME.json")
    kind, model = chosen[0]
    sizes = parse_batches(batches)
    if iterations is None:
        iterations = 1 if duration else 10
    frame = make_frame(parse_size(frame_size), image)
    source = str(image) if image is not None else "synthetic"
    with open_backend_for(kind, model, threads=threads, device=device) as backend:
        report = benchmark(backend, sizes, frame, warmup=warmup, iterations=iterations, duration=duration or 0.0,
                           kind=kind, model=model, frame_source=source, threads=threads)
    for line in report.lines():
        click.echo(line)
    if json_path is not None:
        report.save_json(json_path)
        click.echo(f"\nreport written to {json_path}")
