"""One bundle, one backend registry: every file name from one stem, and which file each backend runs,
the same for protoad-run, protoad-eval and protoad-bench."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from protoad_edge.bundle import FILES, Bundle, kind_of, locate
from protoad_edge.cli.bench import main as bench_main
from protoad_edge.cli.eval import main as eval_main
from protoad_edge.cli.run import main as run_main
from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.backends.base import Backend, BackendOptions
from protoad_edge.runtime.backends.registry import AUTO, CHOICES, NAMES, REGISTRY, SPECS, choose, open_backend


def test_every_file_of_a_bundle_comes_from_its_stem(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path / "cable")
    names = {kind: bundle.file(kind).name for kind in FILES}
    assert names == {
        "onnx": "cable.onnx",
        "fp16_onnx": "cable.fp16.onnx",
        "int8_onnx": "cable.int8.onnx",
        "plan": "cable.plan",
        "sidecar": "cable.json",
        "prototypes": "cable.prototypes.npy",
        "timing_cache": "cable.timing.cache",
        "projection": "cable.projection.npz",
    }
    assert (bundle.onnx, bundle.plan, bundle.sidecar) == (
        bundle.file("onnx"),
        bundle.file("plan"),
        bundle.file("sidecar"),
    )
    for kind in FILES:  # any file names the whole bundle, the longest suffix first (x.fp16.onnx is not x.fp16)
        assert kind_of(bundle.file(kind)) == kind
        assert Bundle.of(bundle.file(kind)) == bundle
    assert kind_of(tmp_path / "notes.txt") is None and kind_of(tmp_path / ".onnx") is None
    with pytest.raises(ProtoADError, match="notes.txt: not a file of a model bundle"):
        Bundle.of(tmp_path / "notes.txt")


def make_files(folder: Path, name: str, kinds: tuple[str, ...]) -> Bundle:
    folder.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(folder / name)
    for kind in kinds:
        bundle.file(kind).write_bytes(b"x")
    return bundle


def no_tensorrt(monkeypatch: pytest.MonkeyPatch, installed: bool = False) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed else None) if name == "tensorrt" else real(name, *a),
    )


def test_which_file_each_backend_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_files(tmp_path, "cable", ("onnx", "fp16_onnx", "plan", "sidecar", "prototypes"))
    no_tensorrt(monkeypatch)
    cases = [
        # (named file, backend) -> (backend, file)
        ((b.onnx, AUTO), ("ort", b.onnx)),
        ((b.plan, AUTO), ("trt", b.plan)),  # a named plan is run as a plan (and fails later without TensorRT)
        ((b.fp16_onnx, AUTO), ("ort", b.fp16_onnx)),
        ((b.sidecar, AUTO), ("ort", b.onnx)),  # a sidecar names the bundle: no TensorRT here, so its ONNX
        ((b.prototypes, AUTO), ("ort", b.onnx)),
        ((None, AUTO), ("ort", b.onnx)),
        ((b.onnx, "trt"), ("trt", b.plan)),
        ((b.plan, "ort"), ("ort", b.onnx)),
        ((b.fp16_onnx, "ort"), ("ort", b.fp16_onnx)),  # ort runs the named ONNX of the bundle
        ((b.onnx, "torch"), ("torch", b.sidecar)),
        ((b.prototypes, "torch"), ("torch", b.prototypes)),
    ]
    for (given, name), (backend, path) in cases:
        entry, chosen = choose(b, given, name)
        assert (entry.name, chosen) == (backend, path), (given, name)
    no_tensorrt(monkeypatch, installed=True)
    assert choose(b, b.sidecar, AUTO)[0].name == "trt"  # with TensorRT, the bundle's plan is the fastest path
    assert choose(b, None, AUTO)[0].name == "trt"


def test_missing_files_and_unknown_backends_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_tensorrt(monkeypatch, installed=True)
    b = make_files(tmp_path, "solo", ("fp16_onnx",))
    with pytest.raises(
        ProtoADError, match=r"backend trt runs .*solo.plan beside .*solo.fp16.onnx, and it does not exist"
    ):
        choose(b, b.fp16_onnx, "trt")
    with pytest.raises(ProtoADError, match="backend torch runs .*solo.json"):
        choose(b, b.fp16_onnx, "torch")
    with pytest.raises(ProtoADError, match="unknown backend 'tensorflow': choose one of auto, ort, trt, torch"):
        choose(b, b.fp16_onnx, "tensorflow")
    lonely = make_files(tmp_path, "lonely", ("prototypes",))
    with pytest.raises(ProtoADError, match="lonely: no file that an installed backend can run"):
        choose(lonely, lonely.prototypes, AUTO)
    assert (
        choose(make_files(tmp_path, "rebuilt", ("sidecar",)), None, AUTO)[0].name == "torch"
    )  # torch is the last resort


def test_locate_a_bundle(tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ProtoADError, match="no --model given and no .*models/ folder"):
        locate(None, folder=models)
    make_files(models, "cable", ("onnx", "sidecar", "prototypes", "plan"))
    (models / ".cable.onnx.x1.tmp.onnx").write_bytes(b"half-written")  # an atomic write in progress
    assert locate(None, folder=models) == (Bundle(models / "cable"), None)
    assert locate(models / "cable.plan") == (Bundle(models / "cable"), models / "cable.plan")
    assert locate(models, "cable") == (Bundle(models / "cable"), None)
    with pytest.raises(ProtoADError, match="is a folder: name the category"):
        locate(models)
    with pytest.raises(ProtoADError, match="no model bundle screw.\\* in"):
        locate(models, "screw")
    with pytest.raises(ProtoADError, match="model not found: .*nope.onnx"):
        locate(models / "nope.onnx")
    make_files(models, "screw", ("plan", "sidecar"))
    with pytest.raises(
        ProtoADError, match="several models in .*models/, choose one with --model: .*cable.onnx, .*screw.plan"
    ):
        locate(None, folder=models)


def test_registry_entries_are_backends_named_as_registered() -> None:
    assert CHOICES == (AUTO, *NAMES) and set(NAMES) == {"ort", "trt", "torch", "openvino"}
    for name, entry in REGISTRY.items():
        assert entry.name == name and entry.files and set(entry.files) <= set(FILES)
        if not entry.available():
            continue
        cls = entry.load()
        assert issubclass(cls, Backend) and cls.name == name
    assert [e.name for e in REGISTRY.values() if e.needs_torch] == ["torch"]


def test_the_three_clis_take_the_same_backend_names() -> None:
    def choices(command: click.Command) -> tuple[str, ...]:
        option = next(p for p in command.params if p.name == "backend")
        assert isinstance(option.type, click.Choice)
        return tuple(option.type.choices)

    # every backend, and each lower precision it can run (openvino:bf16), on every command that runs a model
    assert choices(run_main) == choices(eval_main) == choices(bench_main) == SPECS
    assert set(CHOICES) < set(SPECS) and "openvino:bf16" in SPECS and "ort:bf16" not in SPECS
    for command in (run_main, eval_main, bench_main):
        model = next(p for p in command.params if p.name == "model")
        assert "NAME.onnx" in (model.help or "") or "bundle" in (model.help or "")


@pytest.mark.slow
def test_run_eval_and_bench_accept_any_file_of_a_bundle(tiny_model: Path, tmp_path: Path) -> None:
    """``protoad-run --model x.json`` once failed with a protobuf parse error: every file names the bundle."""
    from conftest import normal_crops
    from PIL import Image

    image = tmp_path / "part.png"
    Image.fromarray(normal_crops(1, 80)[0]).save(image)
    scores = set()
    for model in (tiny_model, tiny_model.with_suffix(".json"), tiny_model.with_name("tiny.prototypes.npy")):
        result = CliRunner().invoke(run_main, [str(image), "--model", str(model), "--jsonl", "-"])
        assert result.exit_code == 0, result.output
        assert "backend ort (CPUExecutionProvider, fp32)" in result.stderr
        scores.add(json.loads(result.stdout.splitlines()[0])["score"])
        bench = CliRunner().invoke(
            bench_main, ["--model", str(model), "--warmup", "0", "--iterations", "1", "--frame-size", "80x80"]
        )
        assert bench.exit_code == 0, bench.output
    assert len(scores) == 1


def test_open_backend_describes_what_runs(tiny_model: Path) -> None:
    with open_backend(tiny_model.with_suffix(".json"), options=BackendOptions(device="cpu", threads=1)) as opened:
        facts = opened.describe()
    assert (facts.name, facts.model, facts.precision, facts.device) == ("ort", str(tiny_model), "fp32", "cpu")
    assert facts.providers == ["CPUExecutionProvider"] and facts.details["intra_op_threads"] == 1
    assert facts.line() == "ort (CPUExecutionProvider, fp32)"


def test_every_cli_option_is_documented() -> None:
    from protoad_edge.cli.export import main as export_main

    for command in (run_main, eval_main, bench_main, export_main):
        undocumented = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
        assert undocumented == [], command.name
