"""Image threshold rules a line engineer can choose from on a labelled test split (``protoad-eval --set-threshold``).

Every rule returns a threshold for the verdict ``decision.is_anomalous`` (``score > threshold``). Where a rule
cuts between two neighbouring distinct scores, the threshold lies halfway between them (just outside the
range at either end), as ``metrics.f1_optimal_threshold`` does: the verdicts on the split are those of the cut,
and a backend that rounds a score slightly differently does not flip one.

The pixel threshold is left as it is: no rule here sets one, and the runtime caps it at the image threshold
in force (``decision.capped_pixel_threshold``), so an outline stays around every flagged peak.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .. import versions
from ..bundle import Bundle
from ..decision import is_anomalous
from ..errors import ProtoADError
from ..metadata import MANUAL, ON_TEST_SPLIT, ModelInfo
from ..metrics import f1_optimal_threshold

FLAG = "--set-threshold"
F1, NORMAL_MAX, FPR, VALUE = "f1", "normal-max", "fpr", "value"
# Shown beside the model's current threshold on every evaluation, so the trade is seen before choosing.
STANDARD = ("f1", "normal-max", "fpr=0.01", "fpr=0.05")
USAGE = "f1, normal-max, fpr=X with 0 <= X < 1, or a number"


@dataclass(frozen=True)
class Rule:
    """A parsed RULE: ``kind`` is F1, NORMAL_MAX, FPR (``value`` = the share) or VALUE (``value`` = the threshold)."""

    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        if self.kind == FPR:
            return f"fpr={self.value!r}"
        return repr(self.value) if self.kind == VALUE else self.kind

    def recorded(self, on: str = ON_TEST_SPLIT) -> str:
        """The sidecar's (and every record's) ``threshold_rule`` once this rule is in force: a number is MANUAL,
        the others are named after the images that chose the threshold (``f1@test-split``, ``f1@line-frames``)."""
        return MANUAL if self.kind == VALUE else self.name + on


@dataclass(frozen=True)
class Outcome:
    """What one image threshold flags on a labelled split."""

    rule: str
    image_threshold: float
    anomalous_caught: int
    anomalous: int
    false_alarms: int
    normal: int

    @property
    def misses(self) -> int:
        return self.anomalous - self.anomalous_caught

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "image_threshold": self.image_threshold,
            "anomalous_caught": self.anomalous_caught,
            "anomalous": self.anomalous,
            "misses": self.misses,
            "false_alarms": self.false_alarms,
            "normal": self.normal,
        }


def parse_rule(text: str) -> Rule:
    """RULE as typed after ``--set-threshold``; anything else is a one-line ProtoADError."""
    spec = text.strip().lower()
    if spec in (F1, NORMAL_MAX):
        return Rule(spec)
    if spec.startswith(FPR + "="):
        share = _number(spec[len(FPR) + 1 :], text)
        if not 0.0 <= share < 1.0:
            raise ProtoADError(f"bad {FLAG} {text!r}: the share X of normal images flagged must be 0 <= X < 1")
        return Rule(FPR, share)
    return Rule(VALUE, _number(spec, text))


def _number(spec: str, text: str) -> float:
    try:
        value = float(spec)
    except ValueError:
        raise ProtoADError(f"bad {FLAG} {text!r}: give {USAGE}") from None
    if not math.isfinite(value):
        raise ProtoADError(f"bad {FLAG} {text!r}: the number must be finite")
    return value


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The F1-optimal threshold (ties in F1 go to the higher threshold)."""
    return f1_optimal_threshold(labels, scores)[0]


