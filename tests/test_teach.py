"""``protoad-teach`` (issue 27): features without torch, the graphs extended exactly as an export would write them,
a changed lamp taught away while a defect stays anomalous, the opt-in check, versions and rollback, thresholds
from the line's own frames.

The bundles are the generated demo part at crop 64 (``teaching.teach_bundle``): under a changed lamp
(``bench_teach.lighting_change``) every frame of it scores about 3x the image threshold, a black square about 4x.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from teaching import changed_lamp, crops, demo_frames, teach_bundle, with_hole, write_pngs

from protoad_edge import versions
from protoad_edge.bundle import Bundle
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.teach import main as teach_main
from protoad_edge.errors import ProtoADError
from protoad_edge.export import prototypes as xp
from protoad_edge.export.fp16 import convert_to_mixed_fp16
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.sources.frames import Frames
from protoad_edge.teach.graph import BundleGraph
from protoad_edge.teach.teach import teach

FEATURE_TOLERANCE = 1e-5  # max abs difference of unit patch vectors, onnxruntime vs PyTorch (float32 rounding)
GRAPH_TOLERANCE = 1e-6  # max abs difference of maps: an extended graph against a fresh export of the same prototypes
# Patch scores found by teaching's search against the line's graph: the same float32 dot products of unit vectors
# summed in another order (numpy's against onnxruntime's), each within ~1e-7; scores are 1 minus the best of them.
SEARCH_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    return teach_bundle(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="module")
def projected(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    return teach_bundle(tmp_path_factory.mktemp("projected"), project_dims=32)


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of frames: the changed lamp (to teach, held out), and black squares under either lamp."""
    root = tmp_path_factory.mktemp("frames")
    return {
        "teach": write_pngs(root / "teach", changed_lamp(demo_frames(range(20, 28)))),
        "held": write_pngs(root / "held", changed_lamp(demo_frames(range(30, 38)))),
        "normal": write_pngs(root / "normal", demo_frames(range(40, 46))),
        "holes": write_pngs(root / "holes", with_hole(demo_frames(range(50, 54)))),
        "holes_to_teach": write_pngs(root / "holes_to_teach", with_hole(demo_frames(range(60, 64)))),
        "changed_holes": write_pngs(root / "changed_holes", with_hole(changed_lamp(demo_frames(range(70, 74))))),
    }


def copy_of(onnx_path: Path, tmp_path: Path) -> Path:
    shutil.copytree(onnx_path.parent, tmp_path / "m")
    return tmp_path / "m" / onnx_path.name


def scores(onnx_path: Path, folder: Path) -> np.ndarray:
    from protoad_edge.runtime.sources.frames import read_frames

    backend = OrtBackend(onnx_path, providers=["CPUExecutionProvider"])
    return backend.infer(to_batch(read_frames([str(folder)], backend.info.preprocess).crops))[1]


def frames_of(images: np.ndarray) -> Frames:
    from protoad_edge.preprocess import Preprocess

    pre = Preprocess(72, 64)
    return Frames(
        crops(images), [f"frame{i}" for i in range(len(images))], [pre.geometry(f.shape[1], f.shape[0]) for f in images]
    )


# --- features without torch ------------------------------------------------------------------------------------


@pytest.mark.slow  # the fixture it names is built inside it
@pytest.mark.parametrize("which", ["pristine", "projected"])
def test_the_graphs_features_are_pytorchs(which: str, request: pytest.FixtureRequest) -> None:
    """The cut of NAME.onnx gives the network's own normalised patch vectors (and, projected, what the prototype
    stage compares), and the patch scores its search finds give the full graph's maps and image scores."""
    import torch

    from protoad_edge.builder.torch_backend import load_torch_network

    onnx_path = request.getfixturevalue(which)
    bundle = Bundle.of(onnx_path)
    graph = BundleGraph(bundle, bundle.info())
    x = crops(changed_lamp(demo_frames(range(90, 93))))
    seen = graph.see(x)
    net, _ = load_torch_network(bundle.sidecar)
    with torch.no_grad():
        raw = net.features(torch.from_numpy(to_batch(x)))
        unit = torch.nn.functional.normalize(raw, dim=1).flatten(2).transpose(1, 2).numpy()
        compared = net.l2norm(raw).flatten(2).transpose(1, 2).numpy()
    assert np.abs(seen.unit - unit).max() < FEATURE_TOLERANCE
    assert np.abs(seen.compared - compared).max() < FEATURE_TOLERANCE
    maps, image = OrtBackend(onnx_path, providers=["CPUExecutionProvider"]).infer(to_batch(x))
    assert np.abs(seen.maps - maps).max() < SEARCH_TOLERANCE and np.abs(seen.scores - image).max() < SEARCH_TOLERANCE


