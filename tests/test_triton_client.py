"""protoad-run --server's retry decisions against a real gRPC server that speaks Triton's protocol on 127.0.0.1.

The server answers like Triton (a model configuration carrying the bundle's metadata, inference results) after a
scripted run of failures that a real Triton gives only by accident: a refusal, UNAVAILABLE in words other than
"failed to connect", a model that is not loaded yet. Real sockets, the real tritonclient: what is counted is what
reached the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from protoad_edge.errors import ProtoADError
from protoad_edge.metadata import ModelInfo
from protoad_edge.runtime.serving.triton import PARAMETER, TritonBackend, info_parameter, retryable, signature
from protoad_edge.runtime.sources.capture import Reconnect

CROP = 32
INFO = ModelInfo(
    category="tiny",
    resize=36,
    crop=CROP,
    backbone="wide_resnet50_2",
    weights="none",
    feature_upsample="bilinear",
    num_prototypes=4,
    image_threshold=0.5,
    pixel_threshold=0.5,
)
Failure = tuple[grpc.StatusCode, str]


class Triton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Model ``tiny`` (score: the image's mean / 255) behind ``failures[rpc]``, given one per call before it answers."""

    def __init__(self, failures: dict[str, list[Failure]], served: tuple[str, ...] = ("tiny",)) -> None:
        self.failures, self.served = failures, served
        self.calls = {"ModelConfig": 0, "ModelInfer": 0}

    def _fail(self, rpc: str, context: grpc.ServicerContext) -> None:
        self.calls[rpc] += 1
        if self.failures.get(rpc):
            context.abort(*self.failures[rpc].pop(0))

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - the RPC's name
        self._fail("ModelConfig", context)
        if request.name not in self.served:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        (image,), outputs = signature(INFO)
        config = model_config_pb2.ModelConfig(name=request.name, backend="python", max_batch_size=4)
        config.input.add(name=image.name, data_type=model_config_pb2.TYPE_FP32, dims=image.dims)
        for out in outputs:
            config.output.add(name=out.name, data_type=model_config_pb2.TYPE_FP32, dims=out.dims)
        config.parameters[PARAMETER].string_value = info_parameter(INFO)
        return service_pb2.ModelConfigResponse(config=config)

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.RepositoryIndexResponse(
            models=[
                service_pb2.RepositoryIndexResponse.ModelIndex(name=n, version="1", state="READY") for n in self.served
            ]
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._fail("ModelInfer", context)
        shape = tuple(request.inputs[0].shape)
        images = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        map_spec, score_spec = signature(INFO)[1]
        maps = (images.mean(axis=1) / 255).astype(np.float32)
        scores = (images.mean(axis=(1, 2, 3)) / 255).reshape(-1, 1).astype(np.float32)
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for spec, array in ((map_spec, maps), (score_spec, scores)):
            response.outputs.add(name=spec.name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(triton)``: the URL of model tiny on a gRPC server on 127.0.0.1 running ``triton``."""
    servers: list[grpc.Server] = []

    def start(triton: Triton) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"grpc://127.0.0.1:{port}/tiny"

    yield start
    for server in servers:
        server.stop(None)


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, 3, CROP, CROP)).astype(np.float32)


def test_the_fake_triton_answers_like_one(serve: Any) -> None:
    """The server these tests count on answers as Triton does: the bundle's metadata, one score per image."""
    batch = images(6)
    with TritonBackend(serve(Triton({}))) as remote:
        assert remote.info == INFO and remote.max_batch == 4
        maps, scores = remote.infer(batch)  # 4 + 2
    assert maps.shape == (6, CROP, CROP)
    np.testing.assert_allclose(scores, batch.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)


def test_a_refused_request_fails_at_once(serve: Any) -> None:
    """INVALID_ARGUMENT is the server refusing the request: sent once, never again until the reconnect timeout."""
    refusal = (grpc.StatusCode.INVALID_ARGUMENT, "inference request batch-size must be <= 4")
    triton = Triton({"ModelInfer": [refusal] * 50})
    logged: list[str] = []
    with TritonBackend(serve(triton), retry=Reconnect(give_up_after=5.0), log=logged.append) as remote:
        started = time.monotonic()
        with pytest.raises(
            ProtoADError,
            match=r"cannot judge frames on grpc://127.0.0.1:\d+/tiny \(refused\): "
            r".*batch-size must be <= 4",
        ):
            remote.infer(images(1))
        assert triton.calls["ModelInfer"] == 1 and remote.retries == 0 and logged == []
        assert time.monotonic() - started < 2.5  # not the 5 s reconnect timeout


@pytest.mark.parametrize(
    "status, message",
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed"),  # the server went away mid-call
        (grpc.StatusCode.UNAVAILABLE, "Connection reset by peer"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    ],
)
def test_unavailable_in_any_words_is_sent_again(serve: Any, status: grpc.StatusCode, message: str) -> None:
    """A status of a server that is restarting is retried whatever its message says (not only 'failed to
    connect'), and the frames are judged once it answers."""
    triton = Triton({"ModelInfer": [(status, message), (status, message)]})
    logged: list[str] = []
    with TritonBackend(
        serve(triton), retry=Reconnect(give_up_after=30.0), log=logged.append, sleep=lambda s: None
    ) as remote:
        _, scores = remote.infer(images(2))
    assert triton.calls["ModelInfer"] == 3 and remote.retries == 2
    assert scores.shape == (2,)
    assert len(logged) == 1 and "not answering" in logged[0] and message in logged[0] and "up to 30 s" in logged[0]


def test_a_model_still_loading_at_start_up_is_waited_for(serve: Any) -> None:
    """A line started with its server: the server answers but has no model yet. The client waits (one line says
    so) and runs once the model is there."""
    loading = [(grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'tiny' is not found")] * 2 + [
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'tiny' version 1 is not ready")
    ] * 2
    triton = Triton({"ModelConfig": loading})
    logged: list[str] = []
    with TritonBackend(
        serve(triton), retry=Reconnect(give_up_after=30.0), log=logged.append, sleep=lambda s: None
    ) as remote:
        assert remote.info == INFO and remote.retries == 4
        remote.infer(images(1))
    assert triton.calls["ModelConfig"] == 5
    assert len(logged) == 1 and "has no model 'tiny' ready yet" in logged[0] and "waiting up to 30 s" in logged[0]


def test_a_model_that_never_comes_names_the_served_ones_after_the_timeout(serve: Any) -> None:
    triton = Triton({}, served=("cable", "screw"))
    started = time.monotonic()
    with pytest.raises(ProtoADError, match=r"the server has no model 'tiny': it serves cable, screw \(waited [12] s "):
        TritonBackend(serve(triton), retry=Reconnect(give_up_after=1.0))
    assert time.monotonic() - started >= 1.0 and triton.calls["ModelConfig"] >= 2  # waited, not refused


@pytest.mark.parametrize(
    "status, message, again",
    [
        ("StatusCode.UNAVAILABLE", "Socket closed", True),  # no "failed to connect": the status alone decides
        ("StatusCode.UNAVAILABLE", "", True),
        ("StatusCode.DEADLINE_EXCEEDED", "", True),
        ("StatusCode.INVALID_ARGUMENT", "inference request batch-size must be <= 4", False),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'image'", False),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'tiny' is not found", True),
    ],
)
def test_the_retry_decision(status: str, message: str, again: bool) -> None:
    """The decision table itself (tritonclient's exception: a status and a message)."""
    from tritonclient.utils import InferenceServerException

    assert retryable(InferenceServerException(message, status=status)) is again
