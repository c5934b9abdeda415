"""Score a model bundle on a labelled test split, and compare backends on the same images.

``evaluate_category`` is the Python API behind ``protoad-eval``: image AUROC, pixel AUROC and
PRO (MVTec AD's definition, see ``metrics.pro_curve``), plus how the model's own thresholds and the threshold
rules of ``threshold_rules`` fare, so a line engineer sees the trade before putting one in force.
``compare_backends`` runs one test split through several backends (any of ``backends.NAMES``) and reports
how far their maps are from the first one's, how well their image rankings agree and each one's
metrics: the check that the exported graph still is the network it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..builder.datasets import Sample, load_crops, load_masks, open_dataset
from ..bundle import Bundle
from ..decision import image_scores
from ..errors import ProtoADError
from ..metadata import ModelInfo
from ..metrics import PRO_FPR_LIMIT, curve_area, pro_area, pro_curve, roc_curve, spearman
from ..preprocess import Preprocess, to_batch
from ..runtime.backends.base import Backend, BackendOptions, run_maps
from ..runtime.backends.registry import AUTO, BackendEntry, choose, locate, open_file, parse_spec, with_precision
from .accuracy_gate import GateFigures, Verdict, judge
from .threshold_rules import Outcome, Rule, outcome, rule_table

Curve = tuple[np.ndarray, np.ndarray]


@dataclass
class LabelledSplit:
    """The labelled test split of one category, preprocessed for one model's geometry."""

    category: str
    kind: str
    root: Path
    samples: list[Sample]
    crops: np.ndarray  # uint8 [N,S,S,3] RGB
    masks: np.ndarray  # bool [N,S,S]; all False for normal images
    labels: np.ndarray  # bool [N], True = anomalous
    pixel_usable: np.ndarray  # bool [N]: normal, or anomalous with a mask (BTAD may lack some)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "normal": int((~self.labels).sum()),
            "anomalous": int(self.labels.sum()),
            "anomalous_with_mask": int((self.labels & self.pixel_usable).sum()),
        }


def load_test_set(
    category: str, data_root: str | os.PathLike | None, dataset: str, pre: Preprocess, progress: bool = False
) -> LabelledSplit:
    data = open_dataset(category, data_root, dataset)
    if not data.has_labels:
        raise ProtoADError(
            f"category {category!r} in {data.root} has no labelled test split: metrics need both normal and "
            f"anomalous test images ({len(data.test)} test images found, layout {data.kind})"
        )
    labels = np.array([s.label == 1 for s in data.test])
    return LabelledSplit(
        category=category,
        kind=data.kind,
        root=data.root,
        samples=data.test,
        crops=load_crops(data.test, pre, "load test", progress),
        masks=load_masks(data.test, pre),
        labels=labels,
        pixel_usable=np.array([s.label == 0 or s.mask_path is not None for s in data.test]),
    )


@dataclass
class Metrics:
    """Values are fractions (1.0 = perfect); pixel metrics are None without any ground-truth mask."""

    image_auroc: float
    pixel_auroc: float | None
    pro: float | None
    image_roc: Curve
    pixel_roc: Curve | None
    pro_curve: Curve | None

    def values(self) -> dict[str, float | None]:
        return {"image_auroc": self.image_auroc, "pixel_auroc": self.pixel_auroc, "pro": self.pro}


def compute_metrics(test: LabelledSplit, maps: np.ndarray) -> Metrics:
    fpr, tpr, _ = roc_curve(test.labels, image_scores(maps))
    image_auroc = curve_area(fpr, tpr)
    usable = test.pixel_usable
    masks = test.masks[usable]
    if not masks.any():
        return Metrics(image_auroc, None, None, (fpr, tpr), None, None)
    pix_fpr, pix_tpr, _ = roc_curve(masks, maps[usable])
    pro_fpr, pro, _ = pro_curve(masks, maps[usable])
    return Metrics(
        image_auroc=image_auroc,
        pixel_auroc=curve_area(pix_fpr, pix_tpr),
        pro=pro_area(pro_fpr, pro),
        image_roc=(fpr, tpr),
        pixel_roc=(pix_fpr, pix_tpr),
        pro_curve=(pro_fpr, pro),
    )


@dataclass
class ThresholdCheck:
    """The model's own decision thresholds applied to the test split."""

    image_threshold: float
    pixel_threshold: float
    anomalous_caught: int
    anomalous: int
    false_alarms: int
    normal: int

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


