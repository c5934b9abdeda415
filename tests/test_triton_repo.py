"""The Triton model repository of a bundle: every config.pbtxt parses as Triton's own ModelConfig message, and says
what the bundle is; the repository is written whole or not at all; the client's address and retry decisions."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from protoad_edge.atomic import atomic_folder
from protoad_edge.bundle import Bundle
from protoad_edge.cli.export import main as export_main
from protoad_edge.errors import ProtoADError
from protoad_edge.export.triton_repo import quote, write_repository
from protoad_edge.metadata import ModelInfo
from protoad_edge.runtime.serving.serve import stub_library_path
from protoad_edge.runtime.serving.triton import info_from_config, parse_server_url, retryable


def parse(path: Path) -> model_config_pb2.ModelConfig:
    """Strict: an unknown (misspelt) field is a ParseError."""
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


@pytest.fixture()
def bundle(tiny_model: Path, tmp_path: Path) -> Bundle:
    """A copy of the tiny bundle, so tests may add a plan or edit the sidecar."""
    for path in tiny_model.parent.glob("tiny.*"):
        shutil.copy(path, tmp_path / path.name)
    return Bundle(tmp_path / "tiny")


def add_plan(bundle: Bundle, max_batch: int | None) -> None:
    """A stand-in plan (Triton is not started on it here) with the facts the engine step records."""
    bundle.plan.write_bytes(b"plan bytes")
    info = bundle.info()
    info.tensorrt_version, info.gpu_name = "10.13.0", "NVIDIA RTX 4000"
    if max_batch is not None:
        info.build["tensorrt"] = {"max_batch": max_batch, "opt_batch": 1}
    info.save_json(bundle.sidecar)


def test_onnx_and_plan_models_parse_as_triton_model_configs(bundle: Bundle, tmp_path: Path) -> None:
    add_plan(bundle, max_batch=16)
    logged: list[str] = []
    written = write_repository(bundle.onnx, tmp_path / "repo", log=logged.append)
    assert [(m.name, m.platform, m.max_batch) for m in written] == [
        ("tiny", "onnxruntime_onnx", 8),
        ("tiny_trt", "tensorrt_plan", 16),
    ]
    info = bundle.info()
    for model, file_name, platform, batch in (
        ("tiny", "model.onnx", "onnxruntime_onnx", 8),
        ("tiny_trt", "model.plan", "tensorrt_plan", 16),
    ):
        folder = tmp_path / "repo" / model
        assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
        assert [p.name for p in (folder / "1").iterdir()] == [file_name]
        config = parse(folder / "config.pbtxt")
        assert (config.name, config.platform, config.max_batch_size) == (model, platform, batch)
        (image,) = config.input
        assert (image.name, image.data_type, list(image.dims)) == ("image", model_config_pb2.TYPE_FP32, [3, 64, 64])
        amap, score = config.output
        assert (amap.name, list(amap.dims), amap.HasField("reshape")) == ("anomaly_map", [64, 64], False)
        # The ONNX score is [N]: [N, 1] on the wire, reshaped to the model's [N].
        assert (score.name, list(score.dims), score.HasField("reshape"), list(score.reshape.shape)) == (
            "score",
            [1],
            True,
            [],
        )
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert config.version_policy.latest.num_versions == 1
        served = ModelInfo.from_dict(json.loads(config.parameters["protoad"].string_value))
        assert served == info  # thresholds, preprocessing and history travel whole
    assert (tmp_path / "repo/tiny/1/model.onnx").read_bytes() == bundle.onnx.read_bytes()
    assert any("TensorRT 10.13.0 on NVIDIA RTX 4000" in line for line in logged)


def test_a_misspelt_field_fails_the_parse(bundle: Bundle, tmp_path: Path) -> None:
    write_repository(bundle.onnx, tmp_path / "repo")
    path = tmp_path / "repo/tiny/config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(text_format.ParseError, match="max_batch_sise"):
        parse(path)


def test_tensorrt_acceleration_of_onnxruntime_is_declared_for_the_gpu(bundle: Bundle, tmp_path: Path) -> None:
    write_repository(bundle.onnx, tmp_path / "repo", accelerate="tensorrt")
    (accelerator,) = parse(
        tmp_path / "repo/tiny/config.pbtxt"
    ).optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    write_repository(bundle.onnx, tmp_path / "plain")
    assert not parse(tmp_path / "plain/tiny/config.pbtxt").HasField("optimization")


def test_max_batch_is_capped_where_a_tensor_would_pass_two_to_the_31_elements(bundle: Bundle, tmp_path: Path) -> None:
    info = bundle.info()
    info.num_prototypes = 2_000_000  # crop 64: 16 x 16 x 2e6 = 5.1e8 elements per image, so at most 4 per batch
    info.save_json(bundle.sidecar)
    (written,) = write_repository(bundle.onnx, tmp_path / "repo", max_batch=32)
    assert written.max_batch == 4 == parse(tmp_path / "repo/tiny/config.pbtxt").max_batch_size
    info.num_prototypes = 48
    info.save_json(bundle.sidecar)
    (written,) = write_repository(bundle.onnx, tmp_path / "repo", max_batch=3)
    assert written.max_batch == 3


def test_a_plan_without_its_batch_range_is_left_out_and_said(bundle: Bundle, tmp_path: Path) -> None:
    add_plan(bundle, max_batch=None)
    logged: list[str] = []
    written = write_repository(bundle.onnx, tmp_path / "repo", log=logged.append)
    assert [m.name for m in written] == ["tiny"] and not (tmp_path / "repo/tiny_trt").exists()
    assert any("left out" in line and "tiny.plan" in line for line in logged)


@pytest.mark.parametrize("text", ['a "quoted" \\ path', "déjà vu – 検査", "line\nbreak\ttab\x01"])
def test_strings_survive_the_text_format(text: str) -> None:
    config = text_format.Parse(f"name: {quote(text)}", model_config_pb2.ModelConfig())
    assert config.name == text


def test_a_rewrite_replaces_the_model_folder_whole(bundle: Bundle, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(bundle.onnx, repo)
    (repo / "tiny" / "stale.txt").write_text("from an older export")
    (repo / "other").mkdir()  # another model of the repository is left alone
    info = bundle.info()
    info.image_threshold = 0.5
    info.save_json(bundle.sidecar)
    write_repository(bundle.onnx, repo)
    assert not (repo / "tiny" / "stale.txt").exists() and (repo / "other").is_dir()
    assert json.loads(parse(repo / "tiny/config.pbtxt").parameters["protoad"].string_value)["image_threshold"] == 0.5
    assert sorted(p.name for p in repo.iterdir()) == ["other", "tiny"]  # no temporary folder left


def test_a_failed_write_leaves_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.pbtxt").write_text("old")
    with pytest.raises(OSError):
        with atomic_folder(target) as tmp:
            (tmp / "config.pbtxt").write_text("new, half")
            raise OSError("disk full")
    assert (target / "config.pbtxt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_export_from_onnx_writes_the_repository_without_the_engine(bundle: Bundle, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        export_main,
        [
            "--from-onnx",
            str(bundle.onnx),
            "--tensorrt",
            "no",
            "--triton-repo",
            str(tmp_path / "repo"),
            "--triton-max-batch",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert parse(tmp_path / "repo/tiny/config.pbtxt").max_batch_size == 2
    assert "triton        tiny (onnxruntime_onnx)" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--from-onnx", "{tmp}/missing.onnx", "--triton-repo", "{tmp}/repo"],
            "--from-onnx {tmp}/missing.onnx: no such file",
        ),
        (
            ["--from-onnx", "{onnx}", "--tensorrt", "no", "--triton-repo", "{onnx}"],
            "'--triton-repo': Directory '{onnx}' is a file",
        ),
    ],
)
def test_repository_mistakes_are_one_line(bundle: Bundle, tmp_path: Path, args: list[str], message: str) -> None:
    fill = {"tmp": tmp_path, "onnx": bundle.onnx}
    result = CliRunner().invoke(export_main, [a.format(**fill) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message.format(**fill) in result.output


def test_a_model_name_triton_cannot_hold_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(ProtoADError, match="letters, digits"):
        write_repository(bundle.onnx, tmp_path / "repo", name="line 3/cam")
    with pytest.raises(ProtoADError, match="--triton-accelerate"):
        write_repository(bundle.onnx, tmp_path / "repo", accelerate="openvino")
    with pytest.raises(ProtoADError, match="--triton-repo .*tiny.onnx is a file"):
        write_repository(bundle.onnx, bundle.onnx)


# --- the client's side -------------------------------------------------------------------------------


def test_server_urls() -> None:
    a = parse_server_url("grpc://line3.local/cable")
    assert (a.host, a.port, a.model, a.url) == ("line3.local", 8001, "cable", "grpc://line3.local:8001/cable")
    assert parse_server_url("grpc://10.0.0.5:9001/cable_trt/").port == 9001
    for bad in (
        "http://h:8000/cable",
        "grpc://h:8001",
        "grpc://h:8001/a/b",
        "grpc://h:0/cable",
        "h:8001/cable",
        "grpc://h:8001/line 3",
    ):
        with pytest.raises(ProtoADError, match="--server"):
            parse_server_url(bad)


class Refusal(Exception):
    """Shaped like tritonclient's InferenceServerException: a status and a message."""

    def __init__(self, status: str | None, message: str) -> None:
        super().__init__(message)
        self._status, self._message = status, message

    def status(self) -> str | None:
        return self._status

    def message(self) -> str:
        return self._message


