"""Lean records: ``threshold_rule`` in every JSONL and MQTT record is a short name from a fixed vocabulary, never
the sidecar's description of it (which names the test split by its absolute path on the build machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import normal_crops
from mqtt_helpers import Broker, Subscriber, broker, needs_broker, read_jsonl  # noqa: F401

from protoad_edge.bundle import Bundle
from protoad_edge.cli.run import main as run_main
from protoad_edge.evaluation.threshold_rules import Outcome, write_threshold
from protoad_edge.metadata import RULE_NAMES, ModelInfo

SPLIT = "the mvtec test split of 'tiny' in /home/build/data/mvtec"  # as protoad-eval describes it
LONGEST = len("fpr=0.001@test-split")


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "parts"
    folder.mkdir()
    for i, crop in enumerate(normal_crops(3, 64, seed=7)):
        Image.fromarray(crop).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def onnx_path(tiny_model: Path, tmp_path: Path) -> Path:
    """A sealed private copy of the tiny bundle."""
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".onnx", ".json", ".prototypes.npy"):
        shutil.copy(tiny_model.with_name("tiny" + suffix), folder / ("tiny" + suffix))
    bundle = Bundle(folder / "tiny")
    bundle.seal(ModelInfo.load_json(bundle.sidecar)).save_json(bundle.sidecar)
    return bundle.onnx


def records(onnx: Path, parts: Path, out: Path, *args: str) -> list[dict]:
    result = CliRunner().invoke(run_main, [str(parts), "--model", str(onnx), "--jsonl", str(out), *args])
    assert result.exit_code == 0, result.output
    return read_jsonl(out)


def assert_lean(rule: str) -> None:
    assert RULE_NAMES.fullmatch(rule) and "/" not in rule and len(rule) <= LONGEST, rule


def test_a_threshold_set_on_a_test_split_is_recorded_by_name(onnx_path: Path, parts: Path, tmp_path: Path) -> None:
    write_threshold(onnx_path, Outcome("fpr=0.001", 0.5, 3, 6, 0, 4), SPLIT)
    info = ModelInfo.load_json(onnx_path.with_suffix(".json"))
    assert info.threshold_rule == "fpr=0.001@test-split" and SPLIT in info.threshold_detail  # the sidecar keeps it
    got = records(onnx_path, parts, tmp_path / "r.jsonl")
    assert len(got) == 3 and {r["threshold_rule"] for r in got} == {"fpr=0.001@test-split"}
    assert_lean(got[0]["threshold_rule"])
    write_threshold(onnx_path, Outcome("0.25", 0.25, 3, 6, 1, 4), SPLIT)
    assert {r["threshold_rule"] for r in records(onnx_path, parts, tmp_path / "m.jsonl")} == {"manual"}
    overridden = records(onnx_path, parts, tmp_path / "o.jsonl", "--threshold", "0.3")
    assert {r["threshold_rule"] for r in overridden} == {"--threshold"}
    history = ModelInfo.load_json(onnx_path.with_suffix(".json")).threshold_history
    assert [h["threshold_rule"] for h in history] == ["held-out", "fpr=0.001@test-split"]
    assert SPLIT in history[1]["threshold_detail"]


@pytest.mark.parametrize(
    "written, recorded",
    [
        # schema 2 wrote a sentence with the split's absolute path: it is read as its name
        ("image: f1 (--set-threshold) on " + SPLIT + ": flags 5/6 anomalous and 1/4 normal images", "f1@test-split"),
        ("image: max(max, mean + 3 std) of held-out normal image scores; pixel: 99.9th percentile", "held-out"),
        (None, "custom"),  # a rule edited by hand in a schema 3 sidecar: never copied into records
    ],
)
def test_older_and_hand_edited_rules_are_recorded_by_name(
    onnx_path: Path, parts: Path, tmp_path: Path, written: str | None, recorded: str
) -> None:
    sidecar = onnx_path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    if written is None:
        data["threshold_rule"] = "QA ticket 1234, see /srv/qa/line3/threshold.txt"
    else:
        data.update(schema=2, threshold_rule=written)
        del data["threshold_detail"], data["digests"]
    sidecar.write_text(json.dumps(data))
    got = records(onnx_path, parts, tmp_path / "r.jsonl")
    assert {r["threshold_rule"] for r in got} == {recorded}
    assert_lean(recorded)


@pytest.mark.slow
@needs_broker
def test_mqtt_records_carry_the_short_name(
    broker: Broker,
    onnx_path: Path,
    parts: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    write_threshold(onnx_path, Outcome("f1", 0.5, 3, 6, 1, 4), SPLIT)
    subscriber = Subscriber(broker)
    try:
        got = records(
            onnx_path, parts, tmp_path / "r.jsonl", "--mqtt", broker.url(), "--mqtt-spool", str(tmp_path / "spool")
        )
        assert subscriber.wait_for({r["frame"] for r in got}) == got
    finally:
        subscriber.close()
    assert {r["threshold_rule"] for r in got} == {"f1@test-split"}
    assert all("/home/build" not in json.dumps(r) for r in got)