@dataclass
class CategoryResult:
    category: str
    kind: str
    model: Path
    backend: str  # what ran, as ``BackendFacts.line`` puts it
    info: ModelInfo
    test: LabelledSplit
    maps: np.ndarray  # float32 [N,S,S]
    metrics: Metrics
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        return image_scores(self.maps)

    @property
    def split(self) -> str:
        """Which images these are, in words (recorded with a threshold chosen on them)."""
        return f"the {self.kind} test split of {self.category!r} in {self.test.root.resolve()}"

    def thresholds(self) -> ThresholdCheck:
        seen = outcome("current", self.info.image_threshold, self.test.labels, self.scores)
        return ThresholdCheck(
            image_threshold=self.info.image_threshold,
            pixel_threshold=self.info.pixel_threshold,
            anomalous_caught=seen.anomalous_caught,
            anomalous=seen.anomalous,
            false_alarms=seen.false_alarms,
            normal=seen.normal,
        )

    def threshold_rules(self, chosen: Rule | None = None) -> list[Outcome]:
        """The current image threshold, the standard rules and ``chosen``, each with what it flags here."""
        return rule_table(self.test.labels, self.scores, self.info.image_threshold, chosen)

    def summary(self, chosen: Rule | None = None) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready; ``chosen`` adds that rule to ``threshold_rules``."""
        n = len(self.maps)
        return {
            **{k: _finite(v) for k, v in self.metrics.values().items()},
            "pro_fpr_limit": PRO_FPR_LIMIT,
            "images": self.test.counts,
            "model": str(self.model),
            "model_category": self.info.category,
            "backend": self.backend,
            "crop": self.info.crop,
            "resize": self.info.resize,
            "num_prototypes": self.info.num_prototypes,
            "thresholds": self.thresholds().to_dict(),
            "threshold_rules": [row.to_dict() for row in self.threshold_rules(chosen)],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "images_per_second": round(n / self.seconds["infer"], 2) if self.seconds.get("infer") else None,
        }


def evaluate_category(
    model: str | os.PathLike,
    category: str,
    data_root: str | os.PathLike | None = None,
    dataset: str = "mvtec",
    backend: str = AUTO,
    batch_size: int = 8,
    options: BackendOptions | None = None,
    progress: bool = False,
    any_category: bool = False,
) -> CategoryResult:
    """Run ``model`` (any file of a bundle, or a folder of bundles) on the test split of ``category``;
    a bundle built for another category is refused unless ``any_category`` (see ``check_category``);
    ``backend`` may name a precision (``openvino:bf16``)."""
    backend, options = with_precision(backend, options or BackendOptions())
    entry, path = _resolve(model, category, backend)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with open_file(entry, path, options) as opened:
        check_category(path, opened.info, category, any_category)
        seconds["open"] = time.perf_counter() - start
        test = load_test_set(category, data_root, dataset, opened.info.preprocess, progress)
        seconds["load"] = time.perf_counter() - start - seconds["open"]
        maps, seconds["infer"] = _timed_maps(opened, test, batch_size, progress)
        label, info = opened.describe().line(), opened.info
    start = time.perf_counter()
    metrics = compute_metrics(test, maps)
    seconds["metrics"] = time.perf_counter() - start
    return CategoryResult(category, test.kind, path, label, info, test, maps, metrics, seconds)


def check_category(path: Path, info: ModelInfo, category: str, any_category: bool) -> None:
    """A bundle scored on another category's images measures nothing (AUROC near 50 looks like a weak model),
    so that takes ``any_category``. A bundle named after the category (what a folder of bundles gives) passes."""
    if any_category or info.category == category or Bundle.of(path).name == category:
        return
    raise ProtoADError(
        f"{path} was built for category {info.category!r}, not {category!r}: evaluate it with "
        f"--category {info.category}, or pass --any-category to score it on {category!r} anyway"
    )


def _resolve(model: str | os.PathLike, category: str, backend: str) -> tuple[BackendEntry, Path]:
    bundle, given = locate(model, category)
    return choose(bundle, given, backend)


def _timed_maps(backend: Backend, test: LabelledSplit, batch_size: int, progress: bool) -> tuple[np.ndarray, float]:
    backend.infer(to_batch(test.crops[:1]))  # first-call costs (allocation, engine set-up) are not speed
    start = time.perf_counter()
    maps = run_maps(backend, test.crops, batch_size, f"{backend.name} {test.category}", progress)
    return maps, time.perf_counter() - start


@dataclass
class BackendRun:
    name: str  # as given to --compare: ``openvino:bf16`` for a reduced precision
    label: str
    model: Path
    maps: np.ndarray
    metrics: Metrics
    seconds: float
    reduced: bool = False  # a precision below the backend's full one: judged by the accuracy gate


@dataclass
class Comparison:
    """Several backends on one test split; differences are against the first backend."""

    category: str
    test: LabelledSplit
    runs: list[BackendRun]

    @property
    def reference(self) -> BackendRun:
        return self.runs[0]

    def max_map_difference(self, run: BackendRun) -> float:
        return float(np.abs(run.maps.astype(np.float64) - self.reference.maps).max())

    def max_score_difference(self, run: BackendRun) -> float:
        return float(np.abs(image_scores(run.maps).astype(np.float64) - image_scores(self.reference.maps)).max())

    def rank_agreement(self, run: BackendRun) -> float:
        """Spearman correlation of the image scores with the reference backend's."""
        return spearman(image_scores(self.reference.maps), image_scores(run.maps))

    def gate(self, run: BackendRun) -> Verdict | None:
        """The accuracy gate's verdict on a reduced-precision run against the (full precision) reference; None
        for a full precision run, which the gate does not judge."""
        if not run.reduced:
            return None
        return judge(gate_figures(run.name, self.test, self.reference.metrics, run.metrics, self.rank_agreement(run)))

    def _gate_summary(self, run: BackendRun) -> dict[str, Any] | None:
        verdict = self.gate(run)
        return None if verdict is None else {k: _finite(v) for k, v in verdict.to_dict().items()}

    def summary(self) -> dict[str, Any]:
        return {
            "reference": self.reference.name,
            "images": self.test.counts,
            "backends": {
                run.name: {
                    "backend": run.label,
                    "model": str(run.model),
                    **{k: _finite(v) for k, v in run.metrics.values().items()},
                    "max_abs_map_difference": _finite(self.max_map_difference(run)),
                    "max_abs_score_difference": _finite(self.max_score_difference(run)),
                    "spearman_image_scores": _finite(self.rank_agreement(run)),
                    "seconds": round(run.seconds, 3),
                    "accuracy_gate": self._gate_summary(run),
                }
                for run in self.runs
            },
        }


