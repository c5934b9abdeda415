"""FP32 ONNX -> mixed-precision ONNX (``NAME.fp16.onnx``) for strongly typed TensorRT builds.

TensorRT 11 dropped the FP16 builder flag: an FP16 engine comes from a graph whose tensors are
already FP16, with explicit Casts where precision changes. This does what NVIDIA's AutoCast does
for our one graph, with the ``onnx`` package alone: FP16 compute everywhere except the named
scopes (by default the L2 normalisation, whose sum of squares over 1792 channels overflows FP16),
and FP32 at the graph's input and outputs so the runtime interface does not change.

The FP16-flag engine build (TensorRT < 10.12) reads the same graph for the other half of the job:
:func:`scope_boundary` names the tensors an FP32 scope reads and writes, and the layers between
them are the ones TensorRT must keep in FP32.

``onnx`` is imported only to convert or read a graph, so this module loads on a Jetson without the onnx package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_path
from ..bundle import Bundle
from ..constants import FP32_SCOPE
from ..errors import ProtoADError

if TYPE_CHECKING:
    import onnx

FP32_SCOPES = (FP32_SCOPE,)
FP16_MAX = float(np.finfo(np.float16).max)
# Inputs that the ONNX spec types as float32 whatever the data type (Resize's scales).
FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}


def convert_to_mixed_fp16(model: onnx.ModelProto, fp32_scopes: tuple[str, ...] = FP32_SCOPES) -> onnx.ModelProto:
    """Return a copy of ``model`` computing in FP16, except nodes whose name contains one of ``fp32_scopes``.

    Float initializers and Constants become FP16 when an FP16 node reads them; a Cast is inserted on
    every edge where the producer's and the consumer's precision differ; graph inputs and outputs
    stay FP32. Metadata (``metadata_props``) is kept.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    floats = _float_tensors(model)
    scopes = _Scopes(fp32_scopes)
    half = _store_half(graph, floats, scopes)
    tail = _fp32_outputs(graph, floats, half)
    _insert_casts(graph, floats, half, scopes, tail)
    del graph.value_info[:]  # the FP32 types recorded there are stale; checkers and TensorRT re-infer them
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ProtoADError(f"mixed-precision conversion produced an invalid graph: {exc}") from None
    return out


class _Scopes:
    """Which nodes stay FP32, and which node inputs are read as FP16."""

    def __init__(self, fp32_scopes: tuple[str, ...]) -> None:
        self.fp32_scopes = fp32_scopes

    def fp32(self, node: onnx.NodeProto) -> bool:
        return any(scope in node.name for scope in self.fp32_scopes)

    def wants_half(self, node: onnx.NodeProto, index: int) -> bool:
        return not self.fp32(node) and (node.op_type, index) not in FLOAT32_ONLY_INPUTS


def scope_boundary(graph: onnx.GraphProto, scope: str) -> tuple[list[str], list[str]]:
    """(entries, exits) of the nodes named in ``scope``: the tensors they read that are computed outside it
    (not weights or constants), and the tensors they compute that are read outside it or are graph outputs."""
    inside = [node for node in graph.node if scope in node.name]
    not_entries = (
        {name for node in inside for name in node.output}
        | {t.name for t in graph.initializer}
        | {name for node in graph.node if node.op_type in ("Constant", "ConstantOfShape") for name in node.output}
    )
    read_outside = {name for node in graph.node if scope not in node.name for name in node.input}
    read_outside |= {o.name for o in graph.output}
    entries = [name for node in inside for name in node.input if name and name not in not_entries]
    exits = [name for node in inside for name in node.output if name in read_outside]
    return list(dict.fromkeys(entries)), list(dict.fromkeys(exits))


