"""Mixed precision for OpenVINO: the backbone in BF16 or FP16, every node from the L2 normalisation's input to the
score in FP32 (``constants.FP32_SCOPE`` and all that follows it; the TensorRT FP16 build keeps the L2 norm alone),
and the input's scaling ahead of the first convolution in FP32 too (:func:`input_scaling`).

The score is 1 minus a cosine near 1: BF16's 8-bit significand erases it (whole network in BF16 on bottle, random
weights: image AUROC 86.9 -> 84.0, pixel 84.2 -> 73.6), while the backbone alone in BF16 keeps it (issue 29); the
L2 norm alone in FP32 is not enough (tests: the gate refuses that scope).

How the scope is kept: by the graph's own element types. The model is read in FP32 and lowered outside the scope -
a ``Convert`` to BF16/FP16 after the input's scaling, the backbone's constants converted (rounded to nearest), a
``Convert`` back to FP32 on every edge entering the scope - and compiled with ``INFERENCE_PRECISION_HINT`` f32, under
which OpenVINO's CPU plugin lowers nothing itself (``Graph::EnforceInferencePrecision`` returns at once) and runs each
node in the precision the model gives it. OpenVINO's mark for this, the ``DisablePrecisionConversion`` rt_info
(``disable_conversion``, what ``ov::disable_fp16_compression`` became), was tried first: the CPU plugin honours it per
node under a BF16 hint (``Node::keepOrigPrecision``), but it is not copyable, and nodes its own passes rebuild
(ConvertDivide's Power, 1 - x, the Resize, the blur) lost it and ran in BF16 (OpenVINO 2026.4). So the compiled model
is read back instead (:func:`read_back`): every node kept in FP32 must run and write FP32, and a device that does
otherwise is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...constants import FP32_SCOPE
from ...errors import ProtoADError

# BackendOptions.precision -> (OpenVINO's inference precision hint, element type of the lowered backbone or None).
# "bf16"/"fp16": mixed, the scope in FP32; "-all": the whole network at the device's hint (the accuracy gate decides).
MODES: dict[str, tuple[str, str | None]] = {
    "fp32": ("f32", None),
    "bf16": ("f32", "bf16"),
    "fp16": ("f32", "f16"),
    "bf16-all": ("bf16", None),
    "fp16-all": ("f16", None),
}
# The device capability (OPTIMIZATION_CAPABILITIES) each reduced precision needs.
NEEDS = {"bf16": "BF16", "fp16": "FP16"}
# Layer types whose runtime precision says what the heavy compute ran in.
COMPUTE_LAYERS = ("Convolution", "MatMul", "FullyConnected")
# The same in the model as read (before the CPU plugin turns MatMuls into FullyConnected).
COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul")


def mode(precision: str) -> tuple[str, str | None]:
    """(hint, lowered element type) of a ``BackendOptions.precision``; an unknown one is a one-line error."""
    if precision not in MODES:
        raise ProtoADError(f"openvino: unknown precision {precision!r}: choose one of {', '.join(MODES)}")
    return MODES[precision]


def check_capability(precision: str, device: str, device_name: str, capabilities: list[str]) -> None:
    """Refuse a reduced precision the device has no units for, in one line, instead of OpenVINO's silent FP32.

    ``capabilities`` is the device's ``OPTIMIZATION_CAPABILITIES`` (CPU: "BF16" with AVX512-BF16 or AMX, "FP16"
    with AVX512-FP16 / AMX-FP16; Intel GPUs: "FP16")."""
    needed = NEEDS.get(precision.split("-")[0])
    if needed is None or needed in capabilities:
        return
    raise ProtoADError(
        f"openvino:{precision}: {device} ({device_name}) has no {needed} units (its optimization "
        f"capabilities: {', '.join(capabilities) or 'none'}); run --backend openvino (FP32)"
        + (", or BF16 on a CPU with AVX512-BF16 or AMX" if needed == "BF16" else "")
    )


def scope_names(model: Any, scope: str = FP32_SCOPE) -> set[str]:
    """Friendly names of every computing node from ``scope``'s first nodes to the outputs (their forward closure)."""
    inside: set[str] = set()
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        if scope in name or any(i.get_source_output().get_node().get_friendly_name() in inside for i in op.inputs()):
            inside.add(name)
    if not inside:
        raise ProtoADError(
            f"no node in scope {scope!r} (the L2 normalisation): re-export the ONNX with this version "
            "of protoad-edge, or run --backend openvino (FP32)"
        )
    return inside


def input_scaling(model: Any) -> set[str]:
    """Friendly names of the nodes between the input and the first convolution or matrix product: the pixels'
    scaling to the backbone's range, kept in FP32 beside the scope.

    Lowered, the 0-255 input is exact in BF16 but each step of its scaling rounds again, and the image reaches the
    stem a little off everywhere; kept in FP32 it is rounded once, at the first convolution (as torch's autocast
    does). It costs nothing (a few elementwise operations on the image) and on the demo's projected network it
    took the rank agreement with FP32 from 0.986 to 0.997 (benchmarks/RESULTS.md, bench_bf16_scope)."""
    head: set[str] = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result", *COMPUTE_OPS):
            continue
        sources = [i.get_source_output().get_node() for i in op.inputs()]
        fed = [s.get_type_name() == "Parameter" or s.get_friendly_name() in head for s in sources]
        if any(fed) and all(f or s.get_type_name() == "Constant" for f, s in zip(fed, sources)):
            head.add(op.get_friendly_name())
    return head


