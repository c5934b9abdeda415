"""What the operators' labels say: the trade of candidate thresholds on the reviewed frames, and those frames as the
folders the tools take (``protoad-eval --set-threshold RULE --normal DIR --defect DIR``, ``protoad-teach DIR``).

A label makes a reviewed frame normal ("false-alarm": flagged, but good) or a defect ("real-defect": flagged and
bad; "missed-defect": passed, but bad). A threshold t flags a frame when its score is above t
(``decision.is_anomalous``), so on the reviewed frames it catches the defects scoring above it, misses the others,
and raises a false alarm on every normal frame scoring above it. Candidates are the thresholds in force and the
midpoints between neighbouring reviewed scores (each a different trade, with the same margin on both sides),
plus one below and one above them all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import atomic_folder
from ...decision import is_anomalous
from ...errors import ProtoADError

KIND = {"false-alarm": "normal", "real-defect": "defect", "missed-defect": "defect"}
EDGE = 0.01  # the outer candidates lie this share of the highest score (or of the range, if wider) beyond them


@dataclass(frozen=True)
class Trade:
    threshold: float
    caught: int
    misses: int
    false_alarms: int
    in_force: bool = False  # the threshold the run judges with now
    suggested: bool = False  # the highest that misses no reviewed defect (the fewest false alarms doing so)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trade(reviewed: Iterable[dict[str, Any]], in_force: float) -> list[Trade]:
    """The trade of each candidate threshold on the ``reviewed`` frames (rows with ``score`` and ``label``),
    lowest threshold first. Empty until at least one frame is reviewed."""
    rows = [(float(r["score"]), KIND[r["label"]] == "defect") for r in reviewed]
    if not rows:
        return []
    scores = np.array([s for s, _ in rows])
    defect = np.array([d for _, d in rows])
    distinct = np.unique(scores)
    margin = EDGE * max(float(distinct[-1] - distinct[0]), abs(float(distinct[-1])), 1e-12)
    candidates = {float(distinct[0] - margin), float(distinct[-1] + margin), float(in_force)}
    candidates.update(float(m) for m in (distinct[1:] + distinct[:-1]) / 2)
    trades = []
    for t in sorted(candidates):
        flagged = is_anomalous(scores, t)
        trades.append(
            Trade(
                t,
                int((flagged & defect).sum()),
                int((~flagged & defect).sum()),
                int((flagged & ~defect).sum()),
                in_force=t == float(in_force),
            )
        )
    catching = [t for t in trades if t.misses == 0]
    if catching and defect.any():
        best = max(catching, key=lambda t: (-t.false_alarms, t.threshold))
        trades = [Trade(**{**t.to_dict(), "suggested": t is best}) for t in trades]
    return trades


def export(reviewed: Iterable[dict[str, Any]], pictures: Path, out: Path) -> dict[str, Any]:
    """Writes the reviewed frames that still have their picture into ``out/normal`` and ``out/defect`` (PNG, named
    by row id, source index and frame), replacing what an earlier export left there. Returns the counts and the
    folders."""
    counts = {"normal": 0, "defect": 0, "without_picture": 0}
    try:
        with atomic_folder(out) as tmp:
            for kind in ("normal", "defect"):
                (tmp / kind).mkdir()
            for row in reviewed:
                source = pictures / row["images"] / "frame.png" if row.get("images") else None
                if source is None or not source.is_file():
                    counts["without_picture"] += 1
                    continue
                kind = KIND[row["label"]]
                name = f"{row['id']:08d}-{Path(str(row['source'])).stem or 'frame'}-{row['frame']}.png"
                _link_or_copy(source, tmp / kind / name)
                counts[kind] += 1
    except OSError as exc:
        raise ProtoADError(f"cannot export the reviewed frames to {out}: {exc.strerror or exc}") from None
    return {**counts, "normal_folder": str(out / "normal"), "defect_folder": str(out / "defect")}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (the retention may remove the original; the link keeps it)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