@pytest.mark.parametrize(
    "status, message, again",
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", True),  # server down or restarting
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True),
        (None, "Request for unknown model: 'tiny' is not found", True),  # the restarted server still loading it
        (None, "Request for unknown model: 'tiny' version 1 is not ready", True),
        (None, "Request for unknown model: 'tiny' has no available versions", True),  # loading, another wording
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'image'", False),  # our request is wrong: final
        ("StatusCode.INTERNAL", "model raised an exception", False),
    ],
)
def test_which_failures_are_sent_again(status: str | None, message: str, again: bool) -> None:
    assert retryable(Refusal(status, message)) is again


def test_a_model_config_without_protoad_metadata_says_what_serves_it() -> None:
    with pytest.raises(ProtoADError, match="protoad-serve, or a repository written by protoad-export --triton-repo"):
        info_from_config({"name": "resnet", "parameters": {}}, "model resnet on h:8001")


# --- protoad-serve's Python stub ---------------------------------------------------------------------


def test_the_stub_is_pointed_at_this_interpreters_libpython(tmp_path: Path) -> None:
    (tmp_path / "libpython3.11.so.1.0").write_bytes(b"")
    config = {"LDVERSION": "3.11", "LIBDIR": str(tmp_path), "Py_ENABLE_SHARED": 1}
    path, line = stub_library_path(config, {"LD_LIBRARY_PATH": "/opt/cuda/lib"})
    assert path == f"{tmp_path}:/opt/cuda/lib" and str(tmp_path / "libpython3.11.so.1.0") in line
    assert stub_library_path(config, {})[0] == str(tmp_path)
    assert stub_library_path(config, {"LD_LIBRARY_PATH": path})[0] is None  # already first: left as it is


