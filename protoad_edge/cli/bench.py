"""``protoad-bench``: throughput and latency of a model, from a decoded frame to its score (trtexec style)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..constants import DEVICES
from ..errors import ProtoADError
from ..runtime.backends.registry import AUTO, HELP, SPECS
from .common import cpu_threads, threads_option, user_errors

# The older per-backend model options: --engine NAME.plan is --model NAME.plan --backend trt, and so on.
ALIASES = {"engine": "trt", "onnx": "ort", "torch": "torch"}


def parse_batches(values: tuple[str, ...]) -> list[int]:
    """``("1", "8")`` or ``("1,8",)`` -> [1, 8] (order kept, duplicates dropped)."""
    out: list[int] = []
    for value in values or ("1",):
        for part in value.split(","):
            part = part.strip()
            if not re.fullmatch(r"\d+", part) or int(part) < 1:
                raise ProtoADError(
                    f"bad --batch {value!r}: give positive integers, e.g. --batch 1 --batch 8 or --batch 1,8"
                )
            if int(part) not in out:
                out.append(int(part))
    return out


def parse_size(value: str) -> tuple[int, int]:
    """``1280x720`` -> (1280, 720)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ProtoADError(f"bad --frame-size {value!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
    return int(m.group(1)), int(m.group(2))


def model_and_backend(model: Path | None, backend: str, aliases: dict[str, Path | None]) -> tuple[Path | None, str]:
    """One model from --model or one alias option; an alias fixes the backend."""
    given = [(option, path) for option, path in aliases.items() if path is not None]
    if len(given) + (model is not None) > 1:
        raise ProtoADError("give one model: --model FILE, or one of --engine, --onnx, --torch")
    if not given:
        return model, backend
    option, path = given[0]
    if backend not in (AUTO, ALIASES[option]):
        raise ProtoADError(f"--{option} runs backend {ALIASES[option]}, not --backend {backend}")
    return path, ALIASES[option]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Any file of a model bundle (NAME.onnx, .plan or .json). Default: the single bundle in ./models.",
)
@click.option("--backend", type=click.Choice(SPECS), default=AUTO, show_default=True, help=HELP)
@click.option(
    "--engine",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Same as --model NAME.plan --backend trt.",
)
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Same as --model NAME.onnx --backend ort.",
)
@click.option(
    "--torch",
    "torch_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Same as --model NAME.json --backend torch.",
)
@click.option(
    "--batch",
    "batches",
    multiple=True,
    metavar="N[,N...]",
    help="Batch sizes to measure, each in images per inference call; repeat or comma-separate (default 1).",
)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed iterations first.")
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Timed iterations per batch size, at least (default 10, or 1 with --duration).",
)
@click.option(
    "--duration", type=click.FloatRange(min=0.0), default=None, help="Seconds per batch size, at least (default 0)."
)
@click.option(
    "--frame-size",
    default="1280x720",
    show_default=True,
    help="Size of the synthetic decoded frame that preprocessing starts from.",
)
@click.option(
    "--image",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Start from this image file instead of a synthetic frame.",
)
@threads_option("onnxruntime (intra-op) or torch")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="cpu: onnxruntime's CPU provider only, or torch on the CPU; cuda: a GPU; auto: the best available.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the full report to this JSON file (atomically).",
)
@user_errors
def main(
    model: Path | None,
    backend: str,
    engine: Path | None,
    onnx_path: Path | None,
    torch_path: Path | None,
    batches: tuple[str, ...],
    warmup: int,
    iterations: int | None,
    duration: float | None,
    frame_size: str,
    image: Path | None,
    threads: int,
    device: str,
    json_path: Path | None,
) -> None:
    """Benchmark one model: host preprocessing, inference (H2D / GPU compute / D2H on TensorRT) and end
    to end latency (min / mean / median / p90 / p95 / p99 / max) and throughput, per batch size,
    beside the paper's RTX 2080 Ti figures. The ort and trt backends do not need PyTorch."""
    from ..evaluation.bench import benchmark, make_frame
    from ..runtime.backends.base import BackendOptions
    from ..runtime.backends.registry import open_backend

    model, backend = model_and_backend(model, backend, {"engine": engine, "onnx": onnx_path, "torch": torch_path})
    sizes = parse_batches(batches)
    if iterations is None:
        iterations = 1 if duration else 10
    frame = make_frame(parse_size(frame_size), image)
    source = str(image) if image is not None else "synthetic"
    options = BackendOptions(device=device, threads=cpu_threads(threads), timing=True)
    with open_backend(model, backend, options=options) as opened:
        report = benchmark(
            opened, sizes, frame, warmup=warmup, iterations=iterations, duration=duration or 0.0, frame_source=source
        )
    for line in report.lines():
        click.echo(line)
    if json_path is not None:
        report.save_json(json_path)
        click.echo(f"\nreport written to {json_path}")
