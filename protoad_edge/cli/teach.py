"""``protoad-teach``: teach a deployed bundle what is normal from the line's own frames, on the line box, without
PyTorch; or list its versions, or roll one back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..atomic import write_text_atomic
from ..constants import DATASET_KINDS
from ..errors import ProtoADError
from ..evaluation.accuracy_gate import ACCEPT_FLAG
from .common import cpu_threads, threads_option, user_errors

if TYPE_CHECKING:
    from ..bundle import Bundle


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("sources", metavar="SOURCE...", nargs=-1)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Any file of the bundle (NAME.onnx, .json, .plan). Default: the single bundle in ./models.",
)
@click.option(
    "--max-frames",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Frames read from each SOURCE (needed for a camera or stream).",
)
@click.option(
    "--held-out",
    "held_out",
    multiple=True,
    metavar="SOURCE",
    help="Normal frames of the new look NOT taught (repeatable): their false alarms before and after, and "
    "the build's threshold rule computed on them before and after (shown, not applied).",
)
@click.option(
    "--check-category",
    default=None,
    metavar="CATEGORY",
    help="Check the teach on the build's labelled test split of CATEGORY (--data-root, --dataset).",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset root for --check-category. Default: $PROTOAD_DATA, then ./data.",
)
@click.option("--dataset", type=click.Choice(DATASET_KINDS), default="mvtec", show_default=True)
@click.option(
    "--check-normal",
    multiple=True,
    metavar="SOURCE",
    help="With --check-defect: check the teach on frames an operator sorted (repeatable).",
)
@click.option("--check-defect", multiple=True, metavar="SOURCE", help="Defect frames for the check (repeatable).")
@click.option(
    ACCEPT_FLAG,
    "accept",
    is_flag=True,
    help="Teach even when the check finds the teach costs more accuracy than the gate allows.",
)
@click.option(
    "--rollback",
    is_flag=True,
    help="Instead of teaching: put back the version the one in force was made from (or --to N), bit for bit.",
)
@click.option("--to", "to", type=int, default=None, metavar="N", help="With --rollback: the version to restore.")
@click.option("--list", "list_", is_flag=True, help="Instead of teaching: list the versions kept on disk.")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Replaced versions kept on disk, newest first (default 5).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the teach report (per frame, check, held-out figures) to this JSON file.",
)
@threads_option("onnxruntime")
@user_errors
def main(
    sources: tuple[str, ...],
    model: Path | None,
    max_frames: int | None,
    held_out: tuple[str, ...],
    check_category: str | None,
    data_root: Path | None,
    dataset: str,
    check_normal: tuple[str, ...],
    check_defect: tuple[str, ...],
    accept: bool,
    rollback: bool,
    to: int | None,
    list_: bool,
    keep: int | None,
    json_path: Path | None,
    threads: int,
) -> None:
    """Teach the bundle the frames of SOURCE... (images, folders, videos, streams: as protoad-run takes them, cut by
    the bundle's region of interest), which an operator judged normal: their patches that no prototype covers
    become new prototypes of every graph of the bundle, written as a new version (the one before is kept;
    --rollback restores it). A running protoad-run switches to the new version between two frames.

    A patch is taught when its best cosine to a prototype is below 1 - the pixel threshold (capped at the image
    threshold); afterwards every taught frame scores at most the pixel threshold. Thresholds are kept: scores can
    only fall. Every frame's score before and after, and where its new prototypes came from, are printed, so a
    defect taught by mistake shows; --check-category or --check-normal/--check-defect refuses a teach that costs
    more accuracy than the accuracy gate allows.
    """
    from .. import versions
    from ..bundle import locate

    started = time.perf_counter()
    bundle, _ = locate(model)
    if rollback or list_:
        if sources or held_out or check_category or check_normal or check_defect:
            raise ProtoADError(f"--{'rollback' if rollback else 'list'} takes no SOURCE, --held-out or --check-*")
        if list_:
            _list(bundle)
        else:
            done = versions.rollback(bundle, to)
            click.echo(
                f"{bundle.stem}: version {done.old} -> {done.new} ({', '.join(done.files)} restored); version "
                f"{done.old} kept in {versions.folder(bundle) / f'v{done.old}'}"
            )
        return
    if to is not None:
        raise ProtoADError("--to names the version --rollback restores: add --rollback")
    if not sources:
        raise ProtoADError("give the frames to teach (SOURCE...), or --rollback, or --list")
    if check_category and (check_normal or check_defect):
        raise ProtoADError(
            "check on the build's test split (--check-category) or on sorted frames "
            "(--check-normal/--check-defect), not both"
        )
    _teach(
        bundle,
        list(sources),
        max_frames,
        list(held_out),
        check_category,
        data_root,
        dataset,
        list(check_normal),
        list(check_defect),
        accept,
        keep or versions.KEEP,
        json_path,
        cpu_threads(threads),
        started,
    )


def _teach(
    bundle: Bundle,
    sources: list[str],
    max_frames: int | None,
    held_out: list[str],
    check_category: str | None,
    data_root: Path | None,
    dataset: str,
    check_normal: list[str],
    check_defect: list[str],
    accept: bool,
    keep: int,
    json_path: Path | None,
    threads: int,
    started: float,
) -> None:
    """Teach and print the report (``main``'s options, checked)."""
    from .. import versions
    from ..runtime.sources.frames import read_frames
    from ..runtime.sources.source import parse_source
    from ..teach.check import Check
    from ..teach.graph import BundleGraph
    from ..teach.teach import teach

    for source in [*sources, *held_out, *check_normal, *check_defect]:
        parse_source(source)  # a mistyped source fails before the bundle is read
    info = bundle.info()
    pre = info.preprocess
    frames = read_frames(sources, pre, max_frames)
    read = time.perf_counter() - started
    graph = BundleGraph(bundle, info, threads)
    opened = time.perf_counter() - started - read
    check = None
    if check_category:
        from ..evaluation.evaluate import load_test_set

        split = load_test_set(check_category, data_root, dataset, pre)
        check = Check(split, f"the {split.kind} test split of {check_category!r} ({len(split.labels)} images)")
    elif check_normal or check_defect:
        from ..evaluation.line_split import load_line_split

        split = load_line_split(check_normal, check_defect, pre, "--check-normal/--check-defect")
        check = Check(split, f"{len(split.labels)} sorted frames")
    held = read_frames(held_out, pre, max_frames, what="--held-out") if held_out else None
    click.echo(
        f"model {bundle.onnx} ({info.category}, version {info.version}, {info.num_prototypes:,} prototypes); "
        f"image threshold {info.image_threshold:.6g}, pixel {_thr(info.pixel_threshold)}"
    )
    result = teach(
        bundle,
        frames,
        graph=graph,
        check=check,
        held_out=held,
        accept=accept,
        keep=keep,
        threads=threads,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(
        f"a patch is taught when no prototype reaches cosine {1 - result.pixel_threshold:.6g} "
        f"(1 - the pixel threshold {result.pixel_threshold:.6g} in force)"
    )
    rows = [["frame", "score before", "after", "taught patches", "share", "largest group (x,y,w,h)"]]
    for r in result.frames:
        rows.append(
            [
                r.label,
                f"{r.score_before:.6g}",
                f"{r.score_after:.6g}",
                f"{r.patches:,}",
                f"{100 * r.share:.1f}%",
                ",".join(map(str, r.bbox)) if r.bbox else "-",
            ]
        )
    click.echo(_columns(rows))
    if result.held_out is not None:
        h = result.held_out
        click.echo(
            f"held-out normal frames: false alarms {h.false_alarms_before}/{h.frames} -> "
            f"{h.false_alarms_after}/{h.frames} at the image threshold {info.image_threshold:.6g}; the build's "
            f"rule on them: image {h.rule_before.image:.6g} -> {h.rule_after.image:.6g}, pixel "
            f"{h.rule_before.pixel:.6g} -> {h.rule_after.pixel:.6g} (not applied: protoad-eval "
            "--set-threshold puts a threshold in force)"
        )
    if result.check is not None:
        click.echo(result.check.line() + ("" if result.check.verdict.passed else f" - taught anyway ({ACCEPT_FLAG})"))
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.version_after is not None:
        click.echo(
            f"prototypes: {result.patches:,} patches of {len(result.frames)} frames -> {result.added:,} new; "
            f"K {result.k_before:,} -> {result.k_after:,}"
        )
        click.echo(
            f"wrote version {result.version_after} of {bundle.stem} "
            f"({', '.join(bundle.file(k).name for k in result.written if k != 'plan')}, {bundle.sidecar.name}); "
            f"version {result.version_before} kept in "
            f"{versions.folder(bundle) / f'v{result.version_before}'} (--rollback restores it)"
        )
    steps = {"read": read, **result.seconds, "open": opened + result.seconds.get("open", 0.0)}
    seconds = {**{k: round(v, 2) for k, v in steps.items()}, "total": round(time.perf_counter() - started, 2)}
    click.echo("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    if json_path is not None:
        report = {
            "bundle": str(bundle.stem),
            "version_before": result.version_before,
            "version_after": result.version_after,
            "k_before": result.k_before,
            "k_after": result.k_after,
            "patches": result.patches,
            "image_threshold": result.image_threshold,
            "pixel_threshold": result.pixel_threshold,
            "frames": [r.to_dict() for r in result.frames],
            "check": result.check.to_dict() if result.check else None,
            "held_out": result.held_out.to_dict() if result.held_out else None,
            "notes": result.notes,
            "seconds": seconds,
        }
        write_text_atomic(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        click.echo(f"wrote {json_path}")


def _list(bundle: Bundle) -> None:
    from .. import versions

    for number, current, change in versions.history(bundle):
        what = (
            "as built"
            if change is None
            else (
                f"{change.get('what')} from version {change.get('from')} on {change.get('when')}"
                + (
                    f": {change['frames']} frames, K {change['k_before']:,} -> {change['k_after']:,}"
                    if change.get("what") == "teach"
                    else ""
                )
            )
        )
        click.echo(f"{'*' if current else ' '} version {number}: {what}")


def _thr(value: float) -> str:
    return "none" if not math.isfinite(value) else f"{value:.6g}"


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )
