"""protoad-eval: the paper's tables, bundle files per backend, and the CLI on demo images, its
printed and JSON metrics checked against scikit-learn on maps computed here independently."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import write_demo_category
from PIL import Image
from sklearn.metrics import roc_auc_score

from protoad_edge.bundle import Bundle
from protoad_edge.cli.eval import main
from protoad_edge.errors import ProtoADError
from protoad_edge.evaluation.paper import METRICS, comparison_rows, paper_dataset
from protoad_edge.metadata import ModelInfo
from protoad_edge.metrics import pro_area, pro_curve
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.base import BackendOptions

TEXTURES = {"carpet", "grid", "leather", "tile", "wood"}
OBJECTS = {"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"}


# --- the paper's numbers ---------------------------------------------------------------------


def test_mvtec_tables_hold_fifteen_categories_and_their_printed_means() -> None:
    mvtec = paper_dataset("mvtec")
    assert mvtec is not None
    assert set(mvtec.groups["texture"]) == TEXTURES and set(mvtec.groups["object"]) == OBJECTS
    assert {m: mvtec.metrics[m].table for m in METRICS} == {
        "pixel_auroc": "Table 1",
        "pro": "Table 2",
        "image_auroc": "Table 3",
    }
    for metric in METRICS:
        table = mvtec.metrics[metric]
        assert set(table.categories) == TEXTURES | OBJECTS
        assert all(0.85 < v <= 1.0 for v in table.categories.values())
        for group, members in (("texture", TEXTURES), ("object", OBJECTS), ("all", TEXTURES | OBJECTS)):
            mean = np.mean([table.categories[c] for c in members])
            assert abs(mean - table.means[group]) <= 0.001 + 1e-9, (metric, group)  # 0.1 percentage point
    # The headline figures (Table 4, FACTS): image AUROC, pixel AUROC, PRO.
    assert [mvtec.metrics[m].means["all"] for m in ("image_auroc", "pixel_auroc", "pro")] == pytest.approx(
        [0.977, 0.972, 0.936]
    )


def test_btad_table_8() -> None:
    btad = paper_dataset("btad")
    assert btad is not None and paper_dataset("folder") is None
    assert set(btad.metrics) == {"image_auroc", "pixel_auroc"}
    for metric, printed in (("image_auroc", 0.940), ("pixel_auroc", 0.970)):
        table = btad.metrics[metric]
        assert table.table == "Table 8" and set(table.categories) == {"01", "02", "03"}
        assert table.means["all"] == pytest.approx(printed)
        assert abs(np.mean(list(table.categories.values())) - printed) <= 0.001 + 1e-9


def test_comparison_rows_group_like_the_paper() -> None:
    mvtec = paper_dataset("mvtec")
    assert mvtec is not None
    ours = {c: {m: mvtec.value(m, c) for m in METRICS} for c in TEXTURES | OBJECTS}
    rows = comparison_rows("mvtec", ours)
    means = {r.label: r for r in rows if r.is_mean}
    assert [r.label for r in rows[:5]] == mvtec.groups["texture"]  # the paper's order
    assert list(means) == ["texture", "object", "all"]
    for group, row in means.items():
        for m in METRICS:
            assert row.paper[m] == mvtec.metrics[m].means[group]  # printed mean
            assert abs(row.ours[m] - row.paper[m]) <= 0.001 + 1e-9
    partial = comparison_rows(
        "mvtec",
        {
            "bottle": {"image_auroc": 0.5, "pixel_auroc": 0.6, "pro": None},
            "screw": {"image_auroc": 0.7, "pixel_auroc": 0.8, "pro": None},
            "demo": {"image_auroc": 0.1, "pixel_auroc": 0.2, "pro": 0.3},
        },
    )
    labels = [r.label for r in partial]
    assert labels == ["bottle", "screw", "demo", "object, 2 of 10", "all, 2 of 15"]
    obj = partial[3]
    assert obj.ours["image_auroc"] == pytest.approx(0.6) and obj.ours["pro"] is None
    assert obj.paper["image_auroc"] == pytest.approx((0.999 + 0.949) / 2)  # same categories, not the printed mean
    alone = comparison_rows("folder", {"widget": {"image_auroc": 0.9, "pixel_auroc": None, "pro": None}})
    assert [(r.label, r.is_mean) for r in alone] == [("widget", False), ("all", True)]


# --- the CLI on demo images -------------------------------------------------------------------


CATEGORY = "parts"
TEST_SPLIT = {"test/good": 4, "test/scratch": 2, "test/spot": 2, "test/crack": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout category of demo images, plus 'nolabels' whose test split is all normal."""
    root = tmp_path_factory.mktemp("data")
    write_demo_category(root, CATEGORY, {"train/good": 2, **TEST_SPLIT})
    write_demo_category(root, "nolabels", {"train/good": 2, "test/good": TEST_SPLIT["test/good"]})
    return root


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result: Result, *words: str) -> None:
    """Exit 2, exactly one line on stderr naming the culprit, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]


def independent_maps(model: Path, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, masks, maps) of the test split, read and run here without protoad-eval's code paths."""
    from protoad_edge.runtime.backends.ort import OrtBackend

    backend = OrtBackend(model, providers=["CPUExecutionProvider"])
    pre = backend.info.preprocess
    labels, masks, crops = [], [], []
    for image in sorted((root / CATEGORY / "test").glob("*/*.png")):
        defect = image.parent.name
        labels.append(defect != "good")
        crops.append(pre(np.asarray(Image.open(image).convert("RGB"))))
        mask_file = root / CATEGORY / "ground_truth" / defect / f"{image.stem}_mask.png"
        masks.append(
            pre.mask(np.asarray(Image.open(mask_file))) if defect != "good" else np.zeros((pre.crop,) * 2, bool)
        )
    maps = backend.infer(to_batch(np.stack(crops)))[0]
    return np.array(labels), np.stack(masks), maps


