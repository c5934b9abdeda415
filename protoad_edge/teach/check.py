"""The opt-in check of a teach against labelled defects: the project's accuracy gate, on the bundle before and
after, refuses a teach that costs more than it allows (``--accept-accuracy-loss`` overrides it knowingly).

The model cannot tell a defect from a new normal look, so no score alone refuses a frame. What a defect taught by
mistake costs shows on labelled images: defects like it score lower, the image AUROC (and, with masks, the pixel
AUROC) drops. The images are the build's test split (``--check-category``) or frames an operator sorted
(``--check-normal``/``--check-defect``, ``evaluation.line_split``). The gate's AUROC limits apply as to a reduced
precision; its rank rule does not (``accuracy_gate.judge``): a teach is meant to reorder normal frames of the
new look.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..bundle import Bundle
from ..decision import image_scores, is_anomalous
from ..evaluation.accuracy_gate import ACCEPT_FLAG, Verdict, judge
from ..evaluation.evaluate import LabelledSplit, compute_metrics, gate_figures
from ..metrics import spearman

Maps = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # crops -> (maps before, maps after)


@dataclass
class CheckResult:
    what: str
    verdict: Verdict
    threshold: float
    caught_before: int
    caught_after: int
    defects: int
    false_alarms_before: int
    false_alarms_after: int
    normal: int

    def line(self) -> str:
        return (
            f"check on {self.what}: {self.verdict.figures.line()}; at the image threshold defects caught "
            f"{self.caught_before}/{self.defects} -> {self.caught_after}/{self.defects}, false alarms "
            f"{self.false_alarms_before}/{self.normal} -> {self.false_alarms_after}/{self.normal}: "
            + ("passed" if self.verdict.passed else "; ".join(self.verdict.failures))
        )

    def refusal(self, bundle: Bundle) -> str:
        return (
            f"teach refused, {bundle.stem} left as it is: {self.line()}. Were defects among the frames taught? "
            f"Pass {ACCEPT_FLAG} to teach them anyway"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "on": self.what,
            **{k: v for k, v in self.verdict.to_dict().items() if k != "min_spearman"},
            "caught": [self.caught_before, self.caught_after],
            "defects": self.defects,
            "false_alarms": [self.false_alarms_before, self.false_alarms_after],
            "normal": self.normal,
        }


@dataclass
class Check:
    """Labelled images to judge a teach on, and what they are (for the report)."""

    split: LabelledSplit
    what: str

    def run(self, maps: Maps, threshold: float) -> CheckResult:
        """The gate's verdict on the maps of the split before and after teaching (``maps``)."""
        split = self.split
        before, after = maps(split.crops)
        old, new = compute_metrics(split, before), compute_metrics(split, after)
        rank = spearman(image_scores(before), image_scores(after))
        figures = gate_figures("the taught bundle", split, old, new, rank)
        flagged = [is_anomalous(image_scores(m), threshold) for m in (before, after)]
        labels = split.labels
        return CheckResult(
            self.what,
            judge(figures, rank=False),
            threshold,
            int((flagged[0] & labels).sum()),
            int((flagged[1] & labels).sum()),
            int(labels.sum()),
            int((flagged[0] & ~labels).sum()),
            int((flagged[1] & ~labels).sum()),
            int((~labels).sum()),
        )