def normal_max_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Just above the highest normal score: halfway to the next higher score, so no normal image is flagged."""
    return _cut_above(scores, float(np.max(scores[~labels])))


def fpr_threshold(labels: np.ndarray, scores: np.ndarray, share: float) -> float:
    """The lowest threshold that flags at most ``share`` of the normal images (floor(share x normal images)).

    It must not flag the normal image ranked one past that allowance, so the cut is just above its score.
    The share is taken as written (0.29 of 100 images allows 29, not the 28 of its binary float).
    """
    normal = np.sort(scores[~labels])[::-1]
    allowed = math.floor(Fraction(repr(share)) * normal.size)  # < normal.size because share < 1
    return _cut_above(scores, float(normal[allowed]))


def _cut_above(scores: np.ndarray, score: float) -> float:
    """Halfway between ``score`` and the next higher distinct score; just above ``score`` when it is the highest."""
    distinct = np.unique(scores)
    above = int(np.searchsorted(distinct, score, side="right"))
    if above < distinct.size:
        return float((score + distinct[above]) / 2.0)
    return score + max(abs(score) * 1e-6, 1e-12)


def outcome(rule: str, threshold: float, labels: np.ndarray, scores: np.ndarray) -> Outcome:
    """What ``threshold`` flags among ``scores``: the verdict is ``decision.is_anomalous``, nothing else."""
    labels = np.asarray(labels, dtype=bool)
    flagged = is_anomalous(np.asarray(scores, dtype=np.float64), threshold)
    return Outcome(
        rule=rule,
        image_threshold=float(threshold),
        anomalous_caught=int((flagged & labels).sum()),
        anomalous=int(labels.sum()),
        false_alarms=int((flagged & ~labels).sum()),
        normal=int((~labels).sum()),
    )


def apply_rule(rule: Rule, labels: np.ndarray, scores: np.ndarray) -> Outcome:
    """The threshold ``rule`` chooses on a labelled split (bool ``labels``, True = anomalous) and what it flags."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    normal, anomalous = int((~labels).sum()), int(labels.sum())
    if rule.kind == F1:
        if not normal or not anomalous:
            raise ProtoADError(
                f"{FLAG} f1 needs both normal and anomalous test images ({normal} normal, {anomalous} anomalous)"
            )
        threshold = f1_threshold(labels, scores)
    elif rule.kind == VALUE:
        threshold = float(rule.value)
    elif not normal:
        raise ProtoADError(f"{FLAG} {rule.name} needs normal test images, and the split has none")
    elif rule.kind == NORMAL_MAX:
        threshold = normal_max_threshold(labels, scores)
    else:
        threshold = fpr_threshold(labels, scores, float(rule.value))
    return outcome(rule.name, threshold, labels, scores)


def rule_table(labels: np.ndarray, scores: np.ndarray, current: float, chosen: Rule | None = None) -> list[Outcome]:
    """The model's current threshold (rule "current", when it has one), the STANDARD rules and ``chosen``."""
    rows = [outcome("current", current, labels, scores)] if math.isfinite(current) else []
    rules = [parse_rule(r) for r in STANDARD]
    if chosen is not None and chosen not in rules:
        rules.append(chosen)
    return rows + [apply_rule(r, labels, scores) for r in rules]


@dataclass(frozen=True)
class ThresholdChange:
    """A threshold written into a bundle: its sidecar, and the metadata before and after."""

    sidecar: Path
    old: ModelInfo
    new: ModelInfo
    created: bool  # the bundle had no sidecar: it was written from the ONNX metadata

    def to_dict(self) -> dict[str, Any]:
        keys = ("image_threshold", "pixel_threshold", "threshold_rule")
        return {
            "sidecar": str(self.sidecar),
            "created": self.created,
            "old": {k: _finite(getattr(self.old, k)) for k in keys},
            "new": {k: _finite(getattr(self.new, k)) for k in keys},
        }


def write_threshold(model: str | os.PathLike, chosen: Outcome, split: str, on: str = ON_TEST_SPLIT) -> ThresholdChange:
    """Put ``chosen`` in force for the bundle of ``model``: its sidecar gets the new image threshold and rule
    (``split`` says which images chose it, ``on`` names them in a word), the previous values go to
    ``threshold_history``, and the file is replaced atomically, as a new version of the bundle (``versions.py``).
    The pixel threshold is kept (the runtime caps it at the image threshold), and so are the digests: the file
    evaluated was checked against them when it was opened."""
    bundle = Bundle.of(model)
    created = not bundle.sidecar.exists()
    with versions.writing(bundle) as version:  # a new version: a running line switches to it, a rollback undoes it
        old = version.before  # the sidecar, or the ONNX metadata when there is none
        previous = {
            "image_threshold": old.image_threshold,
            "pixel_threshold": old.pixel_threshold,
            "threshold_rule": old.threshold_rule,
            "threshold_detail": old.threshold_detail,
            "replaced": versions.now(),
        }
        detail = (
            f"image: {chosen.rule} ({FLAG}) on {split}: flags {chosen.anomalous_caught}/{chosen.anomalous} "
            f"anomalous and {chosen.false_alarms}/{chosen.normal} normal images; "
            "pixel: unchanged (see threshold_history), capped at the image threshold in force"
        )
        new = replace(
            old,
            image_threshold=chosen.image_threshold,
            threshold_rule=parse_rule(chosen.rule).recorded(on),
            threshold_detail=detail,
            threshold_history=[*old.threshold_history, previous],
        )
        if created:  # a first sidecar vouches for the files beside it now, as a re-seal does
            new = bundle.seal(new)
        new = version.info(new, "set-threshold", rule=chosen.rule, image_threshold=chosen.image_threshold, split=split)
        version.commit(new)
    return ThresholdChange(bundle.sidecar, old, new, created)


def _finite(value: Any) -> Any:
    """JSON has no NaN: an unset threshold becomes null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
