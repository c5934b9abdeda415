"""``protoad-teach``: frames the line judged wrongly, but an operator judged normal, become prototypes of the
deployed bundle, on the line box, without PyTorch and without a rebuild; the bundle is written as a new version.

Steps: the frames through the bundle's own graph (``teach.graph``: features, patch scores, maps); the patches no
prototype covers grouped into new prototypes (``teach.cover``); the scores after teaching from the same features
(``teach.search``: exact, through the graph's tail); the optional accuracy check (``teach.check``); then every
graph of the bundle extended (``export.prototypes``) and written as one new version (``versions``).

Thresholds are kept. A prototype added can only raise a patch's highest cosine, so every score can only fall: no
frame judged normal before becomes anomalous, and the image threshold keeps its guarantee (no held-out normal
image of the build flagged, since their scores fell too). What teaching can cost is a defect that resembles the
taught frames scoring lower: the per-frame report shows what each frame taught, and the check measures it. With
held-out normal frames at hand (``--held-out``) the build's rule (``build.thresholds``) is computed on their maps
before and after and shown beside the thresholds in force; ``protoad-eval --set-threshold`` puts one in force.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from .. import versions
from ..builder.thresholds import Thresholds, from_normal_maps
from ..bundle import Bundle
from ..decision import image_scores, is_anomalous
from ..errors import ProtoADError
from ..export import prototypes as xp
from ..metadata import ModelInfo
from ..preprocess import Geometry
from ..runtime.sources.frames import Frames
from .check import Check, CheckResult
from .cover import Cover, cover, level
from .graph import BATCH, BundleGraph, Seen
from .search import Cells

Log = Callable[[str], None]
# The graphs of a bundle that carry a prototype stage, besides NAME.onnx (which teaching reads).
GRAPHS = ("fp16_onnx", "int8_onnx")
RECORDED_FRAMES = 100  # per-frame lines kept in the sidecar's change record (the report has them all)


@dataclass
class FrameReport:
    """One taught frame: its score before and after, and what it taught."""

    label: str
    score_before: float
    score_after: float
    patches: int  # patches no prototype covered before: what this frame taught
    share: float  # of the judged area
    bbox: list[int] | None  # where those patches lie, [x, y, w, h] in frame pixels (None: none)

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame": self.label,
            "score_before": round(self.score_before, 6),
            "score_after": round(self.score_after, 6),
            "patches": self.patches,
            "share": round(self.share, 4),
            "bbox": self.bbox,
        }


@dataclass
class HeldOut:
    """Normal frames not taught: how the thresholds in force fare on them, and the build's rule recomputed."""

    frames: int
    false_alarms_before: int
    false_alarms_after: int
    rule_before: Thresholds
    rule_after: Thresholds

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "false_alarms_before": self.false_alarms_before,
            "false_alarms_after": self.false_alarms_after,
            "rule_before": {"image": self.rule_before.image, "pixel": self.rule_before.pixel},
            "rule_after": {"image": self.rule_after.image, "pixel": self.rule_after.pixel},
        }


@dataclass
class TeachResult:
    bundle: Bundle
    image_threshold: float
    pixel_threshold: float
    k_before: int
    k_after: int
    frames: list[FrameReport]
    patches: int  # uncovered patches over all frames
    version_before: int
    version_after: int | None  # None: nothing to teach, no version written
    written: list[str] = field(default_factory=list)
    check: CheckResult | None = None
    held_out: HeldOut | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def added(self) -> int:
        return self.k_after - self.k_before


def teach(
    bundle: Bundle,
    frames: Frames,
    *,
    graph: BundleGraph | None = None,
    check: Check | None = None,
    held_out: Frames | None = None,
    accept: bool = False,
    keep: int = versions.KEEP,
    threads: int = 0,
    log: Log = print,
) -> TeachResult:
    """Teach ``frames`` (judged normal by an operator) to ``bundle``; see the module's docstring."""
    clock: dict[str, float] = {}
    start = time.perf_counter()
    info = bundle.info()
    if not np.isfinite(info.image_threshold):
        raise ProtoADError(f"{bundle.sidecar}: no image threshold: set one with protoad-eval --set-threshold first")
    for kind in (*GRAPHS, "prototypes"):  # what is extended must be the bundle's own: a stranger would be sealed in
        if bundle.file(kind).is_file():
            bundle.check(bundle.file(kind))
    graph = graph or BundleGraph(bundle, info, threads)
    clock["open"] = time.perf_counter() - start
    seen = graph.see(frames.crops)
    clock["features"] = time.perf_counter() - start - sum(clock.values())
    cosine = level(info)
    n, hw = seen.patch_scores.shape[0], seen.patch_scores[0].size
    uncovered = seen.patch_scores.reshape(n, hw) > 1.0 - cosine
    result = TeachResult(
        bundle,
        info.image_threshold,
        1.0 - cosine,
        info.num_prototypes,
        info.num_prototypes,
        [],
        int(uncovered.sum()),
        info.version,
        None,
        seconds=clock,
    )
    if not uncovered.any():
        result.frames = _reports(frames, seen, seen.scores, uncovered)
        result.notes.append("every patch of these frames is covered already: nothing to teach, no new version")
        return result
    unit = None if seen.unit is seen.compared else seen.unit[uncovered]
    covered = cover(seen.compared[uncovered], unit, cosine, graph.to_graph, seed=info.seed)
    cells = Cells(covered.rows, covered.centres)
    after, _ = _after(graph, cells, seen)
    clock["prototypes"] = time.perf_counter() - start - sum(clock.values())
    result.frames = _reports(frames, seen, after, uncovered)
    result.k_after = info.num_prototypes + len(covered.rows)

    def maps(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _maps(graph, cells, crops)

    if check is not None:
        result.check = check.run(maps, info.image_threshold)
        clock["check"] = time.perf_counter() - start - sum(clock.values())
    if held_out is not None:
        result.held_out = _held_out(maps(held_out.crops), len(held_out.labels), info)
        clock["held_out"] = time.perf_counter() - start - sum(clock.values())
    if result.check is not None and not result.check.verdict.passed and not accept:
        raise ProtoADError(result.check.refusal(bundle))
    with versions.writing(bundle) as new:
        record = {
            "frames": n,
            "sources": sorted({label.rsplit("#", 1)[0] for label in frames.labels})[:20],
            "patches": result.patches,
            "prototypes_added": len(covered.rows),
            "k_before": result.k_before,
            "k_after": result.k_after,
            "cosine": cosine,
            "per_frame": [r.to_dict() for r in result.frames[:RECORDED_FRAMES]],
        }
        if result.check is not None:
            record["check"] = result.check.to_dict()
        new_info = new.info(dataclasses.replace(info, num_prototypes=result.k_after), "teach", **record)
        result.written = _write(bundle, graph, covered, new, new_info)
        new.commit(new_info, keep)
    result.version_after = new_info.version
    clock["write"] = time.perf_counter() - start - sum(clock.values())
    if "plan" in result.written:
        result.notes.append(_plan(bundle, info, log))
    return result


def _after(graph: BundleGraph, cells: Cells, seen: Seen) -> tuple[np.ndarray, np.ndarray]:
    """(maps, patch scores) of frames ``seen`` before teaching, with the new prototypes in ``cells`` added: each
    patch's best cosine is the better of the old and the best new one (found exactly, ``teach.search``)."""
    n, hw, d = seen.compared.shape
    flat = seen.compared.reshape(n * hw, d)
    before = seen.patch_scores.reshape(-1)
    best, _ = cells.best(flat, flat @ cells.centres.T, floor=1.0 - before)
    scores = np.minimum(before, 1.0 - best).reshape(seen.patch_scores.shape).astype(np.float32)
    return graph.judge(scores)[0], scores


def _maps(graph: BundleGraph, cells: Cells, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps of ``crops`` before and after teaching, a few at a time (their features are not kept)."""
    before, after = [], []
    for start in range(0, len(crops), BATCH):
        seen = graph.see(crops[start : start + BATCH])
        before.append(seen.maps)
        after.append(_after(graph, cells, seen)[0])
    return np.concatenate(before), np.concatenate(after)


def _reports(frames: Frames, seen: Seen, after: np.ndarray, uncovered: np.ndarray) -> list[FrameReport]:
    """Per frame: scores before and after (``after`` maps, or scores when nothing was taught), what it taught."""
    side = seen.patch_scores.shape[1]
    scores_after = after if after.ndim == 1 else after.reshape(len(after), -1).max(axis=1)
    reports = []
    for i, label in enumerate(frames.labels):
        mask = uncovered[i].reshape(side, side)
        share, bbox = taught_region(mask, frames.crops.shape[1], frames.geometries[i])
        reports.append(FrameReport(label, float(seen.scores[i]), float(scores_after[i]), int(mask.sum()), share, bbox))
    return reports


def taught_region(mask: np.ndarray, crop: int, geometry: Geometry) -> tuple[float, list[int] | None]:
    """(the share of the judged area a frame taught, and where: the box [x, y, w, h] in frame pixels of its largest
    8-connected group of taught patches, or None). A new look of the part is one group over all of it; a defect
    taught by mistake is a small group where the defect is (scattered single patches are normal variation)."""
    if not mask.any():
        return 0.0, None
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))
    col, row, width, height = (int(v) for v in stats[largest, :4])
    stride = crop / mask.shape[0]
    u, v = math.floor(col * stride), math.floor(row * stride)
    w, h = math.ceil((col + width) * stride) - u, math.ceil((row + height) * stride) - v
    return float(mask.mean()), geometry.box_to_frame(u, v, w, h)


def _held_out(maps: tuple[np.ndarray, np.ndarray], frames: int, info: ModelInfo) -> HeldOut:
    before, after = maps
    return HeldOut(
        frames,
        int(is_anomalous(image_scores(before), info.image_threshold).sum()),
        int(is_anomalous(image_scores(after), info.image_threshold).sum()),
        from_normal_maps(before),
        from_normal_maps(after),
    )


def _write(bundle: Bundle, graph: BundleGraph, covered: Cover, new: versions.NewVersion, info: ModelInfo) -> list[str]:
    """Stage every file the new version changes: each graph's prototype stage extended, the prototypes appended,
    a plan dropped (``_plan`` builds it again after the commit). Returns the kinds written or dropped."""
    written = ["onnx"]
    xp.append_prototypes(graph.model, covered.rows, info, str(bundle.onnx))
    _save(graph.model, new.stage("onnx"))
    for kind in GRAPHS:
        path = bundle.file(kind)
        if path.is_file():
            model = xp.load(path)
            xp.append_prototypes(model, covered.rows, info, str(path))
            _save(model, new.stage(kind))
            written.append(kind)
    if bundle.prototypes.is_file():
        old = np.load(bundle.prototypes, allow_pickle=False)
        if old.shape != (info.num_prototypes - len(covered.rows), covered.prototypes.shape[1]):
            raise ProtoADError(
                f"{bundle.prototypes}: shape {list(old.shape)} does not match the bundle's "
                f"{info.num_prototypes - len(covered.rows):,} prototypes: restore the bundle's files"
            )
        with open(new.stage("prototypes"), "wb") as f:
            np.save(f, np.concatenate([old.astype(np.float32), covered.prototypes]))
        written.append("prototypes")
    if bundle.plan.is_file():
        new.drop("plan")
        written.append("plan")
    return written


def _plan(bundle: Bundle, before: ModelInfo, log: Log) -> str:
    """A TensorRT plan holds the prototypes it was built with and only runs on its GPU: the new version is written
    without it, and it is built again here where TensorRT and a GPU are at hand (in the precision and batch it had),
    else the line says where to build it."""
    from ..export.engine import engine_summary, engine_unavailable
    from ..export.tensorrt import build_engine

    why = engine_unavailable()
    if why:
        return (
            f"{bundle.plan.name} held the old prototypes and is not part of the new version ({why}): rebuild it "
            f"on its GPU with protoad-export --from-onnx {bundle.onnx}"
        )
    recorded = before.build.get("tensorrt", {})
    built = build_engine(
        bundle.onnx, precision=before.tensorrt_precision or "fp16", opt_batch=int(recorded.get("opt_batch", 1)), log=log
    )
    return f"rebuilt {engine_summary(built)}"


def _save(model: Any, path: Any) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
