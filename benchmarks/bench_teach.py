"""Day two (issue 27): a normal variant of the parts a bundle was built on - a changed lamp - is flagged, and
``protoad-teach`` on a few of the line's own frames of it makes it normal again.

For each count of frames taught (and none, the bundle as built), from a fresh copy of the bundle:

* false alarms on held-out frames of the variant (the test split's normal images under the new lamp, and for the
  small demo category more generated ones), at the bundle's image threshold;
* image and pixel AUROC on the original test split, and on the whole test split under the new lamp (its defect
  images with their masks: does a taught lamp hide defects?);
* K, and the seconds ``protoad-teach`` takes, command start to exit (the bundle written), as a subprocess on
  ``--threads`` cores.

The frames taught are the bundle's held-out training images (never its prototypes' images) under the new lamp,
topped up, for the demo, with generated ones. Every figure is measured on the files the teach wrote, through
onnxruntime. Figures and the command: benchmarks/RESULTS.md, section "Teaching a deployed model".

    python benchmarks/bench_teach.py --model models/demo.onnx --category demo --data-root data [--lamp aged]
    python benchmarks/bench_teach.py --model /tmp/bottle/bottle.onnx --category bottle --data-root ../shared/data/mvtec
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# The changed lamps: (gamma, gain, white balance R/G/B). "issue": the issue's, a gamma of 0.75, 8 % brighter, a
# warmer white - a digital gamma on 8-bit frames, which also amplifies the sensor's noise in the dark parts 1.7x;
# "issue-inverse": the same lamp with the other reading of "a gamma of 0.75", the exponent 1 / 0.75 (the gamma
# tables of common OpenCV recipes), which darkens the dark parts and compresses their noise;
# "aged": a lamp grown 15 % dimmer and warmer, the light changing and nothing else.
LAMPS = {
    "issue": (0.75, 1.08, (1.06, 1.0, 0.92)),
    "issue-inverse": (1 / 0.75, 1.08, (1.06, 1.0, 0.92)),
    "aged": (1.0, 0.85, (1.06, 1.0, 0.92)),
}
HELD_OUT_DEMO = 40  # held-out variant frames of the demo (its test split has 8 normal images)


def lighting_change(rgb: np.ndarray, lamp: str = "issue") -> np.ndarray:
    """``rgb`` (uint8, ..., 3) under the changed ``lamp``: gamma, then gain and white balance, clipped, rounded."""
    gamma, gain, white = LAMPS[lamp]
    x = (rgb.astype(np.float32) / 255.0) ** gamma * gain * np.asarray(white, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def images(paths: list[Path]) -> list[np.ndarray]:
    from protoad_edge.preprocess import load_rgb

    return [np.asarray(load_rgb(p)) for p in paths]


def generated(split: str, start: int, count: int) -> list[np.ndarray]:
    """Demo frames that are in no split of the demo category (indices past it)."""
    from protoad_edge.builder.demo import demo_image

    return [demo_image(split, start + i)[1] for i in range(count)]


def scenario(model: Path, category: str, data_root: Path, largest: int, lamp: str) -> dict[str, object]:
    """The frames of the benchmark: to teach, held out (normal, new lamp), and the test split both ways."""
    from protoad_edge.builder.datasets import open_dataset
    from protoad_edge.bundle import Bundle
    from protoad_edge.evaluation.int8_export import calibration_samples

    info = Bundle.of(model).info()
    data = open_dataset(category, data_root, "mvtec")
    held, _ = calibration_samples(data.train, int(info.build.get("images", {}).get("held_out", 0)), info.seed, 0)
    teach = images([s.path for s in held])
    normal = images([s.path for s in data.test if s.label == 0])
    if category == "demo":
        teach += generated("train/good", 1000, max(0, largest - len(teach)))
        normal += generated("test/good", 1000, max(0, HELD_OUT_DEMO - len(normal)))
    if len(teach) < largest:
        raise SystemExit(f"{category}: {len(teach)} held-out training images, fewer than the {largest} to teach")
    return {
        "teach_original": teach[:largest],
        "held_original": normal,
        "teach": [lighting_change(f, lamp) for f in teach[:largest]],
        "held": [lighting_change(f, lamp) for f in normal],
        "lamp": lamp,
        "test": data.test,
        "info": info,
    }


def metrics(model: Path, frames: dict[str, object], threads: int) -> dict[str, float]:
    """False alarms on the held-out variant frames; image and pixel AUROC on the test split, as it is and under the
    new lamp; through the bundle's own graph."""
    from protoad_edge.builder.datasets import load_masks
    from protoad_edge.decision import image_scores, is_anomalous
    from protoad_edge.evaluation.evaluate import LabelledSplit, compute_metrics
    from protoad_edge.runtime.backends.base import BackendOptions, run_maps
    from protoad_edge.runtime.backends.ort import OrtBackend

    backend = OrtBackend(model, BackendOptions(device="cpu", threads=threads))
    info = backend.info
    pre = info.preprocess
    held = np.stack([pre(f) for f in frames["held"]])
    alarms = is_anomalous(image_scores(run_maps(backend, held, 8)), info.image_threshold)
    samples = frames["test"]
    labels = np.array([s.label == 1 for s in samples])
    masks = load_masks(samples, pre)
    out = {"k": info.num_prototypes, "false_alarms": int(alarms.sum()), "held_out": len(held)}
    for name, change in (("original", lambda f: f), ("variant", lambda f: lighting_change(f, frames["lamp"]))):
        crops = np.stack([pre(change(f)) for f in images([s.path for s in samples])])
        split = LabelledSplit(
            info.category, "mvtec", Path("."), samples, crops, masks, labels, np.ones(len(labels), bool)
        )
        found = compute_metrics(split, run_maps(backend, crops, 8))
        out[f"{name}_image_auroc"], out[f"{name}_pixel_auroc"] = found.image_auroc, found.pixel_auroc
    return out


def spread(model: Path, frames: dict[str, object], count: int, threads: int) -> dict[str, int]:
    """How far apart frames of one look lie, against the thresholds: false alarms on the held-out frames with every
    patch of ``count`` frames of the same look added as a prototype - the most any choice of prototypes from those
    frames could reach (a patch is covered at most as well as by its nearest taught patch) - under the new lamp,
    and under the old one with those frames' patches alone (no built prototype)."""
    from protoad_edge.bundle import Bundle
    from protoad_edge.teach.graph import BundleGraph
    from protoad_edge.teach.search import Cells, centres

    bundle = Bundle.of(model)
    info = bundle.info()
    graph = BundleGraph(bundle, info, threads)
    pre = info.preprocess
    out = {}
    for look, keep_built in (("", True), ("_original", False)):
        taught = graph.see(np.stack([pre(f) for f in frames[f"teach{look}"][:count]]))
        rows = taught.compared.reshape(-1, taught.compared.shape[-1])
        cells = Cells(rows, centres(rows, seed=info.seed))
        held = graph.see(np.stack([pre(f) for f in frames[f"held{look}"]]))
        z = held.compared.reshape(-1, rows.shape[1])
        best, _ = cells.best(z, z @ cells.centres.T)
        scores = (1.0 - best).reshape(held.patch_scores.shape)
        if keep_built:
            scores = np.minimum(scores, held.patch_scores)
        out[f"spread{look}"] = int((graph.judge(scores)[1] > info.image_threshold).sum())
    return out


def teach_copy(model: Path, frames: list[np.ndarray], work: Path, threads: int) -> tuple[Path, float, dict]:
    """Copy the bundle, teach it ``frames`` with the CLI, and time the command from start to exit."""
    bundle_dir = work / "bundle"
    shutil.copytree(model.parent, bundle_dir, ignore=shutil.ignore_patterns("*.versions"))
    folder = work / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    copy = bundle_dir / model.name
    report = work / "teach.json"
    command = [
        sys.executable,
        "-c",
        "from protoad_edge.cli.teach import main; main()",
        "--model",
        str(copy),
        str(folder),
        "--threads",
        str(threads),
        "--json",
        str(report),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"protoad-teach failed: {done.stdout}{done.stderr}")
    return copy, seconds, json.loads(report.read_text())


def spread_text(count: int, found: dict[str, int], held: int) -> str:
    return (
        f"Every patch of the {count} taught frames a prototype (the most any choice from them can reach): "
        f"{found['spread']}/{held} held-out frames of the new look flagged; the old look's {count} frames' patches "
        f"alone, no built prototype: {found['spread_original']}/{held} of its held-out frames flagged."
    )


def table(category: str, rows: list[dict]) -> str:
    head = (
        "| frames taught | K | false alarms on held-out variant frames | original image / pixel AUROC | "
        "variant image / pixel AUROC | seconds to teach | of which features |"
    )
    lines = [head, "| ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        seconds = "-" if r["taught"] == 0 else f"{r['seconds']:.1f}"
        features = "-" if r["taught"] == 0 else f"{r['phases'].get('features', 0):.1f}"
        lines.append(
            f"| {r['taught']} | {r['k']:,} | {r['false_alarms']}/{r['held_out']} "
            f"({100 * r['false_alarms'] / r['held_out']:.0f} %) | {100 * r['original_image_auroc']:.1f} / "
            f"{100 * r['original_pixel_auroc']:.1f} | {100 * r['variant_image_auroc']:.1f} / "
            f"{100 * r['variant_pixel_auroc']:.1f} | {seconds} | {features} |"
        )
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The rows: the bundle as built, then a fresh copy taught each count of frames; and the looks' spread."""
    counts = [int(c) for c in args.counts.split(",")]
    frames = scenario(args.model, args.category, args.data_root, max(counts), args.lamp)
    rows = [{"taught": 0, **metrics(args.model, frames, args.threads)}]
    ceiling = spread_text(counts[0], spread(args.model, frames, counts[0], args.threads), len(frames["held"]))
    print(ceiling, flush=True)
    print(table(args.category, rows), flush=True)
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="bench_teach.") as tmp:
            copy, seconds, report = teach_copy(args.model, frames["teach"][:count], Path(tmp), args.threads)
            rows.append(
                {
                    "taught": count,
                    "seconds": seconds,
                    "phases": report["seconds"],
                    **metrics(copy, frames, args.threads),
                }
            )
        print(table(args.category, rows[-1:]).splitlines()[-1], flush=True)
    return rows, ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="NAME.onnx of a built bundle (left unchanged)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--counts", default="5,10,20", help="frames to teach, one fresh copy each")
    parser.add_argument("--lamp", choices=sorted(LAMPS), default="issue", help="the changed lamp (LAMPS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--results", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows, ceiling = measure(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.results:
        from bench_common import command_line, machine_text, update_results

        load = os.getloadavg()
        body = (
            f"### {args.category}, lamp {args.lamp!r}\n\n`{command_line(sys.argv)}` on {machine_text()}; load "
            f"average at the end {load[0]:.1f} (about 2 is the benchmark's own two threads; above it, other jobs "
            "shared the cores: the seconds are then upper bounds).\n\n"
            f"{table(args.category, rows)}\n\n{ceiling}\n"
        )
        update_results(f"bench_teach_{args.category}_{args.lamp}", body)


if __name__ == "__main__":
    main()
