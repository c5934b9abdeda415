"""``protoad-export``: build prototypes from normal images and export the whole network to ONNX."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import click

from ..builder.config import PROJECTIONS, BuildConfig
from ..builder.memory import parse_size
from ..builder.thresholds import few_held_out_warning
from ..bundle import Bundle
from ..constants import DATASET_KINDS, DEVICES, ENGINE_PRECISIONS, FEATURE_CHANNELS, TENSORRT_CHOICES, UPSAMPLE_MODES
from ..errors import ProtoADError
from ..export.triton_repo import ACCELERATORS, write_repository
from ..preprocess import FIT_HELP, FITS, parse_roi
from ..runtime.serving.triton import DEFAULT_MAX_BATCH
from .common import threads_option, user_errors

D = BuildConfig(category="")  # the defaults, written once in BuildConfig
# The top-level modules of the [build] extra: without one of them only --from-onnx can run.
BUILD_EXTRA = ("torch", "torchvision", "onnx", "onnxscript", "scipy", "sklearn")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--category", default=None, help="Category to build (e.g. bottle, cable, or the built-in demo).")
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=D.data_root,
    help="Dataset root. Default: $PROTOAD_DATA, then ./data.",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASET_KINDS),
    default=D.dataset,
    show_default=True,
    help="Layout of the data root (see README: MVTec AD, BTAD, or a folder of your own images).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=D.out,
    show_default=True,
    help="Folder the bundle is written to: OUT/CATEGORY.onnx, .json, .prototypes.npy (and .plan).",
)
@click.option(
    "--weights",
    default=D.weights,
    show_default=True,
    help="imagenet (torchvision download), none (seeded random, offline) or PATH to a state_dict.",
)
@click.option(
    "--feature-upsample",
    type=click.Choice(UPSAMPLE_MODES),
    default=D.feature_upsample,
    show_default=True,
    help="bilinear = paper text; nearest = the authors' released code.",
)
@click.option(
    "--max-prototypes",
    type=click.IntRange(min=2),
    default=D.max_prototypes,
    show_default=True,
    help="Take the first FINCH partition with fewer clusters than this.",
)
@click.option(
    "--val-split",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=D.val_split,
    show_default=True,
    help="Share of normal training images held out to set thresholds.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=D.device,
    show_default=True,
    help="Where features are extracted and FINCH searches (auto: CUDA where available).",
)
@click.option(
    "--seed", type=int, default=D.seed, show_default=True, help="Seed of the held-out split and of --weights none."
)
@click.option(
    "--resize",
    type=click.IntRange(min=32),
    default=D.resize,
    show_default=True,
    help="Shorter image side before the centre crop (pixels).",
)
@click.option(
    "--crop",
    type=click.IntRange(min=32),
    default=D.crop,
    show_default=True,
    help="Side of the centre crop the network judges (pixels).",
)
@click.option(
    "--roi",
    default=None,
    metavar="X,Y,W,H",
    help="Region of interest in pixels of the source images (every training, held-out and test image; "
    "stored in the bundle, so protoad-run and protoad-eval judge the same region). Default: the "
    "whole image. Choose it with protoad-run SOURCE --preview FILE.png --roi X,Y,W,H.",
)
@click.option("--fit", type=click.Choice(FITS), default=D.fit, show_default=True, help=FIT_HELP.capitalize() + ".")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=D.batch_size,
    show_default=True,
    help="Images per network call while extracting features, setting thresholds and checking the graph "
    "(memory, not the model).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=D.cache_dir,
    help="Where extracted training features are kept for rebuilds (e.g. another --max-prototypes). "
    "Default: $PROTOAD_CACHE, then ~/.cache/protoad-edge/features.",
)
@click.option("--no-cache", is_flag=True, help="Neither reuse nor keep extracted features.")
@click.option(
    "--exact-neighbours",
    is_flag=True,
    help="FINCH first neighbours exact at every size on the CPU (default: approximate above 20,000 "
    "vectors) and in FP32 throughout on a GPU (default: FP16 products, checked in FP32).",
)
@click.option(
    "--memory-limit",
    default=None,
    metavar="SIZE",
    help="Anonymous memory the build may use, e.g. 8G or 6000M: FINCH's large arrays (cluster sums, the "
    "search's projections and candidate lists) spill to files beside the feature cache beyond it. "
    "Default: a third of the available memory.",
)
@threads_option("torch")
@click.option(
    "--tensorrt",
    type=click.Choice(TENSORRT_CHOICES),
    default=D.tensorrt,
    show_default=True,
    help="Also build the TensorRT plan OUT/CATEGORY.plan on this GPU (auto: where TensorRT and a GPU exist).",
)
@click.option(
    "--precision",
    type=click.Choice(ENGINE_PRECISIONS),
    default=D.precision,
    show_default=True,
    help="TensorRT engine precision; the L2 normalisation always runs in FP32. int8: from NAME.int8.onnx "
    "(written by --int8), its quantized convs in INT8 and the rest in FP32.",
)
@click.option(
    "--opt-batch",
    type=click.IntRange(min=1),
    default=D.opt_batch,
    show_default=True,
    help="Batch TensorRT optimises for.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=D.max_batch,
    help="Largest engine batch (default: most that keeps tensors under 2^31 elements, at most 32).",
)
@click.option(
    "--project-dims",
    type=click.IntRange(min=1),
    default=D.project_dims,
    metavar="D",
    help="Compare patches and prototypes in the top D principal directions of the training patch vectors "
    f"instead of all {FEATURE_CHANNELS} channels (fewer FLOPs; below {FEATURE_CHANNELS} and at most K). "
    "Default: the paper's network. With a labelled test split the summary shows both side by side.",
)
@click.option(
    "--projection",
    type=click.Choice(PROJECTIONS),
    default=None,
    help=f"With --project-dims: subtract the patch vectors' mean before projecting, or not. Default: {D.projection}.",
)
@click.option(
    "--from-onnx",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Only build the TensorRT plan for this existing NAME.onnx (no torch needed: the Jetson step); "
    "with --int8, only its NAME.int8.onnx.",
)
@click.option(
    "--reseal",
    is_flag=True,
    help="With --from-onnx: only record in NAME.json the sha256 of every file of that bundle as it is now. "
    "Every command refuses a file whose digest differs from the sidecar's; after changing one on "
    "purpose, re-seal the bundle.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write OUT/CATEGORY.int8.onnx: backbone convs in INT8 (Q/DQ), calibrated on the held-out normal "
    "images, the convs that cost accuracy kept FP32; written only when the accuracy gate passes on the "
    "labelled test split (image/pixel AUROC within 0.5 pt of FP32, Spearman >= 0.99). With --from-onnx "
    "give --category and the data (--data-root, --dataset) the bundle was built from.",
)
@click.option(
    "--accept-accuracy-loss", is_flag=True, help="With --int8: write it even when it fails the accuracy gate."
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Also write a Triton Inference Server model repository: DIR/NAME (onnxruntime_onnx) and, where the "
    "plan exists, DIR/NAME_trt (tensorrt_plan), with the thresholds in their config.pbtxt. With "
    "--from-onnx, for that existing bundle (no torch needed).",
)
@click.option(
    "--triton-max-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BATCH,
    show_default=True,
    help="With --triton-repo: the ONNX model's max_batch_size (dynamic batching gathers up to this many).",
)
@click.option(
    "--triton-accelerate",
    type=click.Choice(ACCELERATORS),
    default="none",
    show_default=True,
    help="With --triton-repo: run the ONNX model through onnxruntime's TensorRT provider (FP16) on the server.",
)
@user_errors
def main(
    category: str | None,
    data_root: Path | None,
    dataset: str,
    out: Path,
    weights: str,
    feature_upsample: str,
    max_prototypes: int,
    val_split: float,
    device: str,
    seed: int,
    resize: int,
    crop: int,
    roi: str | None,
    fit: str,
    batch_size: int,
    cache_dir: Path | None,
    no_cache: bool,
    exact_neighbours: bool,
    memory_limit: str | None,
    threads: int,
    tensorrt: str,
    precision: str,
    opt_batch: int,
    max_batch: int | None,
    from_onnx: Path | None,
    project_dims: int | None,
    projection: str | None,
    reseal: bool,
    int8: bool,
    accept_accuracy_loss: bool,
    triton_repo: Path | None,
    triton_max_batch: int,
    triton_accelerate: str,
) -> None:
    """Learn prototypes from normal images and write OUT/CATEGORY.onnx, .json and .prototypes.npy
    (and OUT/CATEGORY.plan where TensorRT and a GPU exist)."""
    from ..export.engine import engine_for_bundle, engine_from_onnx, engine_summary

    if reseal:
        if from_onnx is None or not from_onnx.is_file():
            raise ProtoADError(
                "--reseal records the files of an existing bundle: give --from-onnx NAME.onnx"
                + (f" ({from_onnx}: no such file)" if from_onnx else "")
            )
        for line in Bundle.of(from_onnx).reseal():
            click.echo(f"  sealed        {line}")
        return
    if from_onnx is not None and int8:
        if category is None:
            raise ProtoADError(
                "--from-onnx with --int8 needs --category (and --data-root): the held-out images to "
                "calibrate on and the labelled test split the accuracy gate measures"
            )
        line = int8_summary(from_onnx, category, data_root, dataset, accept_accuracy_loss, batch_size, threads)
        click.echo(f"  int8          {line}")
        return
    triton = functools.partial(
        triton_summary, repo=triton_repo, max_batch=triton_max_batch, accelerate=triton_accelerate
    )
    if from_onnx is not None:
        # Alone, --from-onnx makes only the engine (auto means yes); with --triton-repo the engine is built where it
        # can be.
        if triton_repo is not None and not from_onnx.is_file():
            raise ProtoADError(f"--from-onnx {from_onnx}: no such file")
        engine_step = engine_from_onnx if triton_repo is None else engine_for_bundle
        built = engine_step(
            from_onnx, tensorrt, precision=precision, opt_batch=opt_batch, max_batch=max_batch, log=click.echo
        )
        if built:
            click.echo(f"  engine        {engine_summary(built)}")
        triton(from_onnx)
        return
    if category is None:
        raise ProtoADError("missing option --category (or --from-onnx PATH to only build a TensorRT engine)")
    if projection is not None and project_dims is None:
        raise ProtoADError(f"--projection {projection} needs --project-dims D")
    limit = parse_size(memory_limit) if memory_limit is not None else None
    with build_extra_needed():
        from ..builder.pipeline import build
        from ..export.onnx import PARITY_TOLERANCE

        report = build(
            BuildConfig(
                category=category,
                data_root=data_root,
                dataset=dataset,
                out=out,
                weights=weights,
                feature_upsample=feature_upsample,
                max_prototypes=max_prototypes,
                val_split=val_split,
                device=device,
                seed=seed,
                resize=resize,
                crop=crop,
                roi=parse_roi(roi) if roi else None,
                fit=fit,
                batch_size=batch_size,
                threads=threads,
                cache_dir=cache_dir,
                cache=not no_cache,
                exact_neighbours=exact_neighbours,
                memory_limit=limit,
                tensorrt=tensorrt,
                precision=precision,
                opt_batch=opt_batch,
                max_batch=max_batch,
                project_dims=project_dims,
                projection=projection or D.projection,
            ),
            log=click.echo,
        )
    info = report.info
    click.echo("\nsummary")
    n = report.images
    click.echo(f"  images        train {n['train']:,}, held out {n['held_out']:,}, test {n['test']:,}")
    click.echo(
        f"  patch vectors {report.vectors:,} x {FEATURE_CHANNELS}"
        + (" (from the feature cache)" if report.features_cached else "")
    )
    click.echo(
        f"  FINCH levels  {' -> '.join(f'{c:,}' for c in report.finch_counts)} clusters  "
        f"(K = {info.num_prototypes:,} prototypes)"
    )
    click.echo("  time          " + ", ".join(f"{k} {v:,.1f} s" for k, v in report.stage_seconds.items()))
    click.echo(f"  ONNX parity   max |onnxruntime - PyTorch| = {report.parity:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
    click.echo(f"  thresholds    image {info.image_threshold:.5f}, pixel {info.pixel_threshold:.5f}")
    if warning := few_held_out_warning(n["held_out"]):
        click.echo(f"  warning       {warning}")
    m = report.test_metrics
    if m:
        line = f"  test          image AUROC {100 * m['image_auroc']:.1f} %"
        if "pixel_auroc" in m:
            line += f", pixel AUROC {100 * m['pixel_auroc']:.1f} %"
        line += f"; F1-optimal image threshold {m['image_f1_threshold']:.5f} (F1 {m['image_f1']:.3f})"
        click.echo(line)
    if info.projection:
        p = info.projection
        kind = "centred" if p["centred"] else "uncentred"
        click.echo(
            f"  projection    {p['dims']} of {FEATURE_CHANNELS} dims, {kind}, fitted on {p['rows']:,} training "
            f"{p['fitted_on']} ({100 * p['variance_kept']:.1f}% of their variance)"
        )
    if report.comparison:
        click.echo(
            f"  side by side  {'network':<26}{'image AUROC':>12}{'pixel AUROC':>13}{'PRO':>7}{'ms/image':>10}"
            f"{'GFLOP/image':>13}"
        )
        for f in report.comparison:
            click.echo(
                f"                {f.network:<26}{percent(f.image_auroc):>12}{percent(f.pixel_auroc):>13}"
                f"{percent(f.pro):>7}{f.ms_per_image:>10.0f}{f.gflop_per_image:>13.2f}"
            )
    click.echo("  files         " + ", ".join(str(f) for f in report.files))
    if report.engine:
        click.echo(f"  engine        {engine_summary(report.engine)}")
    onnx_path = next(f for f in report.files if f.name == f"{category}.onnx")
    if int8:
        line = int8_summary(onnx_path, category, data_root, dataset, accept_accuracy_loss, batch_size, threads)
        click.echo(f"  int8          {line}")
    triton(onnx_path)


def triton_summary(onnx_path: Path, repo: Path | None, max_batch: int, accelerate: str) -> None:
    """Write the Triton repository for the bundle of ``onnx_path`` when --triton-repo asks for one."""
    if repo is None:
        return
    written = write_repository(onnx_path, repo, max_batch=max_batch, accelerate=accelerate, log=click.echo)
    click.echo("  triton        " + ", ".join(f"{m.name} ({m.platform})" for m in written) + f" in {repo}")


def int8_summary(
    onnx_path: Path, category: str, data_root: Path | None, dataset: str, accept: bool, batch_size: int, threads: int
) -> str:
    """Run the INT8 export (``evaluation.int8_export.export_int8``) and say in one line what it wrote and lost."""
    with build_extra_needed():
        from ..evaluation.int8_export import export_int8

        done = export_int8(
            onnx_path,
            category,
            data_root,
            dataset,
            accept=accept,
            batch_size=batch_size,
            threads=threads,
            progress=True,
            log=click.echo,
        )
    verdict = "passed" if done.verdict.passed else "FAILED, written because of --accept-accuracy-loss"
    return (
        f"{done.path} ({len(done.draft.quantized)} of {len(done.draft.quantized) + len(done.draft.kept_fp32)} "
        f"backbone convs INT8; accuracy gate {verdict}: {done.verdict.figures.line()})"
    )


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


@contextlib.contextmanager
def build_extra_needed() -> Iterator[None]:
    """A runtime-only install (no torch) gets one line saying what to install, not an import traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in BUILD_EXTRA:
            raise
        raise ProtoADError(
            f"building a model needs {missing}, which is not installed: pip install "
            "'protoad-edge[build]' (only --from-onnx NAME.onnx, the TensorRT step, runs without torch)"
        ) from None