def test_eval_metrics_json_and_pictures(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "pictures", tmp_path / "eval.json"
    result = run(
        "--model",
        tiny_model,
        "--category",
        CATEGORY,
        "--any-category",
        "--data-root",
        data_root,
        "--json",
        report,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "was built for category 'tiny'" in result.stderr  # the tiny bundle is not a demo model

    labels, masks, maps = independent_maps(tiny_model, data_root)
    expected = {
        "image_auroc": roc_auc_score(labels, maps.reshape(len(maps), -1).max(axis=1)),
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
        "pro": pro_area(*pro_curve(masks, maps)[:2]),
    }
    data = json.loads(report.read_text())
    got = data["categories"][CATEGORY]
    assert got["images"] == {"normal": 4, "anomalous": 6, "anomalous_with_mask": 6}
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value, abs=1e-6), metric
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith(CATEGORY + " "))
    assert row == [
        CATEGORY,
        f"{100 * expected['image_auroc']:.1f}",
        "-",
        f"{100 * expected['pixel_auroc']:.1f}",
        "-",
        f"{100 * expected['pro']:.1f}",
        "-",
    ]
    t = got["thresholds"]
    assert t["anomalous_caught"] == int((maps[labels].reshape(6, -1).max(axis=1) > t["image_threshold"]).sum())
    assert t["false_alarms"] == int((maps[~labels].reshape(4, -1).max(axis=1) > t["image_threshold"]).sum())
    assert data["mode"] == "evaluate" and data["skipped"] == {}

    pictures = sorted(p.name for p in out.iterdir())
    assert pictures == [f"{CATEGORY}.{kind}.png" for kind in ("cases", "pro", "roc")]  # nothing temporary left behind
    for name in pictures:
        raw = (out / name).read_bytes()
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(out / name) as im:
            im.load()
            assert im.width >= 600 and im.height >= 400