def test_a_graph_older_than_the_l2_scope_is_one_line(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    onnx_path = copy_of(pristine, tmp_path)
    model = onnx.load(str(onnx_path))
    for node in model.graph.node:
        node.name = node.name.replace("/l2norm/", "/norm/")
    onnx.save(model, str(onnx_path))
    Bundle.of(onnx_path).reseal()
    with pytest.raises(ProtoADError, match=r"no L2 normalisation scope .* rebuild the bundle with protoad-export"):
        BundleGraph(Bundle.of(onnx_path), Bundle.of(onnx_path).info())
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path), str(frames["teach"])])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "protoad-export" in result.output


def test_a_graph_the_sidecar_does_not_vouch_for_is_not_extended(
    pristine: Path, frames: dict[str, Path], tmp_path: Path
) -> None:
    """A NAME.fp16.onnx copied in from elsewhere would be sealed into the new version: refused, nothing written."""
    onnx_path = copy_of(pristine, tmp_path)
    onnx.save(convert_to_mixed_fp16(onnx.load(str(onnx_path))), str(onnx_path.with_name("part.fp16.onnx")))
    before = {p.name: p.read_bytes() for p in onnx_path.parent.iterdir() if p.is_file()}
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path), str(frames["teach"])])
    assert result.exit_code == 2 and "part.fp16.onnx does not match" in result.output
    assert {p.name: p.read_bytes() for p in onnx_path.parent.iterdir() if p.is_file()} == before


def test_a_bundle_without_its_onnx_says_where_to_get_it(
    pristine: Path, frames: dict[str, Path], tmp_path: Path
) -> None:
    onnx_path = copy_of(pristine, tmp_path)
    onnx_path.unlink()
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path.with_suffix(".json")), str(frames["teach"])])
    assert result.exit_code == 2 and "teaching reads" in result.output and "protoad-export" in result.output
    assert "Traceback" not in result.output


# --- the prototype stage extended ------------------------------------------------------------------------------


def fresh_export(bundle: Bundle, prototypes: np.ndarray, out: Path) -> Path:
    """The bundle's network exported anew with ``prototypes`` (what a build with them would write)."""
    import torch

    from protoad_edge.builder.network import ProtoADNet
    from protoad_edge.builder.torch_backend import load_torch_network
    from protoad_edge.export.onnx import export_onnx

    net, info = load_torch_network(bundle.sidecar)
    fresh = ProtoADNet(net.features, torch.from_numpy(prototypes), info.crop, projection=net.projection).eval()
    return export_onnx(fresh, dataclasses.replace(info, num_prototypes=len(prototypes)), out)