def compare_backends(
    model: str | os.PathLike,
    category: str,
    backends: list[str],
    data_root: str | os.PathLike | None = None,
    dataset: str = "mvtec",
    batch_size: int = 8,
    options: BackendOptions | None = None,
    progress: bool = False,
    any_category: bool = False,
) -> Comparison:
    """Run the same test images through each of ``backends`` (at least two, the first is the reference;
    ``name:precision`` runs a backend in a reduced precision, which the accuracy gate judges against the
    reference, so that must run at full precision; ``name@FILE`` runs another bundle, e.g. the projected
    network beside the paper's, which must preprocess alike); ``any_category`` as in ``evaluate_category``."""
    if len(backends) < 2 or len(set(backends)) != len(backends) or AUTO in backends:
        raise ProtoADError(f"--compare needs two or more different backends, got {','.join(backends)}")
    bundles = [b.partition("@")[2] or model for b in backends]  # NAME@FILE: another bundle (another network)
    specs = [parse_spec(b.partition("@")[0]) for b in backends]
    if specs[0][1] is not None:
        raise ProtoADError(
            f"--compare {','.join(backends)}: the first backend is the FP32 reference the others are "
            f"judged against, so give it without a precision ({specs[0][0]})"
        )
    chosen = [
        _resolve(m, category, name) for m, (name, _) in zip(bundles, specs)
    ]  # every file exists before anything runs
    first = Bundle.of(chosen[0][1]).info().preprocess
    for _, path in chosen[1:]:  # and every bundle sees the same images
        if (pre := Bundle.of(path).info().preprocess) != first:
            raise ProtoADError(f"{path}: preprocessing {pre} differs from {chosen[0][1]}'s {first}")
    test: LabelledSplit | None = None
    runs: list[BackendRun] = []
    for spec, (_, precision), (entry, path) in zip(backends, specs, chosen):
        run_options = dataclasses.replace(options or BackendOptions(), precision=precision)
        with open_file(entry, path, run_options) as opened:
            check_category(path, opened.info, category, any_category)
            if test is None:
                test = load_test_set(category, data_root, dataset, opened.info.preprocess, progress)
            maps, seconds = _timed_maps(opened, test, batch_size, progress)
            runs.append(
                BackendRun(
                    spec,
                    opened.describe().line(),
                    path,
                    maps,
                    compute_metrics(test, maps),
                    seconds,
                    reduced=precision not in (None, "fp32"),
                )
            )
    assert test is not None
    return Comparison(category, test, runs)


def gate_figures(what: str, test: LabelledSplit, reference: Metrics, metrics: Metrics, rank: float) -> GateFigures:
    """The accuracy gate's figures for ``metrics`` against FP32's ``reference`` on the same labelled images."""
    return GateFigures(
        what=what,
        images=len(test.labels),
        reference_image_auroc=reference.image_auroc,
        image_auroc=metrics.image_auroc,
        spearman=rank,
        reference_pixel_auroc=reference.pixel_auroc,
        pixel_auroc=metrics.pixel_auroc,
        anomalous=int(test.labels.sum()),
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing or undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
