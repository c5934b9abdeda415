"""The paper's published ProtoAD figures, and our results set beside them the way its tables group them.

The numbers live in ``data/paper_tables.json`` (percent, as printed, with the table each comes
from); here they are fractions like our metrics. MVTec AD's tables report texture, object and
overall means; BTAD's only the overall mean.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("image_auroc", "pixel_auroc", "pro")
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO"}
ALL = "all"
_DATA = Path(__file__).with_name("data") / "paper_tables.json"


@dataclass(frozen=True)
class PaperMetric:
    table: str
    caption: str
    categories: dict[str, float]  # fraction, per category
    means: dict[str, float]  # fraction, per group as printed ("texture", "object", "all")


@dataclass(frozen=True)
class PaperDataset:
    name: str
    groups: dict[str, list[str]]  # texture / object; empty where the paper does not split
    metrics: dict[str, PaperMetric]

    @property
    def categories(self) -> list[str]:
        """Every category the paper reports, in the paper's order."""
        seen: dict[str, None] = {c: None for members in self.groups.values() for c in members}
        for metric in self.metrics.values():
            seen.update(dict.fromkeys(metric.categories))
        return list(seen)

    def value(self, metric: str, category: str) -> float | None:
        m = self.metrics.get(metric)
        return None if m is None else m.categories.get(category)


@functools.cache
def paper_source() -> dict[str, str]:
    return dict(_load()["source"])


def paper_dataset(kind: str) -> PaperDataset | None:
    """The paper's figures for dataset ``kind`` (``mvtec``, ``btad``); None for datasets it has none for."""
    return _datasets().get(kind)


@functools.cache
def _load() -> dict[str, Any]:
    return json.loads(_DATA.read_text(encoding="utf-8"))


@functools.cache
def _datasets() -> dict[str, PaperDataset]:
    out = {}
    for kind, d in _load()["datasets"].items():
        metrics = {
            name: PaperMetric(
                table=m["table"],
                caption=m["caption"],
                categories={c: v / 100.0 for c, v in m["categories"].items()},
                means={g: v / 100.0 for g, v in m["means"].items()},
            )
            for name, m in d["metrics"].items()
        }
        out[kind] = PaperDataset(name=d["name"], groups=dict(d["groups"]), metrics=metrics)
    return out


@dataclass
class Row:
    """One line of a comparison table: a category, or the mean of a group of categories."""

    label: str
    categories: list[str]
    ours: dict[str, float | None] = field(default_factory=dict)
    paper: dict[str, float | None] = field(default_factory=dict)
    is_mean: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "categories": self.categories, "ours": self.ours, "paper": self.paper}


def comparison_rows(kind: str, ours: dict[str, dict[str, float | None]]) -> list[Row]:
    """Per-category rows, then group means, of ``ours`` ({category: {metric: value}}) beside the paper.

    Means cover the categories the paper reports. A group evaluated in full shows the paper's
    printed mean; a partly evaluated group ("object, 3 of 10") shows the paper's mean over the
    same categories, so the two columns always compare like with like. Without any category of
    the paper, one overall mean of everything evaluated is shown.
    """
    paper = paper_dataset(kind)
    known = paper.categories if paper else []
    order = [c for c in known if c in ours] + sorted(c for c in ours if c not in known)
    rows = [
        Row(c, [c], {m: ours[c].get(m) for m in METRICS}, {m: paper.value(m, c) if paper else None for m in METRICS})
        for c in order
    ]
    groups = {**paper.groups, ALL: known} if paper else {}
    evaluated_any = False
    for group, members in groups.items():
        present = [c for c in members if c in ours]
        if not present:
            continue
        evaluated_any = True
        label = group if len(present) == len(members) else f"{group}, {len(present)} of {len(members)}"
        row = Row(label, present, is_mean=True)
        for m in METRICS:
            row.ours[m] = _mean(ours[c].get(m) for c in present)
            metric = paper.metrics.get(m) if paper else None
            if metric is None:
                row.paper[m] = None
            elif len(present) == len(members) and group in metric.means:
                row.paper[m] = metric.means[group]
            else:
                row.paper[m] = _mean(metric.categories.get(c) for c in present)
        rows.append(row)
    if not evaluated_any and ours:
        rows.append(
            Row(
                ALL,
                list(order),
                {m: _mean(ours[c].get(m) for c in order) for m in METRICS},
                dict.fromkeys(METRICS),
                is_mean=True,
            )
        )
    return rows


def _mean(values: Any) -> float | None:
    """Mean of the values present; None unless every value is present (a partial mean would mislead)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))
