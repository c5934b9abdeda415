"""Triton Inference Server, seen from protoad-edge: how a bundle looks as a Triton model, and the client
backend behind ``protoad-run --server``.

One signature serves the repository writer (``export.triton_repo``) and ``protoad-serve`` alike, so a
client cannot tell which of them serves the model. The bundle's metadata (preprocessing, thresholds,
their history) travels in the model configuration's ``parameters`` under ``protoad``, as the sidecar's
JSON: a client needs only the server's address, and thresholds set on the server's bundle are in force
on every line. ``tritonclient`` is imported when a client opens, so this module loads anywhere.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...errors import ProtoADError
from ...metadata import ModelInfo
from ..backends.base import Backend, BackendFacts, BackendOptions, check_batch
from ..sources.capture import Reconnect

PARAMETER = "protoad"  # the model-configuration parameter that carries the bundle's metadata
# Triton model names: what a repository folder and a URL path can both hold.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
SCHEMES = {"grpc": 8001}
# gRPC statuses of a server that is down, restarting or not ready yet (the request can be sent again: inference has
# no side effects), as opposed to a refused request (wrong input, a model error), which is final.
RETRYABLE_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
# Triton's words for a model it does not have ready: still loading (a server just started or restarted), or never
# there, which only the reconnect timeout can tell apart; waited for like a server that does not answer.
MODEL_ABSENT_MESSAGES = ("is not ready", "unknown model", "is not found")
RETRYABLE_MESSAGES = (*MODEL_ABSENT_MESSAGES, "failed to connect", "connection refused")
# Served models (protoad-serve and --triton-repo alike): the most frames Triton's dynamic batcher gathers into one
# call, and how long a request may wait for others to fill it (2 ms of latency at most).
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
CALL_TIMEOUT_S = 60.0  # one inference call; a slower answer counts as a lost connection and is retried


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it: dims without the batch dimension; ``reshape`` is the
    shape the model itself has where it differs (a score per image is [N] in the ONNX, [N, 1] on the wire)."""

    name: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


