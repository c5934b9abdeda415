"""Ahead of the peers on the CPU (issue 29): our bundles against anomalib's PaDiM and PatchCore, side by side.

Two steps in two environments, because anomalib is never a dependency of the runtime (as PyTriton is not):

1. ``build`` - anomalib's PaDiM (WRN50, layers 1-3, 550 dims) and PatchCore (WRN50, layers 2-3, coreset 10 % and
   1 %), fitted on the same training images as the bundle (its held-out images left out), at the same 224 px
   centre crops, with the same backbone weights (the bundle's ``--weights``: seeded random for ``none``), and
   exported to ONNX with anomalib's own ``to_onnx`` (pre-processing inside the graph, post-processing off: raw
   scores, which AUROC needs). Run it in anomalib's environment::

       python3 -m venv ../.venv-anomalib
       ../.venv-anomalib/bin/pip install "torch==2.14.1" "torchvision==0.29.1" "anomalib==2.7.0" onnxscript
       PYTHONPATH=. ../.venv-anomalib/bin/python benchmarks/bench_peers.py build --bundle models/bottle.onnx \\
           --data-root ../shared/data/mvtec --out /tmp/peers

2. ``time`` - in the project's environment: every model and precision on the labelled test split (accuracy,
   and the accuracy gate against the model's own FP32), then timed interleaved in one process (rotating order,
   batch 1 and 8, medians), and the table goes to benchmarks/RESULTS.md::

       python benchmarks/bench_peers.py time --bundle models/bottle.onnx --bundle models/p256/bottle.onnx \\
           --peers /tmp/peers --data-root ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from bench_common import DEFAULT_DATA, command_line, machine_text, update_results

# (name, anomalib class, its arguments); the input is the bundle's crop, normalised inside the exported graph.
PEERS = (
    ("PaDiM", "Padim", {"layers": ["layer1", "layer2", "layer3"], "n_features": 550}),
    ("PatchCore 10 %", "Patchcore", {"layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.1}),
    ("PatchCore 1 %", "Patchcore", {"layers": ["layer2", "layer3"], "coreset_sampling_ratio": 0.01}),
)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TIMED_BATCHES = (1, 8)
# Our runs: (label, --backend spec); the first is the reference the gate judges the others against.
OURS = (
    ("onnxruntime FP32", "ort"),
    ("OpenVINO FP32", "openvino"),
    ("OpenVINO BF16 backbone, FP32 scope", "openvino:bf16"),
    ("OpenVINO BF16 whole network", "openvino:bf16-all"),
)
# A peer's runs: (label, runtime, OpenVINO hint or None: OpenVINO's default, BF16 on CPUs that have it).
PEER_RUNS = (
    ("onnxruntime FP32", "ort", None),
    ("OpenVINO FP32", "openvino", "f32"),
    ("OpenVINO default (BF16)", "openvino", None),
)


# --- step 1: anomalib's models (anomalib's environment) --------------------------------------------------------


def build(args: argparse.Namespace) -> None:
    import torch
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    from protoad_edge.atomic import write_text_atomic
    from protoad_edge.builder.datasets import load_crops, open_dataset
    from protoad_edge.builder.features import build_backbone
    from protoad_edge.bundle import Bundle

    torch.set_num_threads(args.threads)
    info = Bundle.of(args.bundle).info()
    train = training_images(open_dataset(args.category, args.data_root, "mvtec").train, info)
    crops = load_crops(train, info.preprocess, "load train", True)
    backbone, weights = build_backbone(info.weights, info.seed)
    state = backbone.state_dict()
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "peers.json"
    record: dict[str, Any] = {
        "bundle": str(args.bundle),
        "train_images": len(crops),
        "weights": weights,
        "crop": info.crop,
        "models": json.loads(done.read_text())["models"] if done.exists() else {},
    }
    for name, cls, kwargs in PEERS:
        if args.peer and name not in args.peer:
            continue
        start = time.perf_counter()
        pre = PreProcessor(transform=v2.Compose([v2.Normalize(*IMAGENET)]))
        model = {"Padim": Padim, "Patchcore": Patchcore}[cls](
            backbone="wide_resnet50_2",
            pre_trained=False,
            pre_processor=pre,
            post_processor=False,
            evaluator=False,
            visualizer=False,
            **kwargs,
        )
        extractor = model.model.feature_extractor.feature_extractor
        missing, _ = extractor.load_state_dict(state, strict=False)
        if missing:
            raise SystemExit(f"{name}: the backbone weights do not fit anomalib's extractor (missing {missing[:3]})")
        model.model.train()
        with torch.no_grad():
            for i in range(0, len(crops), 8):
                model.model(pre(torch.from_numpy(crops[i : i + 8]).permute(0, 3, 1, 2).float() / 255.0))
            inverse, torch.linalg.inv = torch.linalg.inv, numpy_inverse
            try:
                model.fit()
            finally:
                torch.linalg.inv = inverse
        model.eval()
        path = model.to_onnx(args.out / slug(name), input_size=(info.crop, info.crop))
        onnx_files: str | dict[str, str] = str(path)
        if not batch_is_dynamic(path):  # torch.export fixed PatchCore's batch (at 2): one static graph per batch
            onnx_files = {
                str(b): str(static_export(model, path.with_name(f"model_b{b}.onnx"), b, info.crop))
                for b in TIMED_BATCHES
            }
        bank = getattr(model.model, "memory_bank", None)  # PatchCore's coreset; PaDiM keeps a Gaussian per patch
        record["models"][name] = {
            "onnx": onnx_files,
            "fit_s": round(time.perf_counter() - start, 1),
            **kwargs,
            "memory_bank": list(bank.shape) if isinstance(bank, torch.Tensor) else None,
        }
        print(f"{name}: {record['models'][name]}", file=sys.stderr, flush=True)
        write_text_atomic(done, json.dumps(record, indent=2) + "\n")  # each model as it is done


def batch_is_dynamic(path: Path) -> bool:
    import onnx

    return bool(onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0].dim_param)


def static_export(model: Any, path: Path, batch: int, crop: int) -> Path:
    """anomalib's module through the exporter anomalib uses (dynamo), at one fixed batch size."""
    import torch

    torch.onnx.export(
        model,
        (torch.zeros(batch, 3, crop, crop),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["pred_score", "anomaly_map"],
    )
    return path


def numpy_inverse(matrix: Any) -> Any:
    """PaDiM's batched inverse of its covariances in float64 through numpy: torch 2.14.1's batched CPU inverse failed
    here (oneMKL "Parameter 6 was incorrect on entry to DLASWP" for a batch of 550 x 550 matrices)."""
    import torch

    out = np.empty(matrix.shape, dtype=np.float32)
    for i in range(0, len(matrix), 256):  # in chunks: at 224 px PaDiM holds 3,136 matrices (3.8 GB in FP32)
        out[i : i + 256] = np.linalg.inv(matrix[i : i + 256].double().numpy())
    return torch.from_numpy(out).to(matrix.dtype)


def training_images(train: list, info: Any) -> list:
    """The bundle's training images: its seeded held-out ones (``build.pipeline.split_train``) left out."""
    held = int(info.build.get("images", {}).get("held_out", 0))
    order = np.random.default_rng(info.seed).permutation(len(train))
    kept = sorted(order[held:].tolist())
    return [train[i] for i in kept]


def slug(name: str) -> str:
    return name.lower().replace(" %", "").replace(" ", "_")


# --- step 2: accuracy and speed (the project's environment) ----------------------------------------------------


Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # float32 NCHW 0-255 -> (maps, scores)


@dataclass
class Run:
    model: str
    label: str
    ran: str
    opener: Callable[[], Infer]
    keep_open: bool = True  # False: opened for each use and closed after it (see --keep-open-below)
    image_auroc: float = float("nan")
    pixel_auroc: float = float("nan")
    scores: np.ndarray | None = None
    ms: dict[int, list[float]] = field(default_factory=lambda: {1: [], 8: []})
    held: Infer | None = None

    @contextmanager
    def opened(self) -> Iterator[Infer]:
        """The run's session: opened once and kept, or - for a model too large to keep one session per row in
        memory (PaDiM's 3.9 GB of inverse covariances, three rows) - opened for this use and released after it."""
        infer = self.held or self.opener()
        if self.keep_open:
            self.held = infer
        try:
            yield infer
        finally:
            del infer
            if not self.keep_open:
                gc.collect()


def ours(bundle: Path, threads: int) -> list[Run]:
    from protoad_edge.bundle import Bundle
    from protoad_edge.runtime.backends.base import BackendOptions
    from protoad_edge.runtime.backends.registry import open_backend

    info = Bundle.of(bundle).info()
    name = f"protoad-edge K {info.num_prototypes:,}" + (f", D {info.projection['dims']}" if info.projection else "")
    runs = []
    for label, spec in OURS:
        backend = open_backend(bundle, spec, options=BackendOptions(device="cpu", threads=threads))
        runs.append(Run(name, label, backend.describe().line(), lambda b=backend: b.infer, held=backend.infer))
    return runs


def peer(name: str, onnx_files: str | dict[str, str], threads: int, keep_open_below_gb: float) -> list[Run]:
    """anomalib's exported graph (one, or one per batch size where the export fixed it): input the crop in [0, 1],
    outputs anomaly_map and pred_score. Kept open between uses only where its files weigh less than
    ``keep_open_below_gb``."""
    files = {0: onnx_files} if isinstance(onnx_files, str) else {int(b): f for b, f in onnx_files.items()}
    keep = graph_bytes(files.values()) < keep_open_below_gb * 2**30
    return [
        Run(name, label, f"{runtime} {hint or 'default'}", partial(peer_infer, files, runtime, hint, threads), keep)
        for label, runtime, hint in PEER_RUNS
    ]


def graph_bytes(paths: Iterable[str]) -> int:
    """What ONNX graphs weigh on disk, their external weights (``NAME.onnx.data``) included."""
    return sum(f.stat().st_size for p in map(Path, paths) for f in (p, p.with_name(p.name + ".data")) if f.exists())


def peer_infer(files: dict[int, str], runtime: str, hint: str | None, threads: int) -> Infer:
    """A peer's graphs opened: a call takes our batches and pads a fixed-batch graph's."""
    calls = {b: session(f, runtime, hint, threads) for b, f in files.items()}

    def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        size = 0 if 0 in calls else min((b for b in calls if b >= n), default=max(calls))
        x = np.ascontiguousarray(batch / 255.0, dtype=np.float32)
        if size and size != n:  # a fixed batch: padded with copies of the last image, which are dropped
            x = np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
        out = calls[size](x)
        maps = np.asarray(out["anomaly_map"]).reshape(len(x), *batch.shape[2:])
        return maps[:n], np.ravel(out["pred_score"])[:n]

    return infer


def session(path: str, runtime: str, hint: str | None, threads: int) -> Callable[[np.ndarray], dict[str, Any]]:
    """One graph opened by onnxruntime (CPU, FP32) or OpenVINO (``hint``, or OpenVINO's default where None)."""
    if runtime == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return lambda x: dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: {o.get_any_name(): v for o, v in zip(compiled.outputs, request.infer([x]).values())}


def accuracy(run: Run, test: Any, batch: int) -> None:
    from protoad_edge.metrics import curve_area, roc_curve
    from protoad_edge.preprocess import to_batch

    maps, scores = [], []
    with run.opened() as infer:
        for i in range(0, len(test.crops), batch):
            m, s = infer(to_batch(test.crops[i : i + batch]))
            maps.append(m)
            scores.append(np.ravel(s))
    maps_all, run.scores = np.concatenate(maps), np.concatenate(scores)
    run.image_auroc = curve_area(*roc_curve(test.labels, run.scores)[:2])
    usable = test.pixel_usable
    run.pixel_auroc = curve_area(*roc_curve(test.masks[usable], maps_all[usable])[:2])
    print(
        f"{run.model} / {run.label}: image {100 * run.image_auroc:.1f}, pixel {100 * run.pixel_auroc:.1f}",
        file=sys.stderr,
        flush=True,
    )


def timing(runs: list[Run], test: Any, rounds: int) -> None:
    """Every run in turn (the order rotates each round), one batch-1 and one batch-8 call each, after untimed
    warm-up calls on each session it opens and one untimed batch-1 call in each turn: the first call after another
    model ran pays for the switch, which a line judging with one model never does (measured here: OpenVINO's mixed
    BF16 D 256 99 ms against 80 ms for the call after it; onnxruntime 131 against 130)."""
    from protoad_edge.preprocess import to_batch

    singles = [to_batch(test.crops[i : i + 1]) for i in range(rounds)]
    eight = to_batch(test.crops[:8])
    warm = set()
    for r in range(rounds):
        shift = r % len(runs)
        for run in runs[shift:] + runs[:shift]:
            fresh = not run.keep_open or id(run) not in warm
            with run.opened() as infer:
                if fresh:
                    infer(singles[0])
                    infer(eight)
                    warm.add(id(run))
                infer(singles[r])  # settles the switch from the previous model; untimed
                start = time.perf_counter()
                infer(singles[r])
                run.ms[1].append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                infer(eight)
                run.ms[8].append(1000 * (time.perf_counter() - start) / 8)


def table(runs: list[Run], test: Any) -> str:
    from protoad_edge.evaluation.accuracy_gate import GateFigures, judge
    from protoad_edge.metrics import spearman

    rows = [
        "| model | runtime, precision | image / pixel AUROC | gate against its FP32 | ms/image b1 | b8 |"
        " vs its onnxruntime FP32 b1 |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    first: dict[str, Run] = {}
    for run in runs:
        ref = first.setdefault(run.model, run)
        b1, b8 = statistics.median(run.ms[1]), statistics.median(run.ms[8])
        gate = "reference"
        if math.isnan(run.image_auroc):
            gate = "FP32, not rescored (--timing-only-fp32)"
        elif run is not ref:
            verdict = judge(
                GateFigures(
                    run.label,
                    len(test.labels),
                    ref.image_auroc,
                    run.image_auroc,
                    spearman(ref.scores, run.scores),
                    ref.pixel_auroc,
                    run.pixel_auroc,
                    int(test.labels.sum()),
                )
            )
            f = verdict.figures
            gate = (
                f"{'passes' if verdict.passed else 'fails'}: {-f.image_drop_pt:+.2f} / {-f.pixel_drop_pt:+.2f} pt, "
                f"Spearman {f.spearman:.4f}"
            )
        rows.append(
            f"| {run.model} | {run.label} | {accuracy_cell(run)} | "
            f"{gate} | {b1:.0f} | {b8:.0f} | {statistics.median(ref.ms[1]) / b1:.2f}x |"
        )
    return "\n".join(rows)


def accuracy_cell(run: Run) -> str:
    return "-" if math.isnan(run.image_auroc) else f"{100 * run.image_auroc:.1f} / {100 * run.pixel_auroc:.1f}"


def measure(args: argparse.Namespace, argv: list[str]) -> None:
    import openvino as ov

    from protoad_edge.bundle import Bundle
    from protoad_edge.evaluation.evaluate import load_test_set

    load = os.getloadavg()[0]
    units = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    test = load_test_set(args.category, args.data_root, "mvtec", Bundle.of(args.bundle[0]).info().preprocess)
    record = json.loads((args.peers / "peers.json").read_text()) if args.peers else {"models": {}}
    runs = [run for bundle in args.bundle for run in ours(bundle, args.threads)]
    runs += [
        run for name, m in record["models"].items() for run in peer(name, m["onnx"], args.threads, args.keep_open_below)
    ]
    for run in runs:
        if not (args.timing_only_fp32 and run.label == "OpenVINO FP32"):
            accuracy(run, test, 8)
    timing(runs, test, args.rounds)
    text = "\n".join(
        [
            f"## Ahead of the peers on the CPU: protoad-edge against anomalib {args.anomalib} (issue 29)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine_text()}; load average {load:.1f} when it started (other "
            f"jobs share the cores: compare ratios within the table); OpenVINO {ov.get_version()}, CPU capabilities "
            f"{units}. {args.threads} threads for every runtime.",
            "",
            f"Command: `{command_line(argv)}` after the `build` step in anomalib's environment (see the script).",
            "",
            f"Same data for all: MVTec AD {args.category}, {len(test.labels)} test images at the bundle's "
            f"{test.crops.shape[1]} px crop; anomalib's models fitted on the bundle's "
            f"{record.get('train_images', '-')} training images with the same backbone weights "
            f"({record.get('weights', '-')}), exported by anomalib (normalisation inside the graph, no "
            "post-processing).",
            "Timings: every row in turn, rotating order, "
            f"{args.rounds} rounds, medians; each turn starts with one untimed call (the first call after another "
            "model ran pays for the switch, which a line running one model does not); b8 is ms per image in a batch"
            " of 8. The gate column judges each reduced precision against the same model's onnxruntime FP32 row (image "
            "and pixel AUROC within 0.5 pt, Spearman of the image scores >= 0.99).",
            "",
            table(runs, test),
            "",
            *[f"- {name}: {json.dumps(m)}" for name, m in record["models"].items()],
            *([f"\n{args.note.read_text(encoding='utf-8').strip()}"] if args.note else []),
        ]
    )
    if args.no_write:
        print(text)
    else:
        print(f"wrote {update_results('bench_peers', text)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "time"))
    parser.add_argument(
        "--bundle",
        type=Path,
        action="append",
        required=True,
        help="a bundle's NAME.onnx (repeatable for time: e.g. the paper network and --project-dims 256;"
        " build fits the peers on the first one's training images)",
    )
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--out",
        type=Path,
        help="build: where the peers' ONNX files and peers.json go (the models already there are kept)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        choices=[name for name, _, _ in PEERS],
        help="build: only this peer (repeatable; default: all)",
    )
    parser.add_argument("--peers", type=Path, help="time: the build step's --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="time: interleaved rounds (batch 1 and 8 each)")
    parser.add_argument("--anomalib", default="2.7.0", help="time: the anomalib version the build step used")
    parser.add_argument(
        "--timing-only-fp32",
        action="store_true",
        help="time: time the OpenVINO FP32 rows but do not rescore them (the same FP32 graph as "
        "onnxruntime's; saves a pass over the test split each on a slow machine)",
    )
    parser.add_argument(
        "--keep-open-below",
        type=float,
        default=1.0,
        metavar="GB",
        help="time: keep a peer's sessions open between uses only where its graph files weigh less (default 1 GB);"
        " a heavier one (PaDiM: 3.9 GB) is opened for each use, one at a time, so a 24 GB machine holds the run",
    )
    parser.add_argument("--note", type=Path, help="time: a file whose text goes after the table")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args(argv[1:])
    if args.step == "build":
        if args.out is None:
            parser.error("build needs --out")
        args.bundle = args.bundle[0]
        build(args)
    else:
        measure(args, argv)


if __name__ == "__main__":
    main(sys.argv)