@pytest.mark.slow  # the fixture it names is built inside it
@pytest.mark.parametrize("which, added", [("pristine", 300), ("pristine", 700), ("projected", 300)])
def test_extended_graphs_are_a_fresh_export(
    which: str, added: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Appended prototypes fill the last block and add blocks of 512, as an export of them all would: the maps
    equal a fresh export's (FP32, and the mixed FP16 graph against its conversion), block by block."""
    from protoad_edge.teach.graph import BundleGraph

    bundle = Bundle.of(request.getfixturevalue(which))
    info = bundle.info()
    rng = np.random.default_rng(added)
    new = rng.normal(size=(added, 1792)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    everything = np.concatenate([np.load(bundle.prototypes), new])
    fresh = onnx.load(str(fresh_export(bundle, everything, tmp_path / "fresh.onnx")))
    graph = BundleGraph(bundle, info)
    grown = dataclasses.replace(info, num_prototypes=len(everything))
    extended = xp.load(bundle.onnx)
    half = convert_to_mixed_fp16(xp.load(bundle.onnx))
    assert xp.append_prototypes(extended, graph.to_graph(new), grown) == len(everything)
    xp.append_prototypes(half, graph.to_graph(new), grown)
    assert [list(b.dims) for b in xp.find_stage(extended).blocks] == [list(b.dims) for b in xp.find_stage(fresh).blocks]
    x = to_batch(crops(changed_lamp(demo_frames(range(90, 93)))))
    for mine, theirs in ((extended, fresh), (half, convert_to_mixed_fp16(fresh))):
        onnx.checker.check_model(mine, full_check=True)
        (tmp_path / "mine.onnx").write_bytes(mine.SerializeToString())
        (tmp_path / "theirs.onnx").write_bytes(theirs.SerializeToString())
        a = OrtBackend(tmp_path / "mine.onnx", providers=["CPUExecutionProvider"]).infer(x)
        b = OrtBackend(tmp_path / "theirs.onnx", providers=["CPUExecutionProvider"]).infer(x)
        tolerance = GRAPH_TOLERANCE if which == "pristine" else 1e-5  # projected rows: numpy vs torch rounding
        assert np.abs(a[0] - b[0]).max() <= tolerance and np.abs(a[1] - b[1]).max() <= tolerance
    embedded = {p.key: json.loads(p.value) for p in extended.metadata_props}
    assert embedded["num_prototypes"] == len(everything)


@pytest.mark.slow
def test_the_int8_graph_is_extended_as_a_fresh_quantization_would_be(pristine: Path, tmp_path: Path) -> None:
    """NAME.int8.onnx keeps its prototype MatMuls in FP32 and its calibration depends only on the backbone: after a
    teach it equals the taught NAME.onnx quantized the same way."""
    from protoad_edge.export import int8

    onnx_path = copy_of(pristine, tmp_path)
    calibration = crops(demo_frames(range(8, 12)))

    def quantized(src: Path, dst: Path) -> None:
        float_model = onnx.load(str(src))
        convs = int8.backbone_convs(float_model)
        int8._quantize(src, tmp_path / "all.onnx", convs, int8._Reader(float_model.graph.input[0].name, calibration))
        model = int8.only(onnx.load(str(tmp_path / "all.onnx")), float_model, set(convs[:8]))
        del model.metadata_props[:]
        model.metadata_props.extend(float_model.metadata_props)
        onnx.save(model, str(dst))

    quantized(onnx_path, onnx_path.with_name("part.int8.onnx"))
    Bundle.of(onnx_path).reseal()
    result = teach(Bundle.of(onnx_path), frames_of(changed_lamp(demo_frames(range(20, 24)))))
    assert "int8_onnx" in result.written
    quantized(onnx_path, tmp_path / "fresh.int8.onnx")
    x = to_batch(crops(changed_lamp(demo_frames(range(90, 93)))))
    a = OrtBackend(onnx_path.with_name("part.int8.onnx"), providers=["CPUExecutionProvider"]).infer(x)
    b = OrtBackend(tmp_path / "fresh.int8.onnx", providers=["CPUExecutionProvider"]).infer(x)
    assert np.abs(a[0] - b[0]).max() <= GRAPH_TOLERANCE and np.abs(a[1] - b[1]).max() <= GRAPH_TOLERANCE


def test_wrong_width_of_prototypes_is_refused(pristine: Path) -> None:
    model = xp.load(pristine)
    info = Bundle.of(pristine).info()
    with pytest.raises(ProtoADError, match="prototypes of 1792 dimensions"):
        xp.append_prototypes(model, np.zeros((3, 32), np.float32), dataclasses.replace(info, num_prototypes=259))
    with pytest.raises(ProtoADError, match="the metadata says"):
        xp.append_prototypes(model, np.zeros((3, 1792), np.float32), info)


# --- teaching --------------------------------------------------------------------------------------------------


def test_teaching_the_new_lamp_makes_it_normal_and_keeps_a_defect(
    pristine: Path, frames: dict[str, Path], tmp_path: Path
) -> None:
    onnx_path = copy_of(pristine, tmp_path)
    before = ModelInfo.load_json(onnx_path.with_suffix(".json"))
    threshold = before.image_threshold
    assert (scores(onnx_path, frames["held"]) > threshold).all()  # the new lamp: every frame flagged
    report = tmp_path / "teach.json"
    result = CliRunner().invoke(
        teach_main,
        ["--model", str(onnx_path), str(frames["teach"]), "--held-out", str(frames["held"]), "--json", str(report)],
    )
    assert result.exit_code == 0, result.output
    assert (scores(onnx_path, frames["held"]) <= threshold).all()  # held-out frames of the new lamp: normal
    assert (scores(onnx_path, frames["changed_holes"]) > threshold).all()  # a defect under the new lamp: anomalous
    assert (scores(onnx_path, frames["holes"]) > threshold).all()
    after = ModelInfo.load_json(onnx_path.with_suffix(".json"))
    data = json.loads(report.read_text())
    assert after.version == 2 and after.num_prototypes == data["k_after"] > data["k_before"] == before.num_prototypes
    assert (after.image_threshold, after.pixel_threshold) == (before.image_threshold, before.pixel_threshold)
    for frame in data["frames"]:  # every taught frame: no patch above the pixel threshold, so no pixel
        assert frame["score_before"] > threshold and frame["score_after"] <= after.pixel_threshold
        assert frame["share"] > 0.8 and frame["bbox"][2] > 150  # the whole part looks new: one wide group
    assert data["held_out"]["false_alarms_before"] == 8 and data["held_out"]["false_alarms_after"] == 0
    assert data["held_out"]["rule_after"]["image"] < data["held_out"]["rule_before"]["image"]
    assert np.load(onnx_path.with_name("part.prototypes.npy")).shape == (after.num_prototypes, 1792)
    change = after.changes[-1]
    assert (change["what"], change["from"], change["frames"], change["k_before"], change["k_after"]) == (
        "teach",
        1,
        8,
        before.num_prototypes,
        after.num_prototypes,
    )
    assert set(after.digests) == set(before.digests)  # sealed again: the run checks the new files against it
    assert "wrote version 2" in result.output and "held-out normal frames: false alarms 8/8 -> 0/8" in result.output
    assert "largest group (x,y,w,h)" in result.output  # the box is one group's, not the hull of every taught patch


def test_a_defect_taught_by_mistake_is_taught_like_any_look(pristine: Path, tmp_path: Path) -> None:
    """The model cannot tell a defect from a new look: frames with a black square teach like any other, and
    afterwards score at most the pixel threshold - which is why the report and the check exist."""
    bundle = Bundle.of(copy_of(pristine, tmp_path))
    info = bundle.info()
    result = teach(bundle, frames_of(with_hole(demo_frames(range(60, 62)))))
    for frame in result.frames:
        assert frame.score_before > info.image_threshold and frame.score_after <= info.pixel_threshold
        assert frame.patches == round(frame.share * 256) > 0
    assert 0 < result.k_after - result.k_before < result.patches  # grouped: fewer prototypes than patches


def test_where_a_frames_new_prototypes_came_from() -> None:
    """The report's box is the largest connected group of taught patches, in frame pixels (ROI and scale applied);
    lone patches elsewhere only add to the share."""
    from protoad_edge.preprocess import Preprocess
    from protoad_edge.teach.teach import taught_region

    mask = np.zeros((16, 16), bool)
    mask[5:8, 9:12] = True  # 9 patches: crop pixels x 36-48, y 20-32
    mask[14, 1] = mask[0, 15] = True
    geometry = Preprocess(64, 64, roi=(100, 50, 128, 128), fit="resize").geometry(400, 300)  # 2 frame px a crop px
    share, bbox = taught_region(mask, 64, geometry)
    assert share == 11 / 256 and bbox == [100 + 72, 50 + 40, 24, 24]
    assert taught_region(np.zeros((16, 16), bool), 64, geometry) == (0.0, None)


def test_frames_already_covered_write_no_version(pristine: Path, tmp_path: Path) -> None:
    bundle = Bundle.of(copy_of(pristine, tmp_path))
    info = bundle.info()
    graph = BundleGraph(bundle, info)
    prototypes = graph.prototypes.copy()
    result = teach(bundle, frames_of(demo_frames(range(1))), graph=graph)  # a training image: all covered?
    seen = graph.see(crops(demo_frames(range(1))))
    uncovered = int((seen.patch_scores > info.pixel_threshold).sum())
    assert result.patches == uncovered
    if uncovered == 0:
        assert result.version_after is None and bundle.info().version == 1 and not versions.kept(bundle)
    else:
        assert result.version_after == 2 and len(prototypes) < bundle.info().num_prototypes


def test_teaching_a_projected_bundle_extends_both_spaces(
    projected: Path, frames: dict[str, Path], tmp_path: Path
) -> None:
    onnx_path = copy_of(projected, tmp_path)
    threshold = Bundle.of(onnx_path).info().image_threshold
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path), str(frames["teach"])])
    assert result.exit_code == 0, result.output
    info = Bundle.of(onnx_path).info()
    stored = np.load(onnx_path.with_name("part.prototypes.npy"))
    compared = xp.read_prototypes(xp.load(onnx_path))
    assert stored.shape == (info.num_prototypes, 1792) and compared.shape == (info.num_prototypes, 32)
    assert (scores(onnx_path, frames["held"]) <= threshold).all()
    fresh = fresh_export(Bundle.of(onnx_path), stored, tmp_path / "fresh.onnx")  # the torch network of the files
    x = to_batch(crops(changed_lamp(demo_frames(range(90, 92)))))
    a = OrtBackend(onnx_path, providers=["CPUExecutionProvider"]).infer(x)[0]
    assert np.abs(a - OrtBackend(fresh, providers=["CPUExecutionProvider"]).infer(x)[0]).max() < 1e-5


