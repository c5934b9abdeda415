"""``protoad-eval``: image AUROC, pixel AUROC and PRO of a model bundle on a labelled test split,
beside the paper's figures, and what each image threshold rule would flag there (``--set-threshold``
puts one in force); or the same images through several backends, compared."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from ..atomic import write_text_atomic
from ..constants import DATASET_KINDS, DEVICES
from ..errors import ProtoADError
from ..evaluation.accuracy_gate import ACCEPT_FLAG, MAX_AUROC_DROP_PT, MIN_SPEARMAN, Verdict, enforce
from ..evaluation.paper import METRIC_LABELS, METRICS, comparison_rows, paper_dataset, paper_source
from ..metadata import ON_LINE_FRAMES, ON_TEST_SPLIT
from ..runtime.backends.base import BackendOptions
from ..runtime.backends.registry import AUTO, HELP, NAMES, REGISTRY, SPECS, parse_spec
from .common import cpu_threads, threads_option, user_errors

if TYPE_CHECKING:
    from ..evaluation.evaluate import CategoryResult
    from ..evaluation.threshold_rules import Rule

ALL = "all"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    required=True,
    type=click.Path(path_type=Path),
    help="A bundle file (NAME.onnx, .json or .plan; the others are found beside it) "
    "or a folder of bundles CATEGORY.* (required for --category all).",
)
@click.option(
    "--category",
    default=None,
    help="Category to evaluate, or 'all' for every category under the data root (or --normal/--defect).",
)
@click.option(
    "--normal",
    multiple=True,
    metavar="SOURCE",
    help="Instead of --category: normal frames sorted on the line (a folder, video, image; repeatable), "
    "with --defect. Shows the threshold trade (caught, misses, false alarms) on the line's own frames, "
    "and --set-threshold chooses on them (image level: the frames have no masks).",
)
@click.option("--defect", multiple=True, metavar="SOURCE", help="Defect frames sorted on the line (repeatable).")
@click.option(
    "--any-category",
    is_flag=True,
    help="Evaluate a bundle built for another category than --category (refused otherwise: its scores "
    "there say nothing about either category).",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset root. Default: $PROTOAD_DATA, then ./data.",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASET_KINDS),
    default="mvtec",
    show_default=True,
    help="Layout of the data root (see README: MVTec AD, BTAD, or a folder of your own images).",
)
@click.option("--backend", type=click.Choice(SPECS), default=AUTO, show_default=True, help=HELP)
@click.option(
    "--compare",
    "compare",
    default=None,
    metavar="B1,B2[,B3]",
    help=f"Run the same images through these backends ({', '.join(NAMES)}) and compare them with the first. "
    "NAME@FILE runs another bundle's FILE (e.g. the projected network beside --model's: "
    "ort,ort@models/p256/bottle.onnx). "
    "NAME:PRECISION runs a backend in a reduced precision ("
    + "; ".join(f"{e.name}: {', '.join(e.precisions)}" for e in REGISTRY.values() if e.precisions)
    + f", e.g. ort,openvino:bf16), judged by the accuracy gate against the first: image and pixel "
    f"AUROC within {MAX_AUROC_DROP_PT} pt, Spearman of the image scores >= {MIN_SPEARMAN}; a failure "
    "is an error after the table.",
)
@click.option(
    ACCEPT_FLAG,
    "accept_accuracy_loss",
    is_flag=True,
    help="With --compare: report a reduced precision that fails the accuracy gate without failing.",
)
@click.option(
    "--set-threshold",
    "set_threshold",
    default=None,
    metavar="RULE",
    help="Choose the image threshold by RULE on this labelled test split and write it into the bundle's "
    "sidecar NAME.json (atomically; written from the ONNX metadata if missing), the previous values "
    "kept in its threshold_history. RULE: f1 (F1-optimal), normal-max (flags no normal test image), "
    "fpr=X (the lowest threshold flagging at most a share X of the normal images, 0 <= X < 1), or "
    "a number. The threshold lies halfway between neighbouring scores, so the verdicts (score > "
    "threshold) are those printed. The pixel threshold is kept; the runtime caps it at the image "
    "threshold in force. One category, without --compare.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write every metric and per-category result to this JSON file.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for the pictures (not a model): CATEGORY.cases.png (worst and best cases), .roc.png, .pro.png.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Images per backend call (memory and speed, not the metrics).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="cpu: onnxruntime's CPU provider only, or torch on the CPU; cuda: a GPU; auto: the best available.",
)
@threads_option("onnxruntime (intra-op) or torch")
@click.option(
    "--fp32",
    is_flag=True,
    help="torch backend: stay in FP32 on a GPU (default there: FP16); ort's TensorRT provider: FP32 instead of FP16.",
)
@user_errors
def main(
    model: Path,
    category: str | None,
    normal: tuple[str, ...],
    defect: tuple[str, ...],
    any_category: bool,
    data_root: Path | None,
    dataset: str,
    backend: str,
    compare: str | None,
    accept_accuracy_loss: bool,
    set_threshold: str | None,
    json_path: Path | None,
    out: Path | None,
    batch_size: int,
    device: str,
    threads: int,
    fp32: bool,
) -> None:
    """Evaluate a ProtoAD model bundle on the test split of CATEGORY (images with normal/anomalous labels), or on
    frames an operator sorted on the line (--normal and --defect)."""
    from ..builder.datasets import list_categories, resolve_data_root, root_mistake  # heavy imports wait for --help
    from ..evaluation.threshold_rules import parse_rule

    backends = _parse_compare(compare) if compare else None
    if backends and out is not None:
        raise ProtoADError("--out draws the pictures of one backend: use it without --compare")
    rule = parse_rule(set_threshold) if set_threshold is not None else None  # a typo fails before any work
    if rule is not None and backends:
        raise ProtoADError("--set-threshold writes the threshold of the bundle evaluated: use it without --compare")
    if normal or defect:
        if category is not None or backends or out is not None:
            raise ProtoADError(
                "--normal/--defect evaluate frames sorted on the line: drop --category, --compare and --out"
            )
        _evaluate_line(
            model,
            list(normal),
            list(defect),
            backend,
            rule,
            json_path,
            batch_size,
            BackendOptions(device=device, threads=cpu_threads(threads), fp16=False if fp32 else None),
        )
        return
    if category is None:
        raise ProtoADError(
            "give --category (a labelled test split), or --normal and --defect (frames sorted on the line)"
        )
    if rule is not None and category == ALL:
        raise ProtoADError("--set-threshold writes one bundle's threshold: name one --category, not all")
    if category == ALL:
        if not model.is_dir():
            raise ProtoADError(
                f"--category all needs --model to be a folder of bundles (CATEGORY.onnx ...), got {model}"
            )
        categories = list_categories(data_root, dataset)
        if not categories:
            root = resolve_data_root(data_root)
            raise ProtoADError(root_mistake(root, dataset) or f"no {dataset} categories found in {root}")
    else:
        categories = [category]
    options = dict(
        data_root=data_root,
        dataset=dataset,
        batch_size=batch_size,
        progress=True,
        any_category=any_category,
        options=BackendOptions(device=device, threads=cpu_threads(threads), fp16=False if fp32 else None),
    )
    report: dict[str, Any] = {
        "tool": "protoad-eval",
        "version": __version__,
        "dataset": dataset,
        "data_root": str(resolve_data_root(data_root)),
        "mode": "compare" if backends else "evaluate",
    }
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    failed: list[Verdict] = []
    for name in categories:
        try:
            if backends:
                results[name] = _compare_one(model, name, backends, options, failed)
            else:
                results[name] = _evaluate_one(model, name, backend, options, out, rule, single=len(categories) == 1)
        except ProtoADError as exc:
            if len(categories) == 1:
                raise
            skipped[name] = str(exc)
            click.echo(f"skipped {name}: {exc}", err=True)
    if not results:
        raise ProtoADError(f"no category could be evaluated ({len(skipped)} skipped, reasons above)")
    report["comparisons" if backends else "categories"] = results
    if not backends:
        rows = comparison_rows(dataset, {c: {m: r[m] for m in METRICS} for c, r in results.items()})
        if len(categories) > 1:
            click.echo("\n" + format_table(rows))
        report["table"] = [row.to_dict() for row in rows]
        paper = paper_dataset(dataset)
        if paper is not None:
            report["paper"] = {
                **paper_source(),
                "dataset": paper.name,
                "tables": {m: p.table for m, p in paper.metrics.items()},
            }
    report["skipped"] = skipped
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        click.echo(f"wrote {json_path}")
    for verdict in failed:  # after the table and the report: the figures are there for the record
        enforce(verdict, "It must not run as the default", accept_accuracy_loss)


def _parse_compare(spec: str) -> list[str]:
    names = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in names if b.partition("@")[0].partition(":")[0] not in NAMES]
    if bad or len(names) < 2 or len(set(names)) != len(names):
        raise ProtoADError(
            f"bad --compare {spec!r}: give two or more different backends among {', '.join(NAMES)} "
            "(e.g. torch,ort or ort,openvino:bf16)"
        )
    for name in names:
        backend, _, other = name.partition("@")
        try:
            parse_spec(backend)
        except ProtoADError as exc:
            raise ProtoADError(f"bad --compare {spec!r}: {exc}") from None
        if "@" in name and not Path(other).is_file():
            raise ProtoADError(f"bad --compare {spec!r}: {other or '(empty)'} after @ is not a bundle file")
    return names


def _evaluate_one(
    model: Path, category: str, backend: str, options: dict[str, Any], out: Path | None, rule: Rule | None, single: bool
) -> dict[str, Any]:
    from ..evaluation.evaluate import evaluate_category

    result = evaluate_category(model, category, backend=backend, **options)
    summary = result.summary(rule)
    counts = summary["images"]
    click.echo(
        f"{category}: {counts['normal']:,} normal + {counts['anomalous']:,} anomalous test images "
        f"({counts['anomalous_with_mask']:,} with masks), crop {result.info.crop} px; "
        f"model {result.model} on {result.backend}, {result.info.num_prototypes:,} prototypes"
    )
    if result.info.category != category:
        click.echo(f"note: {result.model} was built for category {result.info.category!r}, not {category!r}", err=True)
    t = summary["thresholds"]
    if single:
        rows = [r for r in comparison_rows(options["dataset"], {category: summary}) if not r.is_mean]
        click.echo(format_table(rows))
        click.echo(format_rules(summary["threshold_rules"], t["pixel_threshold"]))
    elif t["image_threshold"] is not None:
        click.echo(
            f"  model thresholds: image {t['image_threshold']:.5f} flags {t['anomalous_caught']:,}/"
            f"{t['anomalous']:,} anomalous and {t['false_alarms']:,}/{t['normal']:,} normal images; "
            f"pixel {t['pixel_threshold']:.5f}"
        )
    s = summary["seconds"]
    speed = summary["images_per_second"]
    click.echo(
        f"  time: inference {s['infer']:,.2f} s ({'-' if speed is None else f'{speed:,.1f}'} images/s, "
        f"{options['batch_size']} images per call), metrics {s['metrics']:,.2f} s"
    )
    if rule is not None:
        _set_threshold(result, rule, result.split, summary)
    if out is not None:
        from ..evaluation.report import write_report

        for path in write_report(result, out):
            click.echo(f"  wrote {path}")
    return summary


def _set_threshold(
    result: CategoryResult, rule: Rule, split: str, summary: dict[str, Any], on: str = ON_TEST_SPLIT
) -> None:
    """Put ``rule``'s threshold on ``result``'s images in force (a new version of the bundle) and say so."""
    from ..evaluation.threshold_rules import apply_rule, write_threshold

    chosen = apply_rule(rule, result.test.labels, result.scores)  # the row printed for it
    change = write_threshold(result.model, chosen, split, on)
    source = " (new, from the ONNX metadata)" if change.created else ""
    click.echo(
        f"  set threshold {chosen.rule}: image {_thr(change.old.image_threshold)} -> "
        f"{_thr(chosen.image_threshold)}, pixel {_thr(change.new.pixel_threshold)} kept; "
        f"wrote {change.sidecar}{source} (version {change.new.version}), previous values in its "
        "threshold_history"
    )
    summary["set_threshold"] = change.to_dict()
    result.info = change.new  # the pictures show the threshold now in force


def _evaluate_line(
    model: Path,
    normal: list[str],
    defect: list[str],
    backend: str,
    rule: Rule | None,
    json_path: Path | None,
    batch_size: int,
    options: BackendOptions,
) -> None:
    """The threshold trade on frames sorted on the line; ``rule`` puts one in force."""
    from ..evaluation.line_split import describe, evaluate_line

    result = evaluate_line(model, normal, defect, backend, batch_size, options, progress=True)
    summary = result.summary(rule)
    split = describe(normal, defect, result.test)
    click.echo(
        f"{split}; model {result.model} on {result.backend}, version {result.info.version}, "
        f"{result.info.num_prototypes:,} prototypes; image AUROC {_fmt(summary['image_auroc'])} "
        "(no masks: image level only)"
    )
    click.echo(format_rules(summary["threshold_rules"], summary["thresholds"]["pixel_threshold"]))
    if rule is not None:
        _set_threshold(result, rule, split, summary, ON_LINE_FRAMES)
    if json_path is not None:
        report = {"tool": "protoad-eval", "version": __version__, "mode": "line", "frames": split, **summary}
        write_text_atomic(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        click.echo(f"wrote {json_path}")


def _compare_one(
    model: Path, category: str, backends: list[str], options: dict[str, Any], failed: list[Verdict]
) -> dict[str, Any]:
    """Print the comparison table; the accuracy gate's failures are added to ``failed``."""
    from ..evaluation.evaluate import compare_backends

    comparison = compare_backends(model, category, backends, **options)
    summary = comparison.summary()
    counts = summary["images"]
    ref = comparison.reference.name
    click.echo(
        f"{category}: {counts['normal']:,} normal + {counts['anomalous']:,} anomalous test images; "
        f"differences against {ref}"
    )
    header = [
        "backend",
        "what ran",
        f"max|map-{ref}|",
        f"max|score-{ref}|",
        "Spearman",
        "image AUROC",
        "pixel AUROC",
        "PRO",
        "seconds",
        "accuracy gate",
    ]
    lines = [header]
    for run in comparison.runs:
        r = summary["backends"][run.name]
        is_ref = run.name == ref
        verdict = comparison.gate(run)
        if verdict is not None and not verdict.passed:
            failed.append(verdict)
        lines.append(
            [
                run.name,
                run.label,
                "-" if is_ref else _sci(r["max_abs_map_difference"]),
                "-" if is_ref else _sci(r["max_abs_score_difference"]),
                "-" if is_ref else _fmt(r["spearman_image_scores"], 4, 1),
                _fmt(r["image_auroc"]),
                _fmt(r["pixel_auroc"]),
                _fmt(r["pro"]),
                f"{r['seconds']:.2f}",
                "-" if verdict is None else "pass" if verdict.passed else "FAIL",
            ]
        )
    click.echo(_columns(lines, left=2))
    return summary


def format_rules(rows: list[dict[str, Any]], pixel: float | None) -> str:
    """One line per threshold rule: the image threshold and what it flags on this split."""
    lines: list[list[str] | None] = [["rule", "threshold", "caught", "misses", "false alarms"], None]
    for r in rows:
        lines.append(
            [
                r["rule"],
                _thr(r["image_threshold"]),
                f"{r['anomalous_caught']}/{r['anomalous']}",
                str(r["misses"]),
                f"{r['false_alarms']}/{r['normal']}",
            ]
        )
    head = (
        f"image thresholds on this split (anomalous: score > threshold); "
        f"pixel threshold {_thr(pixel)}, capped at the image one"
    )
    return "\n".join("  " + line for line in [head, *_columns(lines).splitlines()])


def _thr(value: float | None) -> str:
    return "none" if value is None or not math.isfinite(value) else f"{value:.6g}"


def format_table(rows: list) -> str:
    """category | ours / paper per metric, in percent; group means after a rule."""
    head = ["category"] + [label for m in METRICS for label in (METRIC_LABELS[m], "paper")]
    lines: list[list[str] | None] = [head, None]
    for i, row in enumerate(rows):
        if row.is_mean and (i == 0 or not rows[i - 1].is_mean):
            lines.append(None)
        lines.append([row.label] + [v for m in METRICS for v in (_fmt(row.ours.get(m)), _fmt(row.paper.get(m)))])
    return _columns(lines)


def _fmt(value: float | None, digits: int = 1, scale: float = 100.0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{scale * value:.{digits}f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _columns(lines: list, left: int = 1) -> str:
    """The first ``left`` columns left-aligned, the others right-aligned; ``None`` is a horizontal rule."""
    table = [line for line in lines if line is not None]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    out = []
    for line in lines:
        if line is None:
            out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
            continue
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
