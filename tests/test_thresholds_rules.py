"""Threshold rules (``protoad-eval --set-threshold``): each rule checked against values worked out here by hand
or by brute force over every cut (not by calling the code under test twice), the sidecar write (history,
atomicity, a bundle without sidecar), and the acceptance check: after ``--set-threshold f1``, ``protoad-run``
on the same test images applies exactly the threshold eval printed, and its verdicts match eval's counts."""

from __future__ import annotations

import json
import math
import os
import shutil
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import write_demo_category

from protoad_edge.bundle import Bundle
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError
from protoad_edge.evaluation.threshold_rules import (
    F1,
    FPR,
    NORMAL_MAX,
    VALUE,
    Outcome,
    Rule,
    apply_rule,
    outcome,
    parse_rule,
    write_threshold,
)
from protoad_edge.metadata import ModelInfo

# --- the rules on known scores -------------------------------------------------------------------

# Ten normal images 0.1 .. 1.0 and six anomalous ones; 1.0 is both a normal and an anomalous score (a tie).
NORMAL = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
ANOMALOUS = [0.55, 0.85, 0.95, 1.0, 1.2, 1.5]
LABELS = np.array([False] * len(NORMAL) + [True] * len(ANOMALOUS))
SCORES = np.array(NORMAL + ANOMALOUS)

# rule -> (threshold, anomalous caught of 6, false alarms of 10), worked out by hand:
HAND = {
    # F1 = 2 TP / (TP + FP + 6) per cut: flag >= 0.85 gives TP 5, FP 2 -> 10/13, the best (>= 0.95: 8/11,
    # >= 0.55: 12/17, >= 1.2: 4/8); the cut lies halfway between 0.85 and the next lower score, 0.8.
    "f1": ((0.85 + 0.8) / 2, 5, 2),
    # The highest normal score is 1.0 (tied with an anomalous one, which is missed too); the next higher is 1.2.
    "normal-max": ((1.0 + 1.2) / 2, 2, 0),
    "fpr=0": ((1.0 + 1.2) / 2, 2, 0),
    "fpr=0.09": ((1.0 + 1.2) / 2, 2, 0),  # 0.9 of a normal image: none may be flagged
    # 1 of 10 normal images may be flagged: not 0.9, the second highest; the next higher score is 0.95.
    "fpr=0.1": ((0.9 + 0.95) / 2, 4, 1),
    # 3 of 10: 1.0, 0.9, 0.8 flagged, 0.7 not; the next higher score after 0.7 is 0.8.
    "fpr=0.3": ((0.7 + 0.8) / 2, 5, 3),
    "fpr=0.35": ((0.7 + 0.8) / 2, 5, 3),
    # A number is the threshold; a score equal to it is not flagged (0.9 normal, strictly above only).
    "0.9": (0.9, 4, 1),
    "0.5": (0.5, 6, 5),
}


@pytest.mark.parametrize("text", list(HAND))
def test_each_rule_on_hand_computed_scores(text: str) -> None:
    threshold, caught, false_alarms = HAND[text]
    got = apply_rule(parse_rule(text), LABELS, SCORES)
    assert got.image_threshold == pytest.approx(threshold, abs=1e-12)
    assert (got.anomalous_caught, got.anomalous, got.misses) == (caught, 6, 6 - caught)
    assert (got.false_alarms, got.normal) == (false_alarms, 10)


def test_normal_max_just_above_a_normal_image_that_scores_highest() -> None:
    labels = np.array([False, False, True, False])
    scores = np.array([0.2, 0.7, 0.5, 0.9])
    got = apply_rule(parse_rule("normal-max"), labels, scores)
    assert 0.9 < got.image_threshold <= 0.9 * (1 + 1e-6)
    assert (got.anomalous_caught, got.false_alarms) == (0, 0)


def test_fpr_counts_the_share_as_written() -> None:
    """0.29 x 100 is 28.999999999999996 in binary floats: 29 normal images may be flagged, not 28 (nor 30)."""
    normal = np.arange(100) / 100.0  # 0.00 .. 0.99
    labels = np.r_[np.zeros(100, bool), np.ones(1, bool)]
    scores = np.r_[normal, 2.0]
    got = apply_rule(parse_rule("fpr=0.29"), labels, scores)
    assert got.false_alarms == 29
    assert got.image_threshold == pytest.approx((0.70 + 0.71) / 2, abs=1e-12)  # 0.71 .. 0.99 flagged, 0.70 not


