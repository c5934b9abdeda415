"""The projection before the prototype stage (``protoad-export --project-dims``, issue 18): the fit, the
network's math, its ONNX and FP16 graphs, the bundle it is written to and the side-by-side summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from conftest import TINY_CROP, TINY_RESIZE, normal_crops, write_demo_category  # noqa: E402

from protoad_edge.builder.features import PatchFeatures, build_backbone  # noqa: E402
from protoad_edge.builder.network import L2Norm, ProtoADNet  # noqa: E402
from protoad_edge.builder.projection import (  # noqa: E402
    FittedProjection,
    check_dims,
    fit_projection,
    load_projection,
    sample_rows,
)
from protoad_edge.builder.torch_backend import load_torch_network  # noqa: E402
from protoad_edge.bundle import Bundle  # noqa: E402
from protoad_edge.cli.export import main as export_main  # noqa: E402
from protoad_edge.constants import BACKBONE, FP32_SCOPE  # noqa: E402
from protoad_edge.errors import ProtoADError  # noqa: E402
from protoad_edge.export.fp16 import convert_to_mixed_fp16  # noqa: E402
from protoad_edge.export.onnx import export_onnx, onnx_parity  # noqa: E402
from protoad_edge.metadata import ModelInfo  # noqa: E402
from protoad_edge.preprocess import to_batch  # noqa: E402
from protoad_edge.runtime.backends.ort import OrtBackend  # noqa: E402

K, D = 48, 12
FP16_TOLERANCE = 5e-3  # the bound for the FP16 graph's maps against FP32


# --- the fit ---------------------------------------------------------------------------------------


def offset_rows(n: int = 200, c: int = 40, seed: int = 0) -> np.ndarray:
    """Rows with a large common offset and one dominant direction of spread: centred and uncentred PCA differ."""
    rng = np.random.default_rng(seed)
    spread = np.linspace(3.0, 0.1, c)
    return (10.0 * np.ones(c) + rng.normal(size=(n, c)) * spread).astype(np.float32)


def subspace(matrix: np.ndarray) -> np.ndarray:
    """The orthogonal projector onto the row space of ``matrix`` (independent of basis and signs)."""
    q, _ = np.linalg.qr(np.asarray(matrix, np.float64).T)
    return q @ q.T


def test_centred_fit_is_the_pca_of_the_rows() -> None:
    rows = offset_rows()
    fit = fit_projection(rows, 5, centred=True)
    np.testing.assert_allclose(fit.mean, rows.mean(axis=0), rtol=1e-6)
    assert fit.matrix.shape == (5, 40) and fit.matrix.dtype == np.float32 and fit.dims == 5
    np.testing.assert_allclose(fit.matrix @ fit.matrix.T, np.eye(5), atol=1e-5)
    centred = rows.astype(np.float64) - rows.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(subspace(fit.matrix), subspace(vt[:5]), atol=1e-4)  # float32 products
    # Largest direction first: each row's share of the variance, in order.
    shares = ((centred @ fit.matrix.T.astype(np.float64)) ** 2).sum(axis=0)
    np.testing.assert_allclose(shares, s[:5] ** 2, rtol=1e-4)
    assert fit.variance_kept == pytest.approx((s[:5] ** 2).sum() / (s**2).sum(), rel=1e-6)
    assert fit.record == {
        "dims": 5,
        "centred": True,
        "fitted_on": "patch vectors",
        "rows": 200,
        "variance_kept": round(fit.variance_kept, 6),
    }


def test_uncentred_fit_keeps_the_offset_direction() -> None:
    rows = offset_rows()
    fit = fit_projection(rows, 5, centred=False)
    assert not fit.mean.any() and fit.record["centred"] is False
    _, _, vt = np.linalg.svd(rows.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(subspace(fit.matrix), subspace(vt[:5]), atol=1e-4)  # float32 products
    # The common offset is the uncentred fit's first direction, and no direction of the centred one.
    offset = np.ones(40) / np.sqrt(40)
    assert abs(fit.matrix[0] @ offset) > 0.99
    assert abs(fit_projection(rows, 1, centred=True).matrix[0] @ offset) < 0.5


def test_fit_is_deterministic_and_the_directions_have_a_fixed_sign() -> None:
    rows = offset_rows()
    a, b = fit_projection(rows, 5), fit_projection(rows.copy(), 5)
    assert np.array_equal(a.matrix, b.matrix) and np.array_equal(a.mean, b.mean)
    assert (a.matrix[np.arange(5), np.abs(a.matrix).argmax(axis=1)] > 0).all()


@pytest.mark.parametrize(
    "dims, expected",
    [
        (0, "between 1 and 1791"),
        (1792, "between 1 and 1791"),
        (2000, "between 1 and 1791"),
        (49, "more than the 48 patch vectors"),
    ],
)
def test_impossible_dims_name_the_flag(dims: int, expected: str) -> None:
    rows = np.random.default_rng(0).normal(size=(48, 1792)).astype(np.float32)
    with pytest.raises(ProtoADError, match="--project-dims") as err:
        fit_projection(rows, dims)
    assert expected in str(err.value)


@pytest.mark.slow
def test_dims_are_at_most_the_prototypes() -> None:
    check_dims(48, prototypes=48)
    with pytest.raises(ProtoADError, match=r"bad --project-dims 49: more than the 48 prototypes .*--max-prototypes"):
        check_dims(49, prototypes=48)
    rows = np.random.default_rng(0).normal(size=(48, 1792)).astype(np.float32)
    fit = fit_projection(rows, 48)
    np.testing.assert_allclose(fit.matrix @ fit.matrix.T, np.eye(48), atol=1e-5)


def test_sample_is_seeded_in_file_order_and_all_rows_when_few() -> None:
    rows = np.arange(1000, dtype=np.float32)[:, None]
    a, b = sample_rows(rows, 100, seed=3), sample_rows(rows, 100, seed=3)
    assert a.shape == (100, 1) and np.array_equal(a, b) and (np.diff(a[:, 0]) > 0).all()
    assert not np.array_equal(a, sample_rows(rows, 100, seed=4))
    assert np.array_equal(sample_rows(rows, 5000), rows)


# --- the network ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(torch_threads: None) -> tuple[PatchFeatures, np.ndarray, FittedProjection, np.ndarray]:
    """Random-weight features at the tiny crop, K real normalised patch vectors as prototypes, their PCA to D,
    and a batch of other crops."""
    backbone, _ = build_backbone("none", 0)
    features = PatchFeatures(backbone, TINY_CROP, "bilinear").eval()
    with torch.no_grad():
        f = L2Norm()(features(torch.from_numpy(to_batch(normal_crops(6, TINY_CROP)))))
    vectors = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()
    prototypes = vectors[np.random.default_rng(0).choice(len(vectors), K, replace=False)]
    fit = fit_projection(prototypes, D, fitted_on="prototypes")
    return features, prototypes, fit, to_batch(normal_crops(3, TINY_CROP, seed=5))


def projected_net(parts: tuple, fit: FittedProjection | None = None) -> ProtoADNet:
    features, prototypes, default_fit, _ = parts
    fit = fit or default_fit
    return ProtoADNet(features, torch.from_numpy(prototypes), TINY_CROP, projection=fit.module()).eval()


def numpy_patch_scores(raw: np.ndarray, prototypes: np.ndarray, fit: FittedProjection) -> np.ndarray:
    """1 - max cosine in the projected space, written out: normalise, centre, project, normalise, and the
    same for the prototypes. ``raw`` [N,C,h,w] features -> [N,h,w]."""
    x = raw.astype(np.float64).transpose(0, 2, 3, 1)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = (x - fit.mean) @ fit.matrix.T.astype(np.float64)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    q = (prototypes.astype(np.float64) - fit.mean) @ fit.matrix.T.astype(np.float64)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return 1.0 - (y @ q.T).max(axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("centred", [True, False])
def test_projected_network_is_the_numpy_computation(parts: tuple, centred: bool) -> None:
    features, prototypes, _, batch = parts
    fit = fit_projection(prototypes, D, centred=centred, fitted_on="prototypes")
    net = projected_net(parts, fit)
    assert net.projection is not None and net.projection.dims == D
    x = torch.from_numpy(batch)
    with torch.no_grad():
        raw = features(x).numpy()
        ours = net.patch_scores(x)[:, 0].numpy()
    expected = numpy_patch_scores(raw, prototypes, fit)
    assert np.abs(ours - expected).max() < 1e-5
    # The figure differs from the unprojected network's, and from the projection without its centring:
    # the comparison above could tell them apart.
    with torch.no_grad():
        paper = ProtoADNet(features, torch.from_numpy(prototypes), TINY_CROP).eval().patch_scores(x)[:, 0].numpy()
    assert np.abs(paper - expected).max() > 1e-2
    if centred:
        uncentred = FittedProjection(np.zeros_like(fit.mean), fit.matrix, False, "prototypes", K, 0.0)
        assert np.abs(numpy_patch_scores(raw, prototypes, uncentred) - expected).max() > 1e-2


def test_prototypes_are_projected_and_normalised_in_the_network(parts: tuple) -> None:
    _, prototypes, fit, _ = parts
    net = projected_net(parts)
    kernels = torch.cat(list(net.prototypes.blocks)).detach().numpy()
    assert kernels.shape == (K, D)
    expected = (prototypes.astype(np.float64) - fit.mean) @ fit.matrix.T.astype(np.float64)
    np.testing.assert_allclose(kernels, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_without_projection_the_network_is_unchanged(parts: tuple) -> None:
    features, prototypes, _, batch = parts
    net = ProtoADNet(features, torch.from_numpy(prototypes), TINY_CROP).eval()
    assert net.projection is None and isinstance(net.l2norm, L2Norm)
    assert torch.cat(list(net.prototypes.blocks)).shape == (K, 1792)


# --- ONNX and FP16 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def projected_onnx(parts: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    info = ModelInfo(
        category="proj",
        resize=TINY_RESIZE,
        crop=TINY_CROP,
        backbone=BACKBONE,
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=K,
        image_threshold=0.0,
        pixel_threshold=0.0,
        projection=parts[2].record,
    )
    return export_onnx(projected_net(parts), info, tmp_path_factory.mktemp("proj") / "proj.onnx")


@pytest.mark.slow
def test_exported_projected_network_equals_pytorch(parts: tuple, projected_onnx: Path) -> None:
    assert onnx_parity(projected_onnx, projected_net(parts), parts[3]) <= 1e-4


def test_centring_projection_and_renormalisation_are_in_the_fp32_scope(projected_onnx: Path) -> None:
    model = onnx.load(str(projected_onnx))
    scoped = [n for n in model.graph.node if n.name.startswith(FP32_SCOPE)]
    ops = {n.op_type for n in scoped}
    assert {"Sub", "MatMul", "ReduceSum", "Sqrt", "Div"} <= ops, ops
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    matmul = next(n for n in scoped if n.op_type == "MatMul")
    assert any(w.shape == (D, 1792) for name, w in weights.items() if name in matmul.input)
    # The prototypes the graph compares with are [K, D]: projected before export.
    assert any(w.shape == (K, D) for w in weights.values())
    assert not any(w.ndim == 2 and w.shape[0] == K and w.shape[1] == 1792 for w in weights.values())


def test_fp16_graph_keeps_the_projection_in_fp32_and_stays_close(parts: tuple, projected_onnx: Path) -> None:
    from onnx import TensorProto

    model16 = convert_to_mixed_fp16(onnx.load(str(projected_onnx)))
    typed = onnx.shape_inference.infer_shapes(model16, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.output]}
    inits = {t.name: t.data_type for t in model16.graph.initializer}
    for node in model16.graph.node:
        if node.name.startswith(FP32_SCOPE) and node.op_type != "Constant":
            assert types[node.output[0]] in (TensorProto.FLOAT, TensorProto.INT64), node.name  # shapes are int64
            assert all(inits.get(name, TensorProto.FLOAT) != TensorProto.FLOAT16 for name in node.input), node.name
    batch = parts[3]
    s32 = ort.InferenceSession(str(projected_onnx), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(model16.SerializeToString(), providers=["CPUExecutionProvider"])
    maps32, scores32 = s32.run(["anomaly_map", "score"], {"image": batch})
    maps16, scores16 = s16.run(["anomaly_map", "score"], {"image": batch})
    assert np.abs(maps16 - maps32).max() <= FP16_TOLERANCE
    assert np.abs(scores16 - scores32).max() <= FP16_TOLERANCE
    assert np.abs(maps16 - maps32).max() > 0  # the FP16 graph did compute in FP16 somewhere


# --- protoad-export --project-dims --------------------------------------------------------------------

SMALL = ["--weights", "none", "--resize", "128", "--crop", "112"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-train, 2-test MVTec-layout category of demo images (one test image has a defect and its mask)."""
    root = tmp_path_factory.mktemp("data")
    write_demo_category(root, "part", {"train/good": 5, "test/good": 1, "test/crack": 1})
    return root