def kept_fp32(model: Any) -> set[str]:
    """Every node the mixed form keeps in FP32: the input's scaling and the scope (what the backend lowers around
    and reads back, and what the benchmarks start from)."""
    return scope_names(model) | input_scaling(model)


def check_not_quantized(model: Any, precision: str, path: str) -> None:
    """Refuse the mixed form on an INT8 (Q/DQ) model: lowered, its FakeQuantize nodes no longer meet OpenVINO's low
    precision transformations and every INT8 layer ran in BF16 instead (measured with OpenVINO 2026.4, also with the
    quantized layers and their dequantization left in FP32)."""
    if any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops()):
        raise ProtoADError(
            f"openvino:{precision} on {path}: an INT8 model's other layers cannot be lowered without "
            f"losing its INT8 layers in OpenVINO; run it with --backend openvino (INT8 + FP32), or the "
            f"FP32 model with openvino:{precision}"
        )


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """FP32 ``values`` rounded to the nearest BF16 (ties to even), still as FP32.

    OpenVINO's constant folding of a Convert to BF16 truncates (2026.4: 1.005 -> 1.0, where 1.0078125 is nearer),
    which pulls every weight towards zero by half a unit in the last place on average: on the demo's projected
    network that bias more than doubled the largest score error (4.2e-3 against 1.9e-3). Rounded first, the folded
    Convert has nothing left to cut."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).reshape(np.shape(values))


def lower_outside(model: Any, low: str, scope: set[str]) -> None:
    """Lower every float node of ``model`` outside ``scope`` to element type ``low`` (in place): in topological
    order, each float input of a node outside the scope is converted to ``low`` (weights, biases, the input) and
    each reduced input of a node inside it back to FP32, so the types follow; the outputs stay FP32. Constants are
    rounded to nearest (:func:`round_to_bf16`; OpenVINO folds the FP16 conversion so itself)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.passes import ConstantFolding, Manager

    f32, low_type = ov.Type.f32, getattr(ov.Type, low)
    converts: dict[tuple[int, int, str], Any] = {}  # one Convert per tensor and direction

    def convert(src: Any, to: Any) -> Any:
        key = (id(src.get_node()), src.get_index(), str(to))
        if key not in converts:
            if low == "bf16" and to == low_type and src.get_node().get_type_name() == "Constant":
                src = ops.constant(round_to_bf16(src.get_node().get_data())).output(0)  # the Convert is then exact
            node = ops.convert(src, to)
            node.set_friendly_name(f"{src.get_node().get_friendly_name()}/to_{'fp32' if to == f32 else low}")
            converts[key] = node.output(0)
        return converts[key]

    try:
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind in ("Constant", "Parameter"):
                continue
            inside = op.get_friendly_name() in scope or kind == "Result"
            for i in op.inputs():
                src = i.get_source_output()
                if inside and src.get_element_type() == low_type:
                    i.replace_source_output(convert(src, f32))
                elif not inside and src.get_element_type() == f32:
                    i.replace_source_output(convert(src, low_type))
            op.validate_and_infer_types()
        model.validate_nodes_and_infer_types()
    except RuntimeError as exc:
        raise ProtoADError(f"openvino: cannot lower the backbone to {low}: {str(exc).splitlines()[0]}") from None
    manager = Manager()
    manager.register_pass(ConstantFolding())  # the converted weights become constants of the lowered type
    manager.run_passes(model)


@dataclass(frozen=True)
class ReadBack:
    """What the compiled model runs, node by node (its runtime model's rt_info)."""

    compute: Counter  # runtime precision of the convolutions and matrix products
    scope_nodes: int  # runtime nodes that compute part of the FP32 scope
    scope_not_fp32: tuple[str, ...]  # those that run or write a reduced float type
    lowered: tuple[str, ...]  # reduced float types found in the compute layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute_layers_by_precision": dict(self.compute),
            "fp32_scope_nodes": self.scope_nodes,
            "fp32_scope_not_fp32": list(self.scope_not_fp32),
        }


def read_back(compiled: Any, scope: set[str]) -> ReadBack:
    """Each runtime node's ``runtimePrecision`` and ``outputPrecisions``; a node belongs to the scope when one of the
    original layers it was made from is in ``scope`` (a node OpenVINO rebuilt keeps the original's name there)."""
    compute: Counter = Counter()
    nodes, not_fp32 = 0, []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind, runs = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
        if kind in COMPUTE_LAYERS:
            compute[runs] += 1
        original = [n for n in rt["originalLayersNames"].astype(str).split(",") if n]
        if kind in ("Const", "Input", "Output") or not any(n in scope for n in original):
            continue
        nodes += 1
        writes = rt["outputPrecisions"].astype(str).split(",")
        if {runs, *writes} & {"bf16", "f16"}:
            not_fp32.append(op.get_friendly_name())
    lowered = tuple(p for p in ("bf16", "f16") if compute.get(p))
    return ReadBack(compute, nodes, tuple(not_fp32), lowered)