def test_the_check_refuses_teaching_defects(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    """Black squares taught by mistake: on frames an operator sorted (normal, and other black squares) the image
    AUROC falls far beyond the accuracy gate, so the teach is refused and the bundle left as it was - unless the
    loss is accepted knowingly."""
    onnx_path = copy_of(pristine, tmp_path)
    folder = onnx_path.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    argv = [
        "--model",
        str(onnx_path),
        str(frames["holes_to_teach"]),
        "--check-normal",
        str(frames["normal"]),
        "--check-defect",
        str(frames["holes"]),
    ]
    result = CliRunner().invoke(teach_main, argv)
    assert result.exit_code == 2 and "teach refused" in result.output and "image AUROC drops" in result.output
    assert result.output.splitlines()[-1].startswith("error: teach refused")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not versions.kept(Bundle.of(onnx_path))
    accepted = CliRunner().invoke(teach_main, argv + ["--accept-accuracy-loss"])
    assert accepted.exit_code == 0 and "taught anyway" in accepted.output
    assert Bundle.of(onnx_path).info().version == 2


def test_the_check_passes_a_teach_of_the_new_lamp(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    """Sorted frames with normal ones of the new lamp among them: teaching the lamp drops their scores to the
    bottom (a new order, Spearman far below the gate's 0.99, which a teach is not judged by) and no AUROC."""
    onnx_path = copy_of(pristine, tmp_path)
    result = CliRunner().invoke(
        teach_main,
        [
            "--model",
            str(onnx_path),
            str(frames["teach"]),
            "--check-normal",
            str(frames["normal"]),
            "--check-normal",
            str(frames["held"]),
            "--check-defect",
            str(frames["holes"]),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "check on 18 sorted frames: image AUROC" in result.output and ": passed" in result.output
    change = Bundle.of(onnx_path).info().changes[-1]
    assert change["check"]["passed"] and change["check"]["caught"] == [4, 4]
    assert (
        change["check"]["spearman"] < 0.9
        and change["check"]["false_alarms"][0] >= 8 > 0 == change["check"]["false_alarms"][1]
    )


def test_a_plan_is_left_out_of_the_new_version_where_no_tensorrt_builds_it(
    pristine: Path, frames: dict[str, Path], tmp_path: Path
) -> None:
    """A TensorRT plan holds the old prototypes: the new version has none, one line says where to build it, and the
    version kept still has it (a rollback brings it back)."""
    from protoad_edge.export.engine import engine_unavailable

    if engine_unavailable() is None:
        pytest.skip("TensorRT and a GPU are here: the plan is rebuilt instead (benchmarks/gpu_check.sh)")
    onnx_path = copy_of(pristine, tmp_path)
    plan = onnx_path.with_suffix(".plan")
    plan.write_bytes(b"a plan of the old prototypes")
    Bundle.of(onnx_path).reseal()
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path), str(frames["teach"])])
    assert result.exit_code == 0, result.output
    assert not plan.exists() and "plan" not in Bundle.of(onnx_path).info().digests
    note = next(line for line in result.output.splitlines() if line.startswith("note: part.plan"))
    assert "not part of the new version" in note and f"protoad-export --from-onnx {onnx_path}" in note
    versions.rollback(Bundle.of(onnx_path))
    assert plan.read_bytes() == b"a plan of the old prototypes"


def test_frames_from_a_video_and_a_live_source(pristine: Path, tmp_path: Path) -> None:
    import cv2

    from protoad_edge.runtime.sources.frames import read_frames

    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (128, 128))
    for frame in changed_lamp(demo_frames(range(20, 25))):
        writer.write(cv2.cvtColor(cv2.resize(frame, (128, 128)), cv2.COLOR_RGB2BGR))
    writer.release()
    pre = Bundle.of(pristine).info().preprocess
    got = read_frames([str(path)], pre, max_frames=3)
    assert got.labels == [f"{path}#0", f"{path}#1", f"{path}#2"] and got.crops.shape == (3, 64, 64, 3)
    assert len(read_frames([str(path)], pre).labels) == 5
    with pytest.raises(ProtoADError, match="camera0 is live and has no end: give --max-frames"):
        read_frames(["camera0"], pre)


