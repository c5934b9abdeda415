"""The operators' review: the trade of candidate thresholds on the marked frames, and the marked frames exported as
the normal/ and defect/ folders protoad-eval and protoad-teach take."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.station.review import Trade, export, trade


def marked(score: float, label: str, id_: int = 1, images: str | None = None) -> dict:
    return {"id": id_, "score": score, "label": label, "images": images, "source": "cam0", "frame": id_}


def test_the_trade_of_each_candidate_threshold() -> None:
    reviewed = [
        marked(0.30, "false-alarm"),
        marked(0.50, "real-defect"),
        marked(0.20, "missed-defect"),
        marked(0.45, "false-alarm"),
    ]
    trades = trade(reviewed, in_force=0.25)
    assert [round(t.threshold, 4) for t in trades] == [0.195, 0.25, 0.375, 0.475, 0.505]  # 1 % of 0.5 beyond
    assert [(t.caught, t.misses, t.false_alarms) for t in trades] == [
        (2, 0, 2),  # below them all: every defect caught, every normal one a false alarm
        (1, 1, 2),  # in force: the missed defect (0.20) passes
        (1, 1, 1),
        (1, 1, 0),  # between the last false alarm and the real defect
        (0, 2, 0),
    ]
    assert [t.in_force for t in trades] == [False, True, False, False, False]
    assert [t.suggested for t in trades] == [True, False, False, False, False]  # the only one missing none


def test_a_score_equal_to_the_threshold_passes() -> None:
    """The run's rule (decision.is_anomalous): flagged only above the threshold."""
    trades = {t.threshold: t for t in trade([marked(0.4, "real-defect"), marked(0.2, "false-alarm")], in_force=0.4)}
    assert (trades[0.4].caught, trades[0.4].misses) == (0, 1)


def test_the_suggestion_misses_no_defect_with_the_fewest_false_alarms() -> None:
    reviewed = [
        marked(0.1, "false-alarm"),
        marked(0.2, "false-alarm"),
        marked(0.6, "real-defect"),
        marked(0.7, "real-defect"),
        marked(0.9, "false-alarm"),
    ]
    suggested = [t for t in trade(reviewed, in_force=0.05) if t.suggested]
    assert len(suggested) == 1
    assert (suggested[0].caught, suggested[0].misses, suggested[0].false_alarms) == (2, 0, 1)
    assert suggested[0].threshold == pytest.approx(0.4)  # halfway between 0.2 and 0.6: the same margin both ways
    assert trade([marked(0.1, "false-alarm")], 0.5)[0] == Trade(0.1 - 0.001, 0, 0, 1)  # no defect: no suggestion
    # two thresholds miss nothing and raise no false alarm: the higher one (the wider margin above the normal)
    tied = trade([marked(0.1, "false-alarm"), marked(0.5, "real-defect")], in_force=0.35)
    assert [t.threshold for t in tied if t.suggested] == [0.35]
    assert trade([], 0.5) == []


def test_export_writes_the_folders_the_tools_take(tmp_path: Path) -> None:
    pictures = tmp_path / "line.db.images"
    for name in ("a", "b", "c"):
        (pictures / name).mkdir(parents=True)
        cv2.imwrite(str(pictures / name / "frame.png"), np.full((8, 8, 3), ord(name), np.uint8))
    reviewed = [
        marked(0.5, "false-alarm", 1, "a"),
        marked(0.9, "real-defect", 2, "b"),
        marked(0.1, "missed-defect", 3, "c"),
        marked(0.3, "false-alarm", 4, None),
    ]
    out = tmp_path / "line.db.review"
    (out / "normal").mkdir(parents=True)
    (out / "normal" / "stale.png").write_bytes(b"from an earlier export")
    done = export(reviewed, pictures, out)
    assert (done["normal"], done["defect"], done["without_picture"]) == (1, 2, 1)
    assert sorted(p.name for p in (out / "normal").iterdir()) == ["00000001-cam0-1.png"]
    assert sorted(p.name for p in (out / "defect").iterdir()) == ["00000002-cam0-2.png", "00000003-cam0-3.png"]
    assert cv2.imread(str(out / "defect" / "00000003-cam0-3.png"))[0, 0, 0] == ord("c")
    assert done["normal_folder"] == str(out / "normal") and done["defect_folder"] == str(out / "defect")


def test_an_export_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "line.db.review"
    blocker.write_text("a file where the folder goes")
    with pytest.raises(ProtoADError, match="line.db.review"):
        export([], tmp_path, blocker)


def test_the_station_address() -> None:
    from protoad_edge.runtime.station.server import is_loopback, parse_bind

    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_bind("[::1]:9000") == ("::1", 9000)
    assert parse_bind(":8080") == ("127.0.0.1", 8080)
    for bad in ("host:port", "127.0.0.1:70000", "127.0.0.1:"):
        with pytest.raises(ProtoADError, match="bad --station"):
            parse_bind(bad)
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("station.local")