def signature(info: ModelInfo) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the bundle's network, batch dimension excluded: the input float32 [3, S, S] RGB 0-255,
    the anomaly map [S, S] and the image score [1] (the ONNX's [N], reshaped)."""
    s = info.crop
    map_name, score_name = info.outputs
    return [TensorSpec(info.input_name, (3, s, s))], [TensorSpec(map_name, (s, s)), TensorSpec(score_name, (1,), ())]


def info_parameter(info: ModelInfo) -> str:
    """The metadata as it travels in the model configuration: the sidecar's JSON on one line."""
    return json.dumps(info.to_dict(), sort_keys=True, separators=(",", ":"))


def info_from_config(config: dict[str, Any], source: str) -> ModelInfo:
    """The bundle's metadata from a Triton model configuration (as JSON), or an error saying what serves it."""
    text = config.get("parameters", {}).get(PARAMETER, {}).get("string_value")
    if not text:
        raise ProtoADError(
            f"{source} carries no protoad-edge metadata (parameter {PARAMETER!r}): serve the model with "
            "protoad-serve, or a repository written by protoad-export --triton-repo"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtoADError(f"{source}: parameter {PARAMETER!r} is not JSON ({exc})") from None
    return ModelInfo.from_dict(data, source)


def check_model_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ProtoADError(f"{what} {name!r}: a Triton model name holds only letters, digits, '_', '.' and '-'")
    return name


@dataclass(frozen=True)
class ServerAddress:
    """``grpc://HOST:PORT/NAME``: where a Triton server listens and which of its models judges."""

    host: str
    port: int
    model: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.target}/{self.model}"


def parse_server_url(url: str) -> ServerAddress:
    """``grpc://HOST[:PORT]/NAME`` (port 8001, Triton's gRPC default); anything else is an error naming --server."""
    match = re.match(r"^([a-z]+)://([^/:\s]+)(?::(\d+))?/([^/\s]+)/?$", url)
    if not match or match.group(1) not in SCHEMES:
        raise ProtoADError(
            f"--server {url!r}: expected grpc://HOST[:PORT]/MODEL (Triton's gRPC endpoint and the model name)"
        )
    scheme, host, port, name = match.groups()
    port_number = int(port) if port else SCHEMES[scheme]
    if not 0 < port_number < 65536:
        raise ProtoADError(f"--server {url!r}: port {port_number} is not a TCP port")
    return ServerAddress(host, port_number, check_model_name(name, f"--server {url!r}: model"))


def retryable(exc: BaseException) -> bool:
    """Whether a failed call is worth sending again: the server is down, restarting or still loading the model."""
    status = str(getattr(exc, "status", lambda: None)() or "")
    return status in RETRYABLE_STATUS or any(m in _message(exc) for m in RETRYABLE_MESSAGES)


def model_absent(exc: BaseException) -> bool:
    """Whether the server answered that it has no such model ready (yet)."""
    return any(m in _message(exc) for m in MODEL_ABSENT_MESSAGES)


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", lambda: None)() or exc).lower()


class TritonBackend(Backend):
    """A model served by Triton (``protoad-serve``, or a Triton server on a ``--triton-repo`` repository).

    Batches larger than the server's ``max_batch_size`` go as several requests. A call that fails because the
    server is unreachable, restarting or has the model not ready (loading it; at start-up too, so a line started
    with its server waits for the model) is sent again after growing pauses (``retry``: 0.5 s doubling to 2 s)
    until ``retry.give_up_after`` seconds have passed without an answer, then it is a ProtoADError. A refused
    call (a wrong request, the model's own error) fails at once. A frame is judged once: its record is written
    from the answer, never from a failed call.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        options: BackendOptions | None = None,
        *,
        retry: Reconnect = Reconnect(),  # noqa: B008 - frozen: one shared default is safe
        log: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise ProtoADError("--server needs tritonclient: pip install 'protoad-edge[triton]'") from None
        self.address = parse_server_url(url)
        self.path = Path(self.address.model)
        self.retry, self.log, self.sleep, self.clock = retry, log, sleep, clock
        self.retries = 0  # calls sent again after a failure, for the summary and the tests
        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(self.address.target)
        config = self._call(
            lambda: self.client.get_model_config(self.address.model, as_json=True), "read the model configuration of"
        )
        self.config = config.get("config", config)
        self.info = info_from_config(self.config, f"model {self.address.model} on {self.address.target}")
        self.max_batch = int(self.config.get("max_batch_size", 0)) or 1
        self.platform = self.config.get("platform") or self.config.get("backend", "")
        self._inputs, self._outputs = signature(self.info)
        self._wanted = [grpcclient.InferRequestedOutput(o.name) for o in self._outputs]  # the same for every request

    def _absent(self, waited: float) -> str:
        """The error for a model the server still does not have after ``waited`` seconds, naming those it has."""
        try:
            index = self.client.get_model_repository_index(as_json=True).get("models", [])
            served = ": it serves " + ", ".join(sorted(m["name"] for m in index if m.get("state") == "READY"))
        except Exception:  # a server may restrict its repository API (PyTriton's does)
            served = ""
        return (
            f"--server {self.address.url}: the server has no model {self.address.model!r}{served} (waited "
            f"{waited:.0f} s for it to load)"
        )

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(batch, self.info)
        maps, scores = [], []
        for start in range(0, len(batch), self.max_batch):
            amap, score = self._request(batch[start : start + self.max_batch])
            maps.append(amap)
            scores.append(score)
        return np.concatenate(maps), np.concatenate(scores)

    def _request(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (spec,) = self._inputs
        tensor = self.grpc.InferInput(spec.name, list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk)
        result = self._call(
            lambda: self.client.infer(
                self.address.model, [tensor], outputs=self._wanted, client_timeout=CALL_TIMEOUT_S
            ),
            "judge frames on",
        )
        map_spec, score_spec = self._outputs
        amap = result.as_numpy(map_spec.name)
        score = result.as_numpy(score_spec.name)
        if amap is None or score is None or amap.shape != (len(chunk), *map_spec.dims) or score.size != len(chunk):
            raise ProtoADError(
                f"{self.address.url} answered {len(chunk)} images with outputs of shapes "
                f"{None if amap is None else amap.shape} and {None if score is None else score.shape}"
            )
        return amap.astype(np.float32, copy=False), score.reshape(len(chunk)).astype(np.float32, copy=False)

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        """``call()``, sent again while the server is unreachable, restarting or loading (see ``retryable``); one
        log line says so for each of the two (no server, no model yet)."""
        started, attempt, said = self.clock(), 0, set()
        while True:
            try:
                return call()
            except ProtoADError:
                raise
            except Exception as exc:  # tritonclient raises InferenceServerException, grpc its own errors
                waited, again, first = self.clock() - started, retryable(exc), str(exc).strip().splitlines()[0]
                absent = again and model_absent(exc)
                if not again or waited >= self.retry.give_up_after:
                    if absent:
                        raise ProtoADError(self._absent(waited)) from None
                    why = f"no answer for {waited:.0f} s" if again else "refused"
                    raise ProtoADError(f"cannot {what} {self.address.url} ({why}): {first}") from None
                if absent not in said and self.log:
                    said.add(absent)
                    limit = f"up to {self.retry.give_up_after:.0f} s"
                    self.log(
                        f"server {self.address.url} has no model {self.address.model!r} ready yet ({first}): "
                        f"waiting {limit} for it to load"
                        if absent
                        else f"server {self.address.url} not answering ({first}): retrying for {limit}"
                    )
                self.sleep(self.retry.pause(attempt))
                attempt += 1
                self.retries += 1

    def describe(self) -> BackendFacts:
        return BackendFacts(
            self.name,
            self.address.url,
            "as served",
            "server",
            [self.platform] if self.platform else [],
            {"max_batch": self.max_batch, "retries": self.retries},
        )

    def close(self) -> None:
        self.client.close()
