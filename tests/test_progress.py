"""Progress and status lines a person can read in a log file, with counts and units."""

from __future__ import annotations

import pytest

from protoad_edge import progress
from protoad_edge.progress import progress_bar


def test_log_lines_count_units_not_items(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line after every item (captured stderr is not a terminal)
    batches = [0, 8, 16]
    assert list(progress_bar(batches, "features", unit="images", sizes=[8, 8, 4])) == batches
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("features: 8/20 images (40%), ") and "s left" in lines[0]
    assert lines[1].startswith("features: 16/20 images (80%), ")
    assert lines[2].startswith("features: 20 images in ") and lines[2].endswith(" s") and len(lines) == 3


def test_quiet_when_disabled_and_between_periods(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress_bar([1, 2, 3], "x", enabled=False)) == [1, 2, 3]
    assert capsys.readouterr().err == ""
    list(progress_bar(list(range(1000)), "FINCH level 0", unit="vectors"))  # well within EVERY_S: the end only
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FINCH level 0: 1,000 vectors in ")