@pytest.mark.slow
def test_compare_torch_and_ort(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    report = tmp_path / "compare.json"
    result = run(
        "--model",
        tiny_model,
        "--category",
        CATEGORY,
        "--any-category",
        "--data-root",
        data_root,
        "--compare",
        "torch,ort",
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(report.read_text())["comparisons"][CATEGORY]["backends"]
    assert (
        runs["torch"]["backend"] == "torch (cpu, fp32)" and runs["ort"]["backend"] == "ort (CPUExecutionProvider, fp32)"
    )
    assert runs["ort"]["max_abs_map_difference"] <= 1e-4
    assert runs["ort"]["max_abs_score_difference"] <= 1e-4
    assert runs["ort"]["spearman_image_scores"] > 0.99
    # Image AUROC may move by a pair: the tiny random model scores every image within a few 1e-3.
    for metric in ("pixel_auroc", "pro"):
        assert runs["ort"][metric] == pytest.approx(runs["torch"][metric], abs=1e-3)
    assert "max|map-torch|" in result.stdout


@pytest.mark.slow
def test_compare_reference_is_the_bundles_pytorch_network(tiny_model: Path, data_root: Path) -> None:
    """The reference of a comparison is the PyTorch network rebuilt here from the bundle's files by hand."""
    torch = pytest.importorskip("torch")
    from protoad_edge.builder.features import PatchFeatures, build_backbone
    from protoad_edge.builder.network import ProtoADNet
    from protoad_edge.evaluation.evaluate import compare_backends
    from protoad_edge.metadata import ModelInfo

    comparison = compare_backends(
        tiny_model,
        CATEGORY,
        ["torch", "ort"],
        data_root=data_root,
        options=BackendOptions(device="cpu"),
        any_category=True,
    )
    info = ModelInfo.load_json(tiny_model.with_suffix(".json"))
    prototypes = torch.from_numpy(np.load(tiny_model.with_name("tiny.prototypes.npy")))
    net = ProtoADNet(
        PatchFeatures(build_backbone("none", info.seed)[0], info.crop, info.feature_upsample), prototypes, info.crop
    ).eval()
    labels, _, ort_maps = independent_maps(tiny_model, data_root)
    pre = info.preprocess
    crops = [
        pre(np.asarray(Image.open(p).convert("RGB"))) for p in sorted((data_root / CATEGORY / "test").glob("*/*.png"))
    ]
    with torch.no_grad():
        expected = net(torch.from_numpy(to_batch(np.stack(crops))))[0][:, 0].numpy()
    torch_run, ort_run = comparison.runs
    assert np.abs(torch_run.maps - expected).max() <= 1e-6
    assert np.abs(ort_run.maps - ort_maps).max() <= 1e-6
    assert comparison.max_map_difference(ort_run) == pytest.approx(float(np.abs(ort_maps - expected).max()), abs=1e-6)
    assert comparison.test.labels.tolist() == labels.tolist()


@pytest.mark.slow
def test_compare_two_bundles_side_by_side(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    """ort@FILE: another network (here other prototypes; in use the projected one) on the same images, each
    bundle's figures its own evaluation's."""
    from conftest import make_bundle

    from protoad_edge.evaluation.evaluate import evaluate_category

    other = make_bundle(tmp_path / "other", name="tiny", k=24, seed=1)
    report = tmp_path / "two.json"
    result = run(
        "--model",
        tiny_model,
        "--category",
        CATEGORY,
        "--any-category",
        "--data-root",
        data_root,
        "--compare",
        f"ort,ort@{other}",
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(report.read_text())["comparisons"][CATEGORY]["backends"]
    assert list(runs) == ["ort", f"ort@{other}"]
    alone = evaluate_category(other, CATEGORY, data_root=data_root, any_category=True).summary()
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        assert runs[f"ort@{other}"][metric] == pytest.approx(alone[metric], abs=1e-9)
    assert runs[f"ort@{other}"]["max_abs_map_difference"] > 1e-3  # a different network, not the same one twice
    assert runs[f"ort@{other}"]["accuracy_gate"] is None  # full precision: not the gate's to judge
    wider = make_bundle(tmp_path / "wider", name="tiny", crop=80, resize=96)
    assert_user_error(
        run(
            "--model",
            tiny_model,
            "--category",
            CATEGORY,
            "--any-category",
            "--data-root",
            data_root,
            "--compare",
            f"ort,ort@{wider}",
        ),
        "preprocessing",
    )
    assert_user_error(
        run(
            "--model",
            tiny_model,
            "--category",
            CATEGORY,
            "--any-category",
            "--data-root",
            data_root,
            "--compare",
            f"ort,ort@{tmp_path / 'gone.onnx'}",
        ),
        "gone.onnx after @ is not a bundle file",
    )


def test_all_categories_table(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for category in (CATEGORY, "nolabels"):
        shutil.copy(tiny_model, models / f"{category}.onnx")
    report = tmp_path / "all.json"
    result = run("--model", models, "--category", "all", "--data-root", data_root, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert list(data["categories"]) == [CATEGORY]
    assert "no labelled test split" in data["skipped"]["nolabels"]
    assert [r["label"] for r in data["table"]] == [CATEGORY, "all"]
    assert "skipped nolabels" in result.stderr
    table = result.stdout[result.stdout.index("category") :].splitlines()
    assert table[0].split() == ["category", "image", "AUROC", "paper", "pixel", "AUROC", "paper", "PRO", "paper"]
    assert [line.split()[0] for line in table[1:] if line and not line.startswith(("-", "wrote"))] == [CATEGORY, "all"]


def test_bad_inputs_are_one_line(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    base = ["--category", CATEGORY, "--data-root", data_root, "--any-category"]
    assert_user_error(run("--model", tmp_path / "nope.onnx", *base), "nope.onnx")
    assert_user_error(
        run("--model", tiny_model, "--category", "nolabels", "--data-root", data_root, "--any-category"),
        "no labelled test split",
    )
    assert_user_error(
        run("--model", tiny_model, "--category", "pumpkin", "--data-root", data_root, "--any-category"), "pumpkin"
    )
    assert_user_error(run("--model", tiny_model, *base, "--compare", "torch"), "--compare")
    assert_user_error(run("--model", tiny_model, *base, "--compare", "ort,onnx"), "--compare")
    assert_user_error(run("--model", tiny_model, *base, "--backend", "trt"), "tiny.plan")
    assert_user_error(run("--model", tiny_model, "--category", "all", "--data-root", data_root), "folder")
    assert_user_error(run("--model", tiny_model, *base, "--compare", "torch,ort", "--out", tmp_path), "--out")
    bad = run("--model", tiny_model, *base, "--backend", "tensorflow")
    assert bad.exit_code == 2 and "Traceback" not in bad.output  # click's own usage error


@pytest.mark.gpu
def test_torch_backend_fp16_on_gpu(tiny_model: Path, data_root: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from protoad_edge.builder.torch_backend import TorchBackend

    labels, _, ort_maps = independent_maps(tiny_model, data_root)
    gpu = TorchBackend(tiny_model.with_suffix(".json"), BackendOptions(device="cuda"))
    assert gpu.describe().precision == "fp16"
    pre = gpu.info.preprocess
    crops = [
        pre(np.asarray(Image.open(p).convert("RGB"))) for p in sorted((data_root / CATEGORY / "test").glob("*/*.png"))
    ]
    maps, scores = gpu.infer(to_batch(np.stack(crops)))
    assert np.isfinite(maps).all()
    assert np.abs(maps - ort_maps).max() < 5e-3
    assert np.array_equal(scores, maps.reshape(len(maps), -1).max(axis=1))


def test_a_bundle_of_another_category_is_refused(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    """It once printed a note, exited 0 and reported AUROC near 50: a weak model, as far as anyone could tell."""
    from protoad_edge.evaluation.evaluate import compare_backends, evaluate_category

    for suffix in (".onnx", ".json", ".prototypes.npy"):  # a private copy: --set-threshold would write into it
        shutil.copy(tiny_model.with_name("tiny" + suffix), tmp_path / ("tiny" + suffix))
    bundle = Bundle(tmp_path / "tiny")  # sealed as a build leaves it: the refusal is the only line
    bundle.seal(ModelInfo.load_json(bundle.sidecar)).save_json(bundle.sidecar)
    model, sidecar = tmp_path / "tiny.onnx", (tmp_path / "tiny.json").read_text()
    for extra in ([], ["--compare", "torch,ort"], ["--set-threshold", "f1"]):
        result = run("--model", model, "--category", CATEGORY, "--data-root", data_root, *extra)
        assert_user_error(
            result,
            f"{tmp_path}/tiny.",
            "was built for category 'tiny', not 'parts'",
            "--category tiny",
            "--any-category",
        )
    assert (tmp_path / "tiny.json").read_text() == sidecar
    with pytest.raises(ProtoADError, match="built for category 'tiny', not 'parts'"):
        evaluate_category(model, CATEGORY, data_root=data_root)
    with pytest.raises(ProtoADError, match="built for category 'tiny', not 'parts'"):
        compare_backends(model, CATEGORY, ["ort", "torch"], data_root=data_root)


def test_a_category_folder_as_the_data_root_names_its_parent(tiny_model: Path, data_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / f"{CATEGORY}.onnx")
    for category, model in ((CATEGORY, models), ("all", models)):
        result = run("--model", model, "--category", category, "--data-root", data_root / CATEGORY)
        assert_user_error(
            result,
            f"--data-root {data_root / CATEGORY} is itself a category folder",
            f"pass the folder above it, --data-root {data_root}",
        )


def test_threads_0_means_every_core(tiny_model: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from protoad_edge.evaluation import evaluate

    seen: list[BackendOptions] = []

    def evaluate_category(*args: object, options: BackendOptions, **kwargs: object) -> None:
        seen.append(options)
        raise ProtoADError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_category", evaluate_category)
    for given in ([], ["--threads", "0"], ["--threads", "3"]):
        run("--model", tiny_model, "--category", CATEGORY, "--data-root", data_root, *given)
    assert [o.threads for o in seen] == [os.cpu_count(), os.cpu_count(), 3]