def test_a_python_without_a_shared_libpython_is_said_plainly(tmp_path: Path) -> None:
    (tmp_path / "libpython3.11.a").write_bytes(b"")
    static = {"LDVERSION": "3.11", "LIBDIR": str(tmp_path), "Py_ENABLE_SHARED": 0}
    path, line = stub_library_path(static, {})
    assert path is None and "--enable-shared" in line and "libpython3.11.so.1.0" in line
    missing = {"LDVERSION": "3.11", "LIBDIR": str(tmp_path / "gone"), "Py_ENABLE_SHARED": 1}
    assert stub_library_path(missing, {})[0] is None


def test_a_model_that_fails_to_load_is_reported_by_its_error_not_its_traceback() -> None:
    from protoad_edge.runtime.serving.serve import failure

    text = (
        "[400] load failed for model 'tiny': version 1 is at UNAVAILABLE state: Internal: TritonModelException: "
        'Model initialize error: Traceback (most recent call last):\\n  File "model.py", line 419\\n'
        "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'\\n\\nAt:\\n"
    )
    assert failure(text) == "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'"
    assert failure("port 8001 in use\nmore") == "port 8001 in use"


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
def test_no_server_is_retried_then_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: the client retries for the reconnect timeout, then says so (real gRPC)."""
    import socket

    from protoad_edge.runtime.serving.triton import TritonBackend
    from protoad_edge.runtime.sources.capture import Reconnect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logged: list[str] = []
    with pytest.raises(
        ProtoADError,
        match=rf"cannot read the model configuration of grpc://127.0.0.1:{port}/tiny "
        r"\(no answer for [12] s\)",
    ):
        TritonBackend(f"grpc://127.0.0.1:{port}/tiny", retry=Reconnect(give_up_after=1.0), log=logged.append)
    assert len(logged) == 1 and "retrying" in logged[0]  # said once, not per attempt


def test_missing_client_and_server_libraries_name_their_extras(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    from protoad_edge.runtime.backends.ort import OrtBackend
    from protoad_edge.runtime.serving.serve import ServeOptions, serve
    from protoad_edge.runtime.serving.triton import TritonBackend

    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(ProtoADError, match=r"pip install 'protoad-edge\[triton\]'"):
        TritonBackend("grpc://127.0.0.1:8001/tiny")
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(ProtoADError, match=r"pip install 'protoad-edge\[serve\]' \(PyTriton needs numpy < 2"):
        serve(OrtBackend(tiny_model), ServeOptions(name="tiny"), log=print)


def test_serve_ports_must_differ_and_be_free() -> None:
    import socket

    from protoad_edge.runtime.serving.serve import ServeOptions, check_ports

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(
            ProtoADError, match=rf"--grpc-port {port}: cannot listen on 127.0.0.1:{port} \(Address already in use\)"
        ):
            check_ports(ServeOptions("tiny", "127.0.0.1", http_port=free, grpc_port=port, metrics_port=free + 1))
    with pytest.raises(ProtoADError, match="the three ports must differ"):
        check_ports(ServeOptions("tiny", "127.0.0.1", http_port=free, grpc_port=free, metrics_port=free + 1))
    check_ports(ServeOptions("tiny", "127.0.0.1", http_port=free, grpc_port=port, metrics_port=free + 1))  # freed: fine


def test_a_failed_swap_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.pbtxt").write_text("old")
    real = os.replace

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("disk went read-only")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="read-only"):
        with atomic_folder(target) as tmp:
            (tmp / "config.pbtxt").write_text("new")
    assert (target / "config.pbtxt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
