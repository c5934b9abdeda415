"""Issue 18's speed check: ms/image through onnxruntime of the paper's network and the projected ones, at one K.

    python benchmarks/bench_projection_speed.py --k 1757 --dims 64,256 --write

bench_projection.py measures accuracy and speed at the K of FINCH's levels; this one times the whole exported
graphs at exactly ``--k`` prototypes (real normalised patch vectors of normal images, random weights,
crop 224), batch 1, in turns (``bench_common.interleaved``), with the centred projection fitted on the
prototypes as the build exports it. Maps are not compared here (test_projection checks the graph's parity).
``--write`` puts the table in RESULTS.md (section ``projection_speed``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import (
    command_line,
    crops,
    export_model,
    frames,
    interleaved,
    machine_text,
    median_ms,
    sample_prototypes,
    update_results,
)

from protoad_edge.builder.features import PatchFeatures, build_backbone
from protoad_edge.builder.network import ProtoADNet
from protoad_edge.builder.projection import FittedProjection, fit_projection, stage_flops
from protoad_edge.constants import feature_size
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions
from protoad_edge.runtime.backends.ort import OrtBackend


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=1757)
    parser.add_argument("--dims", default="64,256")
    parser.add_argument("--images", type=int, default=4, help="test images, each timed at batch 1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv[1:])
    dims = [int(d) for d in args.dims.split(",")]
    torch.set_num_threads(args.threads)
    train, source = frames("train", -(-args.k // feature_size(224) ** 2) + 1)
    test, _ = frames("test", args.images)
    features = PatchFeatures(build_backbone("none", 0)[0], 224, "bilinear").eval()
    prototypes = sample_prototypes(features, crops(train), args.k)
    fit = fit_projection(prototypes, max(dims), True, "prototypes")
    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in [None, *dims]:
            projection = (
                None
                if d is None
                else FittedProjection(fit.mean, fit.matrix[:d], True, fit.fitted_on, fit.rows, 0.0).module()
            )
            net = ProtoADNet(features, torch.from_numpy(prototypes), 224, projection=projection).eval()
            path = export_model(net, args.k, Path(tmp), name=f"d{d or 0}")
            backends[d] = OrtBackend(path, BackendOptions(threads=args.threads), providers=["CPUExecutionProvider"])
        batch = to_batch(crops(test))

        def each(backend: OrtBackend) -> None:
            for i in range(len(batch)):
                backend.infer(batch[i : i + 1])

        seconds = interleaved({d: functools.partial(each, b) for d, b in backends.items()}, args.rounds)
    paper = median_ms(seconds[None]) / len(batch)
    positions = feature_size(224) ** 2
    lines = ["| network | ms/image | vs the paper's | prototype-stage GFLOP/image |", "| --- | ---: | ---: | ---: |"]
    for d in backends:
        ms = median_ms(seconds[d]) / len(batch)
        name = "paper (1792 channels)" if d is None else f"PCA {d}, centred"
        lines.append(f"| {name} | {ms:.0f} | {paper / ms:.2f}x | {stage_flops(positions, args.k, d) / 1e9:.1f} |")
    body = (
        f"## Projection speed at K = {args.k:,} (issue 18's check)\n\n"
        f"Command: `{command_line(argv)}`\n\nMachine: {machine_text()}\n\n"
        f"Prototypes: {args.k:,} normalised patch vectors of {source}; {len(batch)} test images, batch 1, "
        f"{args.threads} threads, {args.rounds} rounds in turns, medians.\n\n" + "\n".join(lines) + "\n"
    )
    print(body)
    if args.write:
        print(f"wrote {update_results('projection_speed', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
