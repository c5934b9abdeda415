"""The exported graph's prototype stage, read and extended in place, and the graph cut around it: what teaching a
deployed model needs, with the ``onnx`` package and onnxruntime only (no torch, as on a Jetson).

The prototype stage (``build.network.NearestPrototype``) is one MatMul per block of :data:`PROTOTYPE_CHUNK`
prototypes (the block is an initializer), each followed by a ReduceMax over its prototypes, and a chain of Max
nodes keeping the running maximum. Appending prototypes fills the last block up to the chunk and adds blocks in the
same form, so the stage holds exactly the blocks an export of the combined prototypes would; the same code extends
``NAME.onnx``, the mixed-precision ``NAME.fp16.onnx`` (FP16 blocks) and ``NAME.int8.onnx`` (FP32 blocks: the
prototype MatMuls are never quantized), each block in the precision the graph already stores them in.

The features are the graph's own: :func:`taps` names the L2 normalisation scope's (``FP32_SCOPE``) output, what
the prototype stage compares (the normalised patch vectors, or with ``--project-dims`` their projection), its
input (the raw features a projection reads) and the patch scores the upsampling reads; a graph without that scope
predates it: re-export. :func:`head_graph` is the graph up to those features (no prototype stage), :func:`tail_graph`
its end: patch scores to map and image score; both are cuts of the same graph (``_cut``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..constants import FP32_SCOPE, PROTOTYPE_CHUNK
from ..errors import ProtoADError
from ..metadata import MAP_NAME, SCORE_NAME, ModelInfo
from .fp16 import _load, scope_boundary
from .int8 import prototype_matmuls

if TYPE_CHECKING:
    import onnx

TAUGHT = "taught"  # in the names of the blocks and nodes a teach adds


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """A graph of the bundle, or one line saying that teaching needs the onnx package."""
    return _load(path, "teaching a model (protoad-teach)")


@dataclass
class Stage:
    """Where the prototype stage is in a graph."""

    matmuls: list[onnx.NodeProto]  # one per block, in graph order
    blocks: list[onnx.TensorProto]  # the prototype initializers they multiply by, [k, D] each
    reduces: list[onnx.NodeProto]  # the ReduceMax after each MatMul
    output: str  # the running maximum after the last block: the max cosine of every patch, [N, 1, H*W]

    @property
    def count(self) -> int:
        return sum(int(block.dims[0]) for block in self.blocks)

    @property
    def dims(self) -> int:
        return int(self.blocks[0].dims[1])


def find_stage(model: onnx.ModelProto, where: str = "the graph") -> Stage:
    """The prototype stage of ``model`` (``where`` names it in errors)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    names = set(prototype_matmuls(model))
    matmuls = [n for n in graph.node if n.name in names]
    blocks = [next((inits[i] for i in n.input if i in inits), None) for n in matmuls]
    reduces = [next((r for r in readers.get(n.output[0], []) if r.op_type == "ReduceMax"), None) for n in matmuls]
    if not matmuls or None in blocks or None in reduces:
        raise ProtoADError(
            f"{where}: no prototype stage (MatMuls of prototype blocks, each with a ReduceMax) after "
            f"the L2 normalisation: re-export it with this version of protoad-edge"
        )
    outputs = {r.output[0] for r in reduces}
    current, merged = reduces[0].output[0], {reduces[0].output[0]}
    while True:
        step = next(
            (
                n
                for n in readers.get(current, [])
                if n.op_type == "Max" and len(n.input) == 2 and set(n.input) - {current} <= outputs
            ),
            None,
        )
        if step is None:
            break
        merged |= set(step.input) & outputs
        current = step.output[0]
    if merged != outputs:
        raise ProtoADError(f"{where}: the prototype blocks are not merged by one chain of Max nodes: re-export it")
    return Stage(matmuls, blocks, reduces, current)  # type: ignore[arg-type]


def read_prototypes(model: onnx.ModelProto, where: str = "the graph") -> np.ndarray:
    """The prototypes the graph compares with, [K, D] float32 (projected where the graph projects)."""
    from onnx import numpy_helper

    blocks = find_stage(model, where).blocks
    return np.concatenate([numpy_helper.to_array(b).astype(np.float32) for b in blocks])