def read_scope_boundary(onnx_path: str | os.PathLike, scope: str = FP32_SCOPE) -> tuple[list[str], list[str]]:
    """:func:`scope_boundary` of the graph in ``onnx_path``; an error where the scope has no input or output."""
    model = _load(onnx_path, "the FP16 engine build on TensorRT < 10.12 (to keep the L2 normalisation in FP32)")
    entries, exits = scope_boundary(model.graph, scope)
    if not entries or not exits:
        raise ProtoADError(
            f"{onnx_path}: no computation in scope {scope!r} (nodes named so, with an input and an "
            "output): the FP16 engine would normalise in FP16 and overflow; re-export the ONNX with "
            "this version of protoad-edge"
        )
    return entries, exits


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every FP32 tensor of the graph (inferred types and initializers)."""
    import onnx
    from onnx import TensorProto

    try:
        typed = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    except Exception as exc:  # onnx raises InferenceError and friends
        raise ProtoADError(f"cannot infer the types of the ONNX graph {model.graph.name!r}: {exc}") from None
    values = [*typed.input, *typed.value_info, *typed.output]
    floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return floats | {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def _store_half(graph: onnx.GraphProto, floats: set[str], scopes: _Scopes) -> set[str]:
    """Convert constants read by FP16 nodes and retype FP16 nodes' Casts; return the tensors now stored as FP16."""
    from onnx import TensorProto

    read_as_half = {
        name
        for node in graph.node
        for i, name in enumerate(node.input)
        if name in floats and scopes.wants_half(node, i)
    }
    half: set[str] = set()
    for init in graph.initializer:
        if init.name in floats and init.name in read_as_half:
            init.CopyFrom(_to_fp16_tensor(init))
            half.add(init.name)
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and attr.t.data_type == TensorProto.FLOAT and node.output[0] in read_as_half:
                attr.t.CopyFrom(_to_fp16_tensor(attr.t, node.name))
                half.add(node.output[0])
            continue
        if scopes.fp32(node):
            continue
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        half.update(name for name in node.output if name in floats)
    return half


def _fp32_outputs(graph: onnx.GraphProto, floats: set[str], half: set[str]) -> list[onnx.NodeProto]:
    """Graph outputs keep their FP32 name and type: each FP16 one is renamed, and a final Cast restores it."""
    from onnx import TensorProto, helper

    tail = []
    for output in graph.output:
        if output.name in half:
            inner = f"{output.name}/fp16"
            _rename(graph, output.name, inner)
            half.discard(output.name)
            half.add(inner)
            floats.add(inner)
            tail.append(
                helper.make_node(
                    "Cast", [inner], [output.name], name=f"cast_to_fp32_{output.name}", to=TensorProto.FLOAT
                )
            )
    return tail


def _insert_casts(
    graph: onnx.GraphProto, floats: set[str], half: set[str], scopes: _Scopes, tail: list[onnx.NodeProto]
) -> None:
    """A Cast on every edge whose producer and consumer differ in precision (one per tensor and direction)."""
    from onnx import TensorProto, helper

    casts: dict[tuple[str, bool], str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            target = scopes.wants_half(node, i)
            if name in floats and (name in half) != target:
                key = (name, target)
                if key not in casts:
                    # Named by number, not after the tensor, so a Cast never falls inside an FP32 scope.
                    kind = "fp16" if target else "fp32"
                    casts[key] = f"{name}/{kind}"
                    to = TensorProto.FLOAT16 if target else TensorProto.FLOAT
                    nodes.append(
                        helper.make_node("Cast", [name], [casts[key]], name=f"cast_to_{kind}_{len(casts)}", to=to)
                    )
                node.input[i] = casts[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes + tail)


def write_fp16_onnx(
    onnx_path: str | os.PathLike, out_path: str | os.PathLike | None = None, fp32_scopes: tuple[str, ...] = FP32_SCOPES
) -> Path:
    """Write the mixed-precision copy of ``NAME.onnx`` as ``NAME.fp16.onnx`` (atomically); returns its path."""
    src = Path(onnx_path)
    dst = Path(out_path) if out_path is not None else Bundle.of(src).fp16_onnx
    model = _load(src, "the mixed-precision ONNX for strongly typed (TensorRT 10.12+) FP16 engines")
    converted = convert_to_mixed_fp16(model, fp32_scopes)
    import onnx  # there: _load needed it

    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
    return dst


def _load(onnx_path: str | os.PathLike, what: str) -> onnx.ModelProto:
    """The ONNX model at ``onnx_path``; ``what`` names the step that needs the onnx package, should it be missing."""
    try:
        import onnx
    except ImportError:
        raise ProtoADError(f"{what} needs the onnx package: pip install onnx") from None
    try:
        return onnx.load(str(onnx_path))
    except FileNotFoundError:
        raise ProtoADError(f"ONNX model not found: {onnx_path}") from None
    except Exception as exc:  # protobuf DecodeError and friends
        raise ProtoADError(f"cannot read ONNX model {onnx_path}: {exc}") from None


def _to_fp16_tensor(tensor: onnx.TensorProto, owner: str = "") -> onnx.TensorProto:
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor)
    if values.size and float(np.abs(values).max()) > FP16_MAX:
        raise ProtoADError(
            f"{owner or tensor.name}: a value exceeds the FP16 range ({FP16_MAX:g}); keep it in FP32 scope"
        )
    return numpy_helper.from_array(values.astype(np.float16), tensor.name)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new
