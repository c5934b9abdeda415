"""What the station page's "Apply", "Teach" and "Roll back" do to the run's bundle: the first two write a new version
of it (``versions.py``), which the running line switches to between two frames (``protoad-run --reload-every``),
and "Roll back" puts the version it was made from back in force, as ``protoad-teach --rollback`` does. The same code
as ``protoad-eval --set-threshold`` and ``protoad-teach``: the station only chooses the frames (the ones its
operators marked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import versions
from ..bundle import Bundle
from ..runtime.station.review import KIND

TEACH_THREADS = 1  # teaching shares the line box with the judging: one core, so the line keeps its pace


class BundleChanges:
    """Threshold changes and teaching of ``bundle`` for the station (``station.Station.changes``)."""

    def __init__(self, bundle: Bundle, log: Callable[[str], None]) -> None:
        self.bundle, self.log = bundle, log

    def set_threshold(self, threshold: float, reviewed: list[dict[str, Any]], operator: str) -> dict[str, Any]:
        """Puts ``threshold`` in force as a new version; its record says what it flags on the ``reviewed``
        frames, and who chose it."""
        from ..evaluation.threshold_rules import outcome, write_threshold

        labels = np.array([KIND[r["label"]] == "defect" for r in reviewed], dtype=bool)
        scores = np.array([r["score"] for r in reviewed], dtype=np.float64)
        chosen = outcome(repr(float(threshold)), float(threshold), labels, scores)
        change = write_threshold(
            self.bundle.sidecar, chosen, f"{len(reviewed)} frames marked on the line station, chosen by {operator}"
        )
        return {
            "version": change.new.version,
            "threshold": change.new.image_threshold,
            "message": f"version {change.new.version} of {self.bundle.name} puts the threshold "
            f"{change.new.image_threshold:.6g} in force (was {change.old.image_threshold:.6g}): on the marked frames "
            f"it catches {chosen.anomalous_caught}/{chosen.anomalous} defects with {chosen.false_alarms}/"
            f"{chosen.normal} false alarms; the line switches to it between two frames",
        }

    def teach(self, normal: Path, defect: Path) -> dict[str, Any]:
        """Teaches the frames in ``normal`` (marked false alarms) as a new version, refused when it costs the
        marked frames (``normal`` and ``defect``, when there are defects) more accuracy than the gate allows."""
        from ..evaluation.line_split import load_line_split
        from ..runtime.sources.frames import read_frames
        from ..teach.check import Check
        from ..teach.teach import teach

        info = self.bundle.info()
        pre = info.preprocess
        frames = read_frames([str(normal)], pre, what="marked false alarms")
        check = None
        if any(defect.iterdir()):
            split = load_line_split([str(normal)], [str(defect)], pre, "the marked frames")
            check = Check(split, f"the {len(split.labels)} frames marked on the line station")
        result = teach(self.bundle, frames, check=check, threads=TEACH_THREADS, log=self.log)
        if result.version_after is None:
            return {"version": info.version, "message": "; ".join(result.notes)}
        checked = f"; {result.check.line()}" if result.check is not None else "; no defect marked: no check"
        return {
            "version": result.version_after,
            "message": f"version {result.version_after} of {self.bundle.name} knows the {len(result.frames)} "
            f"false alarms as normal ({result.added:,} prototypes added, K {result.k_before:,} -> "
            f"{result.k_after:,}){checked}; the line switches to it between two frames",
        }

    def rollback(self) -> dict[str, Any]:
        """The version the one in force was made from, back in force bit for bit; the one undone stays kept."""
        done = versions.rollback(self.bundle)
        return {
            "from": done.old,
            "version": done.new,
            "message": f"{self.bundle.name}: version {done.old} rolled back to version {done.new} "
            f"({', '.join(done.files)} restored; version {done.old} kept); the line switches to it between two frames",
        }