def brute_force(labels: np.ndarray, scores: np.ndarray) -> list[tuple[float, int, int]]:
    """(threshold, true positives, false positives) of every cut, lowest threshold first: halfway between
    neighbouring distinct scores, and just outside both ends."""
    distinct = sorted(set(scores.tolist()))
    cuts = [distinct[0] - 1.0] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [distinct[-1] + 1.0]
    return [
        (
            t,
            sum(1 for s, y in zip(scores, labels) if s > t and y),
            sum(1 for s, y in zip(scores, labels) if s > t and not y),
        )
        for t in cuts
    ]


def best_f1_cut(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """The cut of highest F1 = 2 TP / (TP + FP + anomalous images); ties go to the higher threshold."""
    cuts = brute_force(labels, scores)[:-1]  # flagging nothing has F1 0
    f1 = [2 * tp / (tp + fp + int(labels.sum())) for _, tp, fp in cuts]
    return cuts[max(i for i, v in enumerate(f1) if v == max(f1))]


@pytest.mark.parametrize("seed", range(6))
def test_rules_match_a_brute_force_over_every_cut(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_normal, n_anomalous = int(rng.integers(20, 60)), int(rng.integers(5, 30))
    # Rounded to two decimals, so scores tie within and across the classes.
    scores = np.round(np.r_[rng.normal(0.3, 0.1, n_normal), rng.normal(0.45, 0.15, n_anomalous)], 2)
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    cuts = brute_force(labels, scores)

    def same_cut(got: Outcome, expected: tuple[float, int, int]) -> None:
        t, tp, fp = expected
        assert (got.anomalous_caught, got.false_alarms) == (tp, fp)
        if expected is cuts[0]:  # flag everything: just below the lowest score
            assert scores.min() - 1e-5 < got.image_threshold < scores.min()
        elif expected is cuts[-1]:  # flag nothing: just above the highest score
            assert scores.max() < got.image_threshold < scores.max() + 1e-5
        else:
            assert got.image_threshold == pytest.approx(t, abs=1e-12)

    same_cut(apply_rule(Rule(F1), labels, scores), best_f1_cut(labels, scores))

    for share in ("0", "0.01", "0.05", "0.1", "0.25", "0.5", "0.9"):
        allowed = math.floor(Fraction(share) * n_normal)
        lowest = next(c for c in cuts if c[2] <= allowed)
        got = apply_rule(parse_rule(f"fpr={share}"), labels, scores)
        same_cut(got, lowest)
        assert got.false_alarms <= allowed
    normal_max = apply_rule(Rule(NORMAL_MAX), labels, scores)
    fpr0 = apply_rule(Rule(FPR, 0.0), labels, scores)
    assert normal_max == Outcome(NORMAL_MAX, fpr0.image_threshold, fpr0.anomalous_caught, n_anomalous, 0, n_normal)
    assert normal_max.image_threshold > scores[~labels].max()


def test_outcome_is_the_strict_verdict() -> None:
    got = outcome("x", 0.5, np.array([True, True, False, False]), np.array([0.5, 0.6, 0.5, 0.4]))
    assert (got.anomalous_caught, got.misses, got.false_alarms) == (1, 1, 0)


def test_parse_rule() -> None:
    assert parse_rule("f1") == Rule(F1) and parse_rule(" F1 ") == Rule(F1)
    assert parse_rule("normal-max") == Rule(NORMAL_MAX)
    assert parse_rule("fpr=0.05") == Rule(FPR, 0.05) and parse_rule("fpr=0.05").name == "fpr=0.05"
    assert parse_rule("fpr=0") == Rule(FPR, 0.0)
    assert parse_rule("0.031") == Rule(VALUE, 0.031) and parse_rule("0.031").name == "0.031"
    assert parse_rule("-1e-3") == Rule(VALUE, -0.001)


@pytest.mark.parametrize(
    "text, words",
    [
        ("fpr=2", "0 <= X < 1"),
        ("fpr=1", "0 <= X < 1"),
        ("fpr=-0.1", "0 <= X < 1"),
        ("fpr=", "f1, normal-max"),
        ("fpr=abc", "f1, normal-max"),
        ("garbage", "f1, normal-max"),
        ("", "f1, normal-max"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("fpr=nan", "finite"),
    ],
)
def test_bad_rules_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(ProtoADError) as error:
        parse_rule(text)
    message = str(error.value)
    assert "\n" not in message and "--set-threshold" in message and words in message and repr(text) in message


@pytest.mark.parametrize(
    "text, labels",
    [
        ("f1", [False, False, False]),
        ("f1", [True, True]),
        ("normal-max", [True, True]),
        ("fpr=0.1", [True]),
    ],
)
def test_rules_that_cannot_be_computed_are_refused(text: str, labels: list[bool]) -> None:
    with pytest.raises(ProtoADError) as error:
        apply_rule(parse_rule(text), np.array(labels), np.linspace(0.1, 0.9, len(labels)))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--set-threshold {text} needs")


# --- writing into a bundle ------------------------------------------------------------------------


@pytest.fixture
def bundle(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle (the session fixture is shared), sealed as a build seals it: its .onnx."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    for suffix in (".onnx", ".json", ".prototypes.npy"):
        shutil.copy(tiny_model.with_name("tiny" + suffix), folder / ("tiny" + suffix))
    sealed = Bundle(folder / "tiny")
    sealed.seal(ModelInfo.load_json(sealed.sidecar)).save_json(sealed.sidecar)
    return folder / "tiny.onnx"


def chosen(threshold: float) -> Outcome:
    return Outcome("0.5", threshold, 3, 6, 1, 4)


def test_write_keeps_history_and_pixel_threshold(bundle: Path) -> None:
    sidecar = bundle.with_suffix(".json")
    built = ModelInfo.load_json(sidecar)
    first = write_threshold(bundle, chosen(0.5), "the test split")
    second = write_threshold(bundle, chosen(0.25), "the test split")
    info = ModelInfo.load_json(sidecar)
    assert (first.sidecar, first.created, second.old.image_threshold) == (sidecar, False, 0.5)
    assert info.image_threshold == 0.25 and info.pixel_threshold == built.pixel_threshold
    assert info.threshold_rule == "manual"  # a number: the name every record carries
    assert info.threshold_detail.startswith("image: 0.5 (--set-threshold) on the test split: flags 3/6 anomalous")
    keys = ("image_threshold", "pixel_threshold", "threshold_rule", "threshold_detail")
    old = [{k: h[k] for k in keys} for h in info.threshold_history]
    assert old == [
        {
            "image_threshold": built.image_threshold,
            "pixel_threshold": built.pixel_threshold,
            "threshold_rule": built.threshold_rule,
            "threshold_detail": built.threshold_detail,
        },
        {
            "image_threshold": 0.5,
            "pixel_threshold": built.pixel_threshold,
            "threshold_rule": "manual",
            "threshold_detail": first.new.threshold_detail,
        },
    ]
    named = write_threshold(bundle, Outcome("f1", 0.5, 3, 6, 1, 4), "the test split")
    assert named.new.threshold_rule == "f1@test-split" and named.new.digests == built.digests
    for entry in info.threshold_history:
        assert datetime.fromisoformat(entry["replaced"]).tzinfo is not None
    # Everything but the thresholds and the version is the build's (its digests too), so the runtime still accepts
    # the pair; each threshold set is a new version, the ones it replaced kept beside the bundle (versions.py).
    keep = {
        k: v
        for k, v in built.to_dict().items()
        if not k.startswith("threshold") and k not in ("image_threshold", "version", "changes")
    }
    assert {k: info.to_dict()[k] for k in keep} == keep and set(built.digests) == {"onnx", "prototypes"}
    assert (info.version, [(c["what"], c["from"]) for c in info.changes]) == (
        3,
        [("set-threshold", 1), ("set-threshold", 2)],
    )
    assert sorted(p.name for p in bundle.parent.iterdir()) == [
        "tiny.json",
        "tiny.onnx",
        "tiny.prototypes.npy",
        "tiny.versions",
    ]


def test_failed_write_leaves_the_old_file(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = bundle.with_suffix(".json")
    before = sidecar.read_bytes()

    def crash(fd: int) -> None:  # the new text is in the temporary file, not yet in place
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_threshold(bundle, chosen(0.5), "the test split")
    assert sidecar.read_bytes() == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == [
        "tiny.json",
        "tiny.onnx",
        "tiny.prototypes.npy",
        "tiny.versions",
    ]  # the version in force, kept


def test_bundle_without_sidecar_gets_one_from_the_onnx_metadata(bundle: Path) -> None:
    from protoad_edge.runtime.backends.ort import OrtBackend

    sidecar = bundle.with_suffix(".json")
    built = ModelInfo.load_json(sidecar)
    sidecar.unlink()
    change = write_threshold(bundle, chosen(0.5), "the test split")
    assert change.created and change.sidecar == sidecar and change.old.image_threshold == built.image_threshold
    info = ModelInfo.load_json(sidecar)
    assert info.image_threshold == 0.5
    assert info.threshold_history[0]["image_threshold"] == built.image_threshold
    assert info.digests == built.digests  # the new sidecar records the files beside it
    assert OrtBackend(bundle, providers=["CPUExecutionProvider"]).info.image_threshold == 0.5  # in force


# --- protoad-eval and protoad-run on demo images --------------------------------------------------


CATEGORY = "parts"
TEST_SPLIT = {"test/good": 4, "test/scratch": 2, "test/spot": 2, "test/crack": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout category of demo images (as in test_eval)."""
    root = tmp_path_factory.mktemp("data")
    write_demo_category(root, CATEGORY, {"train/good": 2, **TEST_SPLIT})
    return root


# How far eval's batched scores and protoad-run's one-at-a-time scores of the same image may differ.
SCORE_NOISE = 1e-6


@pytest.fixture(scope="module")
def flat_images(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same test images in one folder for protoad-run, named DEFECT_INDEX.png."""
    folder = tmp_path_factory.mktemp("flat")
    for image in (data_root / CATEGORY / "test").glob("*/*.png"):
        shutil.copy(image, folder / f"{image.parent.name}_{image.name}")
    return folder


def run_eval(*args: object) -> Result:
    return CliRunner().invoke(eval_main, [str(a) for a in args])


def printed_rules(stdout: str) -> dict[str, list[str]]:
    """The threshold table of the eval summary: rule -> [threshold, caught, misses, false alarms]."""
    lines = stdout.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.split() == ["rule", "threshold", "caught", "misses", "false", "alarms"]
    )
    rows = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if len(cells) != 5:
            break
        rows[cells[0]] = cells[1:]
    return rows


def run_scores(model: Path, folder: Path) -> tuple[Result, np.ndarray, np.ndarray, np.ndarray]:
    """protoad-run over ``folder`` with JSON lines on stdout: (result, labels, scores, verdicts)."""
    result = CliRunner().invoke(run_main, [str(folder), "--model", str(model), "--backend", "ort", "--jsonl", "-"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    labels = np.array([not Path(r["source"]).name.startswith("good_") for r in records])
    return (
        result,
        labels,
        np.array([r["score"] for r in records]),
        np.array([r["verdict"] == "anomaly" for r in records]),
    )


@pytest.mark.slow
def test_set_threshold_f1_is_what_protoad_run_applies(
    bundle: Path, data_root: Path, flat_images: Path, tmp_path: Path
) -> None:
    """The acceptance check: eval prints a threshold and its counts, writes it, and the run agrees exactly."""
    from protoad_edge.runtime.backends.registry import open_backend
    from protoad_edge.runtime.loop import RunOptions, run

    report = tmp_path / "eval.json"
    result = run_eval(
        "--model",
        bundle,
        "--any-category",
        "--category",
        CATEGORY,
        "--data-root",
        data_root,
        "--backend",
        "ort",
        "--set-threshold",
        "f1",
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())["categories"][CATEGORY]
    f1 = next(r for r in summary["threshold_rules"] if r["rule"] == "f1")
    threshold = ModelInfo.load_json(bundle.with_suffix(".json")).image_threshold
    assert threshold == f1["image_threshold"]
    assert printed_rules(result.stdout)["f1"] == [
        f"{threshold:.6g}",
        f"{f1['anomalous_caught']}/6",
        str(f1["misses"]),
        f"{f1['false_alarms']}/4",
    ]
    assert summary["set_threshold"]["new"]["image_threshold"] == threshold

    run_result, labels, scores, verdicts = run_scores(bundle, flat_images)
    assert (labels.sum(), (~labels).sum()) == (6, 4)
    assert f"(score > {threshold:.5f})" in run_result.stderr
    assert int((verdicts & labels).sum()) == f1["anomalous_caught"]
    assert int((~verdicts & labels).sum()) == f1["misses"]
    assert int((verdicts & ~labels).sum()) == f1["false_alarms"]
    # The written threshold is the F1-optimal cut of the run's own scores, found here by brute force. The run
    # infers one image at a time, eval in batches: scores differ by ~1e-7, far less than the gaps between them.
    assert threshold == pytest.approx(best_f1_cut(labels, scores)[0], abs=SCORE_NOISE)
    with open_backend(bundle, "ort") as opened:
        assert run(str(flat_images), opened, RunOptions(log=lambda message: None)).threshold == threshold


def test_summary_shows_every_rule_and_a_given_number(
    bundle: Path, data_root: Path, flat_images: Path, tmp_path: Path
) -> None:
    _, labels, scores, _ = run_scores(bundle, flat_images)  # the same images, scored by protoad-run
    number = float(np.median(scores))
    report = tmp_path / "eval.json"
    result = run_eval(
        "--model",
        bundle,
        "--any-category",
        "--category",
        CATEGORY,
        "--data-root",
        data_root,
        "--json",
        report,
        "--set-threshold",
        repr(number),
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["categories"][CATEGORY]["threshold_rules"]
    assert [r["rule"] for r in rows] == ["current", "f1", "normal-max", "fpr=0.01", "fpr=0.05", repr(number)]
    built = ModelInfo.load_json(bundle.with_suffix(".json")).threshold_history[-1]["image_threshold"]
    cuts = brute_force(labels, scores)
    lowest_without_alarm = next(c for c in cuts if c[2] == 0)[0]
    expected = {
        "current": built,
        "f1": best_f1_cut(labels, scores)[0],
        "normal-max": lowest_without_alarm,
        "fpr=0.01": lowest_without_alarm,
        "fpr=0.05": lowest_without_alarm,  # of 4 normal images: none
        repr(number): number,
    }
    printed = printed_rules(result.stdout)
    for row in rows:
        t = row["image_threshold"]
        assert t == pytest.approx(expected[row["rule"]], abs=SCORE_NOISE), row
        caught = int(((scores > t) & labels).sum())
        false_alarms = int(((scores > t) & ~labels).sum())
        assert (row["anomalous_caught"], row["misses"], row["false_alarms"]) == (caught, 6 - caught, false_alarms)
        assert printed[row["rule"]] == [f"{t:.6g}", f"{caught}/6", str(6 - caught), f"{false_alarms}/4"]
    assert f"set threshold {number!r}: image {built:.6g} -> {number:.6g}" in result.stdout
    assert str(bundle.with_suffix(".json")) in result.stdout


def test_set_threshold_refusals_are_one_line(bundle: Path, data_root: Path) -> None:
    sidecar = bundle.with_suffix(".json")
    before = sidecar.read_bytes()
    base = ["--model", bundle, "--category", CATEGORY, "--data-root", data_root]
    for rule, words in (("fpr=2", "0 <= X < 1"), ("garbage", "f1, normal-max"), ("inf", "finite")):
        assert_user_error(run_eval(*base, "--set-threshold", rule), "--set-threshold", words)
    assert_user_error(
        run_eval(*base, "--set-threshold", "f1", "--compare", "torch,ort"), "--set-threshold", "--compare"
    )
    assert_user_error(
        run_eval("--model", bundle.parent, "--category", "all", "--data-root", data_root, "--set-threshold", "f1"),
        "--set-threshold",
        "all",
    )
    assert sidecar.read_bytes() == before


def assert_user_error(result: Result, *words: str) -> None:
    """Exit 2, exactly one line on stderr naming the culprit, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