def export(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(export_main, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def projected_build(data_root: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("models")
    code, output = export(
        ["--category", "part", "--data-root", str(data_root), "--out", str(out), *SMALL, "--project-dims", "16"]
    )
    assert code == 0, output
    return out, output


def training_vectors(data_root: Path, info: ModelInfo) -> np.ndarray:
    """The build's training patch vectors (FP16, as its feature cache holds them), recomputed."""
    from protoad_edge.builder.config import BuildConfig
    from protoad_edge.builder.pipeline import extract_vectors, load_split

    split = load_split(
        BuildConfig(category="part", data_root=data_root, progress=False), info.preprocess, lambda _: None
    )
    backbone, _ = build_backbone("none", info.seed)
    features = PatchFeatures(backbone, info.crop, info.feature_upsample)
    out = np.empty((len(split.fit_crops) * features.size**2, 1792), np.float16)
    extract_vectors(features, split.fit_crops, torch.device("cpu"), 8, False, out)
    return out


@pytest.mark.slow
def test_build_writes_the_projection_and_records_it(projected_build: tuple[Path, str], data_root: Path) -> None:
    out, _ = projected_build
    bundle = Bundle(out / "part")
    assert sorted(p.name for p in out.iterdir()) == [
        "part.json",
        "part.onnx",
        "part.projection.npz",
        "part.prototypes.npy",
    ]
    info = ModelInfo.load_json(bundle.sidecar)
    assert info.projection is not None
    vectors = training_vectors(data_root, info)
    assert info.projection == {
        "dims": 16,
        "centred": True,
        "fitted_on": "patch vectors",
        "rows": len(vectors),
        "variance_kept": info.projection["variance_kept"],
    }
    assert 0 < info.projection["variance_kept"] < 1
    # The sidecar and the ONNX metadata describe the same network, projection included.
    assert OrtBackend(bundle.onnx, providers=["CPUExecutionProvider"]).info.projection == info.projection
    # The file is the PCA of the training patch vectors (here all of them: fewer than the sample), not of the
    # prototypes, whose mean is another.
    fit = load_projection(bundle.file("projection"), info.projection)
    expected = fit_projection(vectors, 16)
    np.testing.assert_allclose(fit.mean, expected.mean, atol=1e-6)
    np.testing.assert_allclose(fit.matrix, expected.matrix, atol=1e-5)
    assert np.abs(np.load(bundle.prototypes).mean(axis=0) - fit.mean).max() > 1e-3
    assert info.build["onnx_parity_max_abs"] <= 1e-4


def test_torch_backend_rebuilds_the_projected_network(projected_build: tuple[Path, str]) -> None:
    out, _ = projected_build
    bundle = Bundle(out / "part")
    net, info = load_torch_network(bundle.sidecar)
    assert net.projection is not None and net.projection.dims == info.projection["dims"]
    batch = to_batch(normal_crops(2, 112, seed=7))
    with torch.no_grad():
        maps, _ = net(torch.from_numpy(batch))
    ort_maps, _ = OrtBackend(bundle.onnx, providers=["CPUExecutionProvider"]).infer(batch)
    assert np.abs(maps[:, 0].numpy() - ort_maps).max() <= 1e-4


def test_torch_backend_needs_the_projection_file(projected_build: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = projected_build
    for p in out.iterdir():
        if not p.name.endswith(".projection.npz"):
            shutil.copy(p, tmp_path / p.name)
    with pytest.raises(ProtoADError, match=r"projection not found: .*part.projection.npz"):
        load_torch_network(tmp_path / "part.json")


def test_a_sidecar_with_another_projection_is_refused(projected_build: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = projected_build
    for p in out.iterdir():
        shutil.copy(p, tmp_path / p.name)
    side = json.loads((tmp_path / "part.json").read_text())
    side["projection"]["dims"] = 8
    (tmp_path / "part.json").write_text(json.dumps(side))
    with pytest.raises(ProtoADError, match="projection"):
        OrtBackend(tmp_path / "part.onnx", providers=["CPUExecutionProvider"])


def test_summary_shows_both_networks_side_by_side(projected_build: tuple[Path, str]) -> None:
    out, output = projected_build
    info = ModelInfo.load_json(out / "part.json")
    lines = output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("  side by side"))
    for word in ("image AUROC", "pixel AUROC", "PRO", "ms/image", "GFLOP/image"):
        assert word in lines[head]
    paper, projected = lines[head + 1].split(), lines[head + 2].split()
    assert paper[:2] == ["paper", "(1792)"] and projected[:3] == ["projected", "(16,", "centred)"]
    rows = info.build["comparison"]
    assert [r["network"] for r in rows] == ["paper (1792)", "projected (16, centred)"]
    # The projected row is the bundle's own test figures; the paper's row is another network's.
    test = info.build["test"]
    assert (rows[1]["image_auroc"], rows[1]["pixel_auroc"], rows[1]["pro"]) == (
        test["image_auroc"],
        test["pixel_auroc"],
        test["pro"],
    )
    for row, cells in ((rows[0], paper[2:]), (rows[1], projected[3:])):
        assert cells == [f"{100 * row[key]:.1f}" for key in ("image_auroc", "pixel_auroc", "pro")] + [
            f"{row['ms_per_image']:.0f}",
            f"{row['gflop_per_image']:.2f}",
        ]
        assert row["ms_per_image"] > 0
    hw, k = 28 * 28, info.num_prototypes
    assert rows[0]["gflop_per_image"] == pytest.approx(2 * hw * 1792 * k / 1e9)
    assert rows[1]["gflop_per_image"] == pytest.approx(2 * hw * 16 * (1792 + k) / 1e9)
    fitted = info.projection["rows"]
    assert f"projection    16 of 1792 dims, centred, fitted on {fitted:,} training patch vectors" in output


def test_paper_figures_are_the_unprojected_network(projected_build: tuple[Path, str], data_root: Path) -> None:
    """The side-by-side's paper row is what the paper's network (same prototypes) scores on the test split."""
    from protoad_edge.builder.datasets import load_crops, load_masks, open_dataset
    from protoad_edge.metrics import auroc

    out, _ = projected_build
    info = ModelInfo.load_json(out / "part.json")
    net, _ = load_torch_network(out / "part.json")
    paper = ProtoADNet(net.features, torch.from_numpy(np.load(out / "part.prototypes.npy")), info.crop).eval()
    data = open_dataset("part", data_root)
    with torch.no_grad():
        maps = paper(torch.from_numpy(to_batch(load_crops(data.test, info.preprocess))))[0][:, 0].numpy()
    masks = load_masks(data.test, info.preprocess)
    # Maps equal to 1e-4 can still reorder a few near-tied pixels: the AUROCs agree to 1e-3, and the projected
    # network's differs by more.
    paper_row, projected_row = info.build["comparison"]
    assert paper_row["pixel_auroc"] == pytest.approx(auroc(masks, maps), abs=1e-3)
    assert abs(projected_row["pixel_auroc"] - auroc(masks, maps)) > 1e-2


@pytest.mark.slow
def test_uncentred_build_and_a_rebuild_without_projection(data_root: Path, tmp_path: Path, torch_threads: None) -> None:
    args = ["--category", "part", "--data-root", str(data_root), "--out", str(tmp_path), *SMALL, "--val-split", "0"]
    code, output = export([*args, "--project-dims", "8", "--projection", "uncentred"])
    assert code == 0, output
    info = ModelInfo.load_json(tmp_path / "part.json")
    assert info.projection["dims"] == 8 and info.projection["centred"] is False
    assert not np.load(tmp_path / "part.projection.npz")["mean"].any()
    code, output = export(args)  # the paper's network again: the old projection must not linger
    assert code == 0, output
    assert not (tmp_path / "part.projection.npz").exists()
    assert ModelInfo.load_json(tmp_path / "part.json").projection is None
    assert "side by side" not in output


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--project-dims", "1792"], "--project-dims 1792"),
        (["--project-dims", "5000"], "--project-dims 5000"),
        (["--projection", "uncentred"], "--projection uncentred needs --project-dims"),
    ],
)
def test_bad_projection_options_give_one_clear_line(
    extra: list[str], expected: str, data_root: Path, tmp_path: Path
) -> None:
    code, output = export(
        [
            "--category",
            "part",
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            *extra,
        ]
    )
    assert code != 0 and "Traceback" not in output
    errors = [line for line in output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_more_dims_than_prototypes_is_refused_after_clustering(
    data_root: Path, tmp_path: Path, torch_threads: None
) -> None:
    code, output = export(
        [
            "--category",
            "part",
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path),
            "--weights",
            "none",
            "--crop",
            "64",
            "--resize",
            "72",
            "--max-prototypes",
            "20",
            "--project-dims",
            "1000",
        ]
    )
    assert code != 0 and "Traceback" not in output
    assert "--project-dims 1000: more than the" in output and "prototypes" in output
    assert not any(tmp_path.iterdir())