# --- versions ---------------------------------------------------------------------------------------------------


def test_rollback_restores_the_files_bit_for_bit(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    onnx_path = copy_of(pristine, tmp_path)
    folder = onnx_path.parent
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    original = {name: (folder / name).read_bytes() for name in files}
    assert CliRunner().invoke(teach_main, ["--model", str(onnx_path), str(frames["teach"])]).exit_code == 0
    taught = {name: (folder / name).read_bytes() for name in files}
    assert all(taught[n] != original[n] for n in ("part.onnx", "part.json", "part.prototypes.npy"))
    result = CliRunner().invoke(teach_main, ["--model", str(onnx_path), "--rollback"])
    assert result.exit_code == 0 and "version 2 -> 1" in result.output, result.output
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == files
    assert all((folder / n).read_bytes() == original[n] for n in files)
    again = CliRunner().invoke(teach_main, ["--model", str(onnx_path), "--rollback"])
    assert again.exit_code == 2 and "version 1 as built" in again.output and "kept versions: 2" in again.output
    forward = CliRunner().invoke(teach_main, ["--model", str(onnx_path), "--rollback", "--to", "2"])
    assert forward.exit_code == 0 and all((folder / n).read_bytes() == taught[n] for n in files)
    listing = CliRunner().invoke(teach_main, ["--model", str(onnx_path), "--list"])
    assert listing.output.splitlines() == [
        "* version 2: teach from version 1 on "
        + Bundle.of(onnx_path).info().changes[-1]["when"]
        + f": 8 frames, K 256 -> {Bundle.of(onnx_path).info().num_prototypes:,}",
        "  version 1: as built",
    ]
    OrtBackend(onnx_path, providers=["CPUExecutionProvider"])  # the restored pair opens


def test_a_teach_with_torch_blocked(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    """On the line box (no torch, as on a Jetson) teaching works: everything runs through onnxruntime."""
    onnx_path = copy_of(pristine, tmp_path)
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from protoad_edge.cli.teach import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--model", str(onnx_path), str(frames["teach"]), "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote version 2" in result.stdout
    assert Bundle.of(onnx_path).info().version == 2


# --- thresholds from the line's own frames ---------------------------------------------------------------------


def test_set_threshold_on_frames_sorted_on_the_line(pristine: Path, frames: dict[str, Path], tmp_path: Path) -> None:
    onnx_path = copy_of(pristine, tmp_path)
    normal, defect = scores(onnx_path, frames["normal"]), scores(onnx_path, frames["holes"])
    result = CliRunner().invoke(
        eval_main,
        [
            "--model",
            str(onnx_path),
            "--normal",
            str(frames["normal"]),
            "--defect",
            str(frames["holes"]),
            "--set-threshold",
            "normal-max",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "6 normal and 4 defect frames sorted on the line" in result.output
    assert "normal-max" in result.output and "4/4" in result.output and "0/6" in result.output
    info = Bundle.of(onnx_path).info()
    assert normal.max() < info.image_threshold < defect.min() and info.version == 2
    assert info.threshold_rule == "normal-max@line-frames"  # what every record of a run names
    both = CliRunner().invoke(eval_main, ["--model", str(onnx_path), "--normal", str(frames["normal"])])
    assert both.exit_code == 2 and "frames of both kinds" in both.output


# --- the search and the grouping, on their own -------------------------------------------------------------------


def clustered(n: int, dims: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random directions, like patch vectors of a few looks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dims))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_the_pruned_search_is_exact() -> None:
    from protoad_edge.teach.search import Cells, centres

    rows = clustered(3000, 64, 40, 0.3, seed=1)
    z = clustered(2000, 64, 40, 0.3, seed=2)
    cells = Cells(rows, centres(rows))
    best, which = cells.best(z, z @ cells.centres.T)
    brute = z @ rows.T
    assert np.array_equal(which, brute.argmax(axis=1)) and np.allclose(best, brute.max(axis=1), atol=1e-6)
    floor = np.full(len(z), 0.9, np.float32)  # only rows better than the floor are looked for
    high, where = cells.best(z, z @ cells.centres.T, floor=floor)
    assert np.allclose(high, np.maximum(brute.max(axis=1), 0.9), atol=1e-6)
    assert np.array_equal(where >= 0, brute.max(axis=1) > 0.9)


def test_grouping_covers_every_patch_at_the_level() -> None:
    from protoad_edge.teach.cover import cover

    unit = clustered(4000, 64, 30, 0.15, seed=3)
    cosine = 0.95
    covered = cover(unit, unit, cosine, lambda rows: rows)
    reach = np.einsum("ij,ij->i", unit, covered.rows[covered.owner])
    assert reach.min() >= cosine and (covered.owner >= 0).all()
    assert np.allclose(np.linalg.norm(covered.prototypes, axis=1), 1.0, atol=1e-5)
    assert len(covered.rows) < len(unit) / 4  # grouped: the new look of a part is not one prototype a patch
    rng = np.random.default_rng(4)  # through a projection (as --project-dims compares), covered in its space
    matrix = np.linalg.qr(rng.normal(size=(64, 16)))[0].T.astype(np.float32)

    def project(rows: np.ndarray) -> np.ndarray:
        p = rows @ matrix.T
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    projected = cover(project(unit), unit, cosine, project)
    assert np.einsum("ij,ij->i", project(unit), projected.rows[projected.owner]).min() >= cosine
    assert np.allclose(projected.rows, project(projected.prototypes), atol=1e-6)


def test_a_groups_mean_that_leaves_a_member_uncovered_is_checked() -> None:
    """Twenty patches on one side of a leader and one on the other, all within the level of it: their mean leans
    to the twenty and no longer covers the one, which is covered in a later round."""
    from protoad_edge.teach.cover import cover

    def at(cosine: float, side: float, noise: float) -> np.ndarray:
        v = np.zeros(8)
        v[0], v[1], v[2] = cosine, side * np.sqrt(1 - cosine**2), noise
        return v / np.linalg.norm(v)

    rows = np.stack([at(1.0, 1, 0)] + [at(0.97, 1, 0.001 * i) for i in range(20)] + [at(0.955, -1, 0)])
    rows = rows.astype(np.float32)
    covered = cover(rows, None, 0.95, lambda r: r)
    lone = rows[-1]
    assert float(lone @ covered.rows[0]) < 0.9  # the first group's mean
    assert float(lone @ covered.rows[covered.owner[-1]]) >= 0.95 and len(covered.rows) == 2


def test_the_level_is_the_pixel_threshold_in_force() -> None:
    from protoad_edge.teach.cover import level

    info = ModelInfo(
        category="c",
        resize=72,
        crop=64,
        backbone="b",
        weights="none",
        feature_upsample="bilinear",
        num_prototypes=1,
        image_threshold=0.2,
        pixel_threshold=0.1,
    )
    assert level(info) == pytest.approx(0.9)
    assert level(dataclasses.replace(info, pixel_threshold=0.3)) == pytest.approx(0.8)  # capped at the image one
    assert level(dataclasses.replace(info, pixel_threshold=float("nan"))) == pytest.approx(0.8)