def append_prototypes(model: onnx.ModelProto, rows: np.ndarray, info: ModelInfo, where: str = "the graph") -> int:
    """Append ``rows`` [M, D] (unit vectors in the space the stage compares in) to the prototype stage of
    ``model``, in place, and make ``info`` its metadata; returns the new number of prototypes."""
    from onnx import helper, numpy_helper

    stage = find_stage(model, where)
    if rows.ndim != 2 or rows.shape[1] != stage.dims:
        raise ProtoADError(f"{where}: prototypes of {stage.dims} dimensions, cannot append {list(rows.shape)}")
    graph = model.graph
    count = stage.count + len(rows)
    last = stage.blocks[-1]
    dtype = helper.tensor_dtype_to_np_dtype(last.data_type)
    fill = min(len(rows), max(0, PROTOTYPE_CHUNK - int(last.dims[0])))
    if fill:
        grown = np.concatenate([numpy_helper.to_array(last), rows[:fill].astype(dtype)])
        last.CopyFrom(numpy_helper.from_array(grown, last.name))
        stale = {n.output[0] for n in stage.matmuls}  # shapes recorded for a block's product no longer hold
        for info_ in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(info_)
    names = (
        {t.name for t in graph.initializer} | {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    )
    new_nodes = []
    current = stage.output
    for index, start in enumerate(range(fill, len(rows), PROTOTYPE_CHUNK)):
        tag = _fresh(names, f"{TAUGHT}_{len(stage.blocks) + index}")
        block = numpy_helper.from_array(rows[start : start + PROTOTYPE_CHUNK].astype(dtype), f"prototypes.blocks.{tag}")
        graph.initializer.append(block)
        matmul = _clone(stage.matmuls[-1], f"/prototypes/MatMul_{tag}", {stage.blocks[-1].name: block.name})
        reduce = _clone(
            stage.reduces[-1], f"/prototypes/ReduceMax_{tag}", {stage.matmuls[-1].output[0]: matmul.output[0]}
        )
        merge = helper.make_node(
            "Max", [current, reduce.output[0]], [f"/prototypes/Max_{tag}_output_0"], name=f"/prototypes/Max_{tag}"
        )
        new_nodes += [matmul, reduce, merge]
        current = merge.output[0]
    if new_nodes:
        for node in graph.node:  # the stage's readers read the new maximum
            for i, name in enumerate(node.input):
                if name == stage.output:
                    node.input[i] = current
        producer = next(i for i, n in enumerate(graph.node) if stage.output in n.output)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(producer + 1 + offset, node)
    if info.num_prototypes != count:
        raise ProtoADError(
            f"{where}: {count:,} prototypes after appending, but the metadata says {info.num_prototypes:,}"
        )
    set_metadata(model, info)
    return count


def set_metadata(model: onnx.ModelProto, info: ModelInfo) -> None:
    """Replace the graph's embedded metadata with ``info``."""
    from onnx import helper

    del model.metadata_props[:]
    helper.set_model_props(model, info.to_props())


def _fresh(taken: set[str], base: str) -> str:
    """``base``, or ``base_2``, ``base_3``...: a tag no block or node of the graph uses yet (now taken)."""
    name, n = base, 1
    while f"prototypes.blocks.{name}" in taken or f"/prototypes/MatMul_{name}" in taken:
        n += 1
        name = f"{base}_{n}"
    taken.update({f"prototypes.blocks.{name}", f"/prototypes/MatMul_{name}"})
    return name


def _clone(node: onnx.NodeProto, name: str, inputs: dict[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` named ``name``, with ``inputs`` renamed and its one output named after it."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = name
    for i, value in enumerate(copy.input):
        copy.input[i] = inputs.get(value, value)
    del copy.output[:]
    copy.output.append(f"{name}_output_0")
    return copy


@dataclass(frozen=True)
class Taps:
    """The tensors of a graph that teaching reads."""

    compared: str  # what the prototype stage compares: [N, D, h, w] unit patch vectors (projected, if it projects)
    raw: str  # what the L2 normalisation reads: [N, 1792, h, w] features before normalisation
    patch_scores: str  # 1 - max cosine, [N, 1, h, w]: what the upsampling reads


def taps(model: onnx.ModelProto, where: str = "the graph") -> Taps:
    entries, exits = scope_boundary(model.graph, FP32_SCOPE)
    if len(entries) != 1 or len(exits) != 1:
        raise ProtoADError(
            f"{where}: no L2 normalisation scope {FP32_SCOPE!r} with one input and one output (an "
            "export older than it): rebuild the bundle with protoad-export"
        )
    stage = find_stage(model, where)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    todo, seen = [stage.output], set()
    while todo:  # downstream of the stage, the first Resize (the upsampling to the input size) reads the scores
        name = todo.pop(0)
        for node in readers.get(name, []):
            if node.op_type == "Resize":
                return Taps(exits[0], entries[0], node.input[0])
            if node.name not in seen:
                seen.add(node.name)
                todo.extend(node.output)
    raise ProtoADError(f"{where}: no upsampling after the prototype stage: re-export it")


def head_graph(model: onnx.ModelProto, raw: bool) -> bytes:
    """The graph from the image (its one input) to the patch vectors the prototype stage compares (and with ``raw``
    the features the L2 normalisation reads): the backbone without the prototype stage, whose cost grows with K (at
    K 7,000, four fifths of a frame's time on a CPU); teaching finds the nearest prototypes itself
    (``teach.search``)."""
    t = taps(model)
    return _cut(model, model.graph.input[0].name, [t.compared, t.raw][: 1 + raw], "head").SerializeToString()


def tail_graph(model: onnx.ModelProto) -> bytes:
    """The graph from the patch scores [N, 1, h, w] (its one input) to the anomaly map and the image score:
    upsampling, blur and maximum, as the bundle computes them."""
    tail = _cut(model, taps(model).patch_scores, [MAP_NAME, SCORE_NAME], "tail")
    if model.graph.input[0].name in {name for node in tail.graph.node for name in node.input}:
        raise ProtoADError("the map and score depend on the image beyond the patch scores: re-export the model")
    return tail.SerializeToString()


def _cut(model: onnx.ModelProto, start: str, outputs: list[str], name: str) -> onnx.ModelProto:
    """The nodes of ``model`` that ``outputs`` need, read from ``start`` on, as a graph with ``start`` its input (the
    image input, or else the patch scores, [N, 1, h, w])."""
    from onnx import TensorProto, helper

    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[str] = set()
    todo = list(outputs)
    while todo:
        tensor = todo.pop()
        node = producer.get(tensor)
        if tensor == start or node is None or node.name in needed:
            continue
        needed.add(node.name)
        todo.extend(node.input)
    nodes = [n for n in model.graph.node if n.name in needed]
    read = {tensor for n in nodes for tensor in n.input}
    if start == model.graph.input[0].name:
        inputs = [model.graph.input[0]]
    else:
        inputs = [helper.make_tensor_value_info(start, TensorProto.FLOAT, ["n", 1, "h", "w"])]
    declared = {o.name: o for o in model.graph.output}
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        [declared.get(o) or helper.make_empty_tensor_value_info(o) for o in outputs],
        [i for i in model.graph.initializer if i.name in read],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
