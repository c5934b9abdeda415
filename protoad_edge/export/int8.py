"""INT8 Q/DQ export (``NAME.int8.onnx``): the backbone's convolutions in INT8, those that cost accuracy in FP32.

Anomaly scores are small differences of cosines near 1: naive INT8 (MinMax ranges, every conv) cost up to
17 AUROC points on bottle (issue 17). So:

* weights per output channel, symmetric INT8; activations symmetric INT8 (:data:`QDQ_SCHEME`: what TensorRT
  builds) with ranges from a histogram percentile (:data:`PERCENTILE`), which clips the long tails that one
  outlier would otherwise stretch the range to (entropy, MinMax and other percentiles were measured no better:
  benchmarks/RESULTS.md);
* Q/DQ on the INT8 convs' inputs only: a conv's output, the residual adds and the feature taps stay FP32, so each
  INT8 conv rounds once, where its kernel needs it;
* ranges calibrated once, on held-out normal images (never the test split), at least
  :data:`MIN_CALIBRATION_IMAGES` of them;
* a per-layer sensitivity search, label-free, on some of those images: each conv is scored by how far the
  patch scores move with it alone in INT8, and the convs with the least noise per multiply-add are quantized
  while the whole stays within :data:`SEARCH_TOLERANCE` of the FP32 score spread; the rest stay FP32;
* the L2 normalisation (``FP32_SCOPE``), the prototype MatMuls and everything after them stay FP32.

Whether the result is written is the accuracy gate's decision on labelled images (``evaluation.accuracy_gate``),
taken by the caller through :func:`search_within_gate`: a draft that fails it is searched again with less noise
allowed, so a part more fragile than the one the tolerance was chosen on gets fewer INT8 convs, not a refusal.
Needs ``onnx`` (the build extra) and onnxruntime's quantization tools; no torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from ..atomic import atomic_path
from ..bundle import SEALED, Bundle
from ..constants import FP32_SCOPE, QDQ_SCHEME
from ..errors import ProtoADError
from ..preprocess import to_batch
from .fp16 import _load, scope_boundary

if TYPE_CHECKING:
    import onnx

PERCENTILE = 99.999  # activation range: this percentile of |x| over the calibration images, both tails
MIN_CALIBRATION_IMAGES = 16
MAX_CALIBRATION_IMAGES = 64
SEARCH_IMAGES = 4  # calibration images the search scores every trial on
# The search keeps the RMS change of the patch scores within this share of their FP32 spread (standard deviation
# over the search images' patches); the accuracy gate then judges the result on labelled images. Chosen on the
# generated demo category (benchmarks/bench_int8_tolerance.py), never on a real test split: the largest error at
# which the demo's image and pixel AUROC moved by less than the gate's 0.5 pt either way (a rise is as much noise
# as a drop). 0.2, the largest that merely passed the demo's gate, failed on bottle (benchmarks/RESULTS.md); the
# earlier 0.05 kept 42 of 43 convs FP32 on bottle: INT8 in name only.
SEARCH_TOLERANCE = 0.15
# While the accuracy gate fails, the search runs again up to GATE_RETRIES times, each within BACKOFF x the score error
# of the draft that failed (a quarter of its noise variance): strictly fewer convs each time. The most accurate draft
# tried is what a refusal reports and --accept-accuracy-loss writes.
GATE_RETRIES = 2
BACKOFF = 0.5
MAX_REFINEMENTS = 4  # bisection trials for how many layers, in the search's order, fit
Log = Callable[[str], None]


@dataclass
class Int8Draft:
    """A searched INT8 model waiting for the accuracy gate; ``path`` is in a temporary folder."""

    path: Path
    quantized: list[str]  # node names in INT8
    kept_fp32: list[str]  # candidates the search kept in FP32
    search_error: float  # patch score change on the search images, as a share of the FP32 spread
    record: dict[str, Any]  # what the sidecar records under build["int8"]


def _upstream(graph: onnx.GraphProto, tensors: list[str]) -> set[str]:
    """Names of the nodes that compute ``tensors``, directly or not."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    todo = list(tensors)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            todo.extend(node.input)
    return seen


def backbone_convs(model: onnx.ModelProto) -> list[str]:
    """The Convs that compute what the L2 normalisation reads: the only INT8 candidates. Found from the graph, so
    the blur, the prototype stage or a renamed module cannot slip into INT8."""
    entries, exits = scope_boundary(model.graph, FP32_SCOPE)
    if not entries or not exits:
        raise ProtoADError(f"{model.graph.name}: no L2 normalisation scope {FP32_SCOPE!r}: re-export the ONNX")
    upstream = _upstream(model.graph, entries)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name in upstream]


def conv_macs(model: onnx.ModelProto, convs: list[str]) -> dict[str, int]:
    """Multiply-adds per image of each of ``convs``: the work INT8 would speed up, from the weights' and outputs'
    shapes."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    weights = {t.name: t.dims for t in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.name in convs:
            out = dims.get(node.output[0], [])
            if len(out) != 4 or not all(out[2:]) or node.input[1] not in weights:
                raise ProtoADError(f"{model.graph.name}: no static shape for {node.name}: re-export the ONNX")
            macs[node.name] = int(np.prod(weights[node.input[1]])) * out[2] * out[3]
    return macs


def prototype_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMuls after the L2 normalisation, outside its scope: the cosines to the prototypes. They stay FP32:
    an 8-bit cosine has a step of about 1/128, beyond the spread of the scores it would carry."""
    _, exits = scope_boundary(model.graph, FP32_SCOPE)
    before = _upstream(model.graph, exits)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in before]


class _Reader:
    """onnxruntime's calibration data reader over uint8 crops, one image per call, rangeable for strided collection."""

    def __init__(self, input_name: str, crops: np.ndarray) -> None:
        self.input_name, self.crops = input_name, crops
        self.start, self.end, self.next = 0, len(crops), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = self.start + self.next
        if index >= self.end:
            return None
        self.next += 1
        return {self.input_name: to_batch(self.crops[index : index + 1])}

    def __len__(self) -> int:
        return len(self.crops)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.next = start_index, end_index, 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs a pre-processing hint and prints histogram progress: not for our users."""
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _stride(n: int) -> int:
    """Images per calibration pass (bounds memory: every calibrated tensor of a pass is held at once)."""
    return next(s for s in (4, 3, 2, 1) if n % s == 0)


def _quantize(src: Path, dst: Path, nodes: list[str], reader: _Reader) -> None:
    """Calibrate and quantize ``nodes``: Q/DQ on their inputs only, in :data:`QDQ_SCHEME`. A Q/DQ pair on a conv's
    output rounds it a second time (without it, all 43 convs move the demo's scores half as far:
    benchmarks/RESULTS.md), and OpenVINO runs a conv with rounded inputs and a float output in INT8 all the same
    (measured there). onnxruntime's CPU provider runs it in FP32: there the model is the accuracy reference, not a
    speed-up."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {
        "ActivationSymmetric": True,
        "CalibTensorRangeSymmetric": True,
        "QuantizeBias": False,
        "CalibPercentile": PERCENTILE,
        "CalibStridedMinMax": _stride(len(reader)),
        "OpTypesToExcludeOutputQuantization": ["Conv"],
    }
    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options=options,
        )


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT's ONNX parser would refuse this Q/DQ model (none: empty). It builds INT8 Q/DQ whose zero points
    are 0 and nothing else: no UINT8 tensor inside the network, no INT32 (quantized bias) dequantization
    (onnx-tensorrt's operator table, TensorRT 10)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        points = None if zero is None else numpy_helper.to_array(zero)
        if zero is not None and (zero.data_type != TensorProto.INT8 or points.any()):
            problems.append(
                f"{node.name}: zero point {TensorProto.DataType.Name(zero.data_type)} "
                f"{points.ravel()[:3].tolist()} (needs INT8 zeros)"
            )
        data = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type != TensorProto.INT8:
            problems.append(
                f"{node.name}: dequantizes {TensorProto.DataType.Name(data.data_type)} {data.name} (needs INT8)"
            )
    return problems


def only(qdq: onnx.ModelProto, float_model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """A copy of the Q/DQ model ``qdq`` with only the nodes named in ``keep`` in INT8: they read their rounded
    inputs, every other reader of a tensor (the residual Add, the feature taps, an FP32 conv) the FP32 tensor, and a
    weight that no kept node reads is FP32 again (biases are never quantized: :data:`QDQ_SCHEME`). The
    quantizer hands the rounded tensor to every reader, which adds its noise to the residual path and the features
    (all 43 convs on the demo: 1.26 of the score spread that way, 1.20 this way). Each trial of the search, and the
    written model, costs no re-quantization."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    weights = {t.name: t for t in float_model.graph.initializer}
    have = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in outputs]:
        users = readers.get(dq.output[0], [])
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":  # an activation: only the kept nodes read it rounded
            replacement = q.input[0]
            users = [u for u in users if u.name not in keep]
        else:  # a weight
            replacement = dq.input[0].removesuffix("_quantized")
            if replacement not in weights or any(u.name in keep for u in users):
                continue
            if replacement not in have:
                graph.initializer.append(weights[replacement])
                have.add(replacement)
            if (
                replacement == dq.output[0]
            ):  # the DQ computed the weight under its own name: the initializer replaces it
                graph.node.remove(dq)
                continue
        for user in users:
            for i, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[i] = replacement
    _prune(graph)
    return out


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, and initializers no node reads."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:
        graph.initializer.remove(t)


class _Scorer:
    """How far a model variant moves the patch scores on the search images, read at the L2 normalisation's output.

    The prototype stage (FP32 in every variant) is the costly half of the graph, so a trial runs only the graph up
    to the normalised features f and takes each patch's score change to first order: -<f' - f, p*>, with p* the
    patch's nearest prototype in FP32. The error is the RMS change over the FP32 patch scores' spread.
    """

    def __init__(self, model: onnx.ModelProto, features: str, crops: np.ndarray, threads: int) -> None:
        self.features, self.batch, self.threads = features, to_batch(crops), threads
        self.input_name = model.graph.input[0].name
        reference = self.run(model)
        prototypes = np.concatenate(
            [
                _constant(model, node)
                for node in model.graph.node
                if node.op_type == "MatMul" and node.name in prototype_matmuls(model)
            ]
        )
        similarity = reference @ prototypes.T
        self.nearest = prototypes[similarity.argmax(axis=1)]
        self.spread = float(np.std(1.0 - similarity.max(axis=1), dtype=np.float64))
        self.reference = reference

    def run(self, model: onnx.ModelProto) -> np.ndarray:
        """Normalised patch features [N*H*W, D] of the search images through the graph up to ``features``."""
        import onnxruntime as ort

        truncated = _until(model, self.features)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        session = ort.InferenceSession(truncated.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = np.concatenate(
            [session.run(None, {self.input_name: self.batch[i : i + 1]})[0] for i in range(len(self.batch))]
        )
        return out.transpose(0, 2, 3, 1).reshape(-1, out.shape[1])

    def error(self, model: onnx.ModelProto) -> float:
        change = ((self.run(model) - self.reference) * self.nearest).sum(axis=1, dtype=np.float64)
        rms = float(np.sqrt(np.mean(change**2)))
        return rms / self.spread if self.spread > 0 else rms


def _until(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy of ``model`` whose one output is ``tensor``, with what it no longer needs dropped."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    _prune(out.graph)
    return out


def _constant(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The initializer a prototype MatMul multiplies by: the prototypes of its block, [K_block, D]."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return next(numpy_helper.to_array(inits[name]) for name in node.input if name in inits).astype(np.float32)


class Int8Search:
    """Calibrated once, then drafts at any search tolerance: the trials' errors are kept, so a tighter draft after a
    failed accuracy gate costs only the few bisection trials the tighter tolerance adds."""

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        calibration: np.ndarray,
        workdir: str | os.PathLike,
        *,
        threads: int = 0,
        log: Log = print,
    ) -> None:
        """Calibrate on ``calibration`` (uint8 [N,S,S,3] normal crops, held out from the test split) into
        ``workdir``."""
        import onnx

        self.src, self.work, self.log = Path(onnx_path), Path(workdir), log
        if len(calibration) < MIN_CALIBRATION_IMAGES:
            raise ProtoADError(
                f"INT8 calibration needs at least {MIN_CALIBRATION_IMAGES} normal images, got {len(calibration)}"
            )
        calibration = calibration[:MAX_CALIBRATION_IMAGES]
        self.float_model = _load(self.src, "the INT8 export (protoad-export --int8)")
        self.convs = backbone_convs(self.float_model)
        full = self.work / "all.int8.onnx"
        self.start = time.perf_counter()
        _quantize(self.src, full, self.convs, _Reader(self.float_model.graph.input[0].name, calibration))
        log(
            f"int8: calibrated {len(self.convs)} backbone convs on {len(calibration)} held-out normal images "
            f"(percentile {PERCENTILE}) in {time.perf_counter() - self.start:.0f} s"
        )
        self.qdq = onnx.load(str(full))
        problems = tensorrt_problems(self.qdq)
        if problems:  # onnxruntime's quantizer wrote another form than asked: nothing TensorRT could build
            raise ProtoADError(
                f"the INT8 quantizer wrote Q/DQ that TensorRT cannot build ({len(problems)} nodes, "
                f"first: {problems[0]}): check the onnxruntime version"
            )
        _, exits = scope_boundary(self.float_model.graph, FP32_SCOPE)
        self.scorer = _Scorer(self.float_model, exits[0], calibration[:SEARCH_IMAGES], threads or os.cpu_count() or 1)
        self.calibration_images = len(calibration)
        self.macs = conv_macs(self.float_model, self.convs)
        self.trials: dict[frozenset[str], float] = {}

    def error(self, nodes: list[str]) -> float:
        """The search images' patch score error with ``nodes`` in INT8 (each set measured once)."""
        key = frozenset(nodes)
        if key not in self.trials:
            self.trials[key] = self.scorer.error(only(self.qdq, self.float_model, set(nodes)))
        return self.trials[key]

    def draft(self, tolerance: float = SEARCH_TOLERANCE) -> Int8Draft | None:
        """The INT8 model of the convs that fit ``tolerance`` (``_search``), written into the workdir; None when
        not one conv fits."""
        import onnx

        chosen, sensitivity = _search(self.convs, self.macs, self.error, self.log, tolerance)
        if not chosen:
            self.log(f"int8: no backbone conv fits a patch score error of {tolerance:.4g} of the FP32 spread")
            return None
        final = self.error(chosen)
        share = sum(self.macs[c] for c in chosen) / sum(self.macs.values())
        self.log(
            f"int8: {len(chosen)} of {len(self.convs)} backbone convs in INT8, {100 * share:.0f} % of their "
            f"multiply-adds (patch score error {final:.3f} of the FP32 spread, tolerance {tolerance:.4g}); "
            f"{len(self.trials)} trials in {time.perf_counter() - self.start:.0f} s"
        )
        path = self.work / f"draft-{len(chosen)}.int8.onnx"
        model = only(self.qdq, self.float_model, set(chosen))
        del model.metadata_props[:]
        model.metadata_props.extend(
            self.float_model.metadata_props
        )  # the bundle's metadata, nothing the quantizer adds
        onnx.save(model, str(path))
        kept = [n for n in self.convs if n not in chosen]
        record = {
            "quantized": len(chosen),
            "int8_share_of_backbone_macs": round(share, 4),
            "kept_fp32": kept,
            "fp32": f"conv outputs, residual adds, L2 normalisation ({FP32_SCOPE}), prototype MatMuls, upsampling, "
            "blur",
            "scheme": QDQ_SCHEME,
            "weights": "per output channel",
            "activations": f"per tensor, histogram percentile {PERCENTILE}, read rounded by the INT8 convs only",
            "calibration_images": self.calibration_images,
            "search": {
                "images": len(self.scorer.batch),
                "tolerance": tolerance,
                "score_error": round(final, 5),
                "trials": len(self.trials),
                "sensitivity": {n: round(e, 5) for n, e in sensitivity.items()},
            },
        }
        return Int8Draft(path, chosen, kept, final, record)


Verdict = TypeVar("Verdict")


def search_within_gate(
    draft: Callable[[float], Int8Draft | None],
    gate: Callable[[Int8Draft], Verdict],
    passed: Callable[[Verdict], bool],
    log: Log = print,
) -> tuple[Int8Draft, Verdict, list[tuple[Int8Draft, Verdict]]] | None:
    """The first draft that passes the accuracy ``gate``: at ``SEARCH_TOLERANCE``, then up to :data:`GATE_RETRIES`
    times within :data:`BACKOFF` x the score error of the draft that failed; else the last (most accurate) draft
    tried. None when not one conv fits even the first tolerance. Also every (draft, verdict) tried, in order.

    The tolerance was chosen on generated data; a part whose scores are more fragile than the demo's fails the gate
    at it (bottle did at 0.2), and then fewer convs in INT8 are the answer, not FP32 alone."""
    tried: list[tuple[Int8Draft, Verdict]] = []
    tolerance = SEARCH_TOLERANCE
    for attempt in range(1 + GATE_RETRIES):
        candidate = draft(tolerance)
        if candidate is None:
            break
        verdict = gate(candidate)
        tried.append((candidate, verdict))
        if passed(verdict):
            break
        tolerance = BACKOFF * candidate.search_error
        if attempt < GATE_RETRIES:
            log(
                f"int8: {len(candidate.quantized)} convs in INT8 fail the accuracy gate; searching again within "
                f"{tolerance:.4g} of the FP32 spread"
            )
    if not tried:
        return None
    return (*tried[-1], tried)


def search_order(sensitivity: dict[str, float], macs: dict[str, int]) -> list[str]:
    """The order the search adds convs in: least noise variance per multiply-add first."""
    return sorted(sensitivity, key=lambda c: sensitivity[c] ** 2 / macs[c])


def _search(
    convs: list[str],
    macs: dict[str, int],
    error: Callable[[list[str]], float],
    log: Log,
    tolerance: float = SEARCH_TOLERANCE,
) -> tuple[list[str], dict[str, float]]:
    """The convs to quantize: all when that is within tolerance, else those that buy the most multiply-adds in INT8
    for the least noise.

    A layer's sensitivity is the error with it alone in INT8. Were the layers' noises independent they would add
    in variance, so layers are taken in order of variance per multiply-add (a 3x3 conv has 4.5 times the work of
    a 1x1 beside it: at the same noise it is worth more) and the longest prefix whose root sum of squares fits the
    tolerance is the most that can fit; noise that compounds through the network fits fewer, so the prefix length
    is bisected (:data:`MAX_REFINEMENTS` trials) down to the longest one measured to fit.
    """
    if error(convs) <= tolerance:
        return convs, {}
    sensitivity = {c: error([c]) for c in convs}
    order = search_order(sensitivity, macs)
    bound = int(np.searchsorted(np.sqrt(np.cumsum([sensitivity[c] ** 2 for c in order])), tolerance, "right"))
    log(
        f"int8: all convs in INT8 move the patch scores by {error(convs):.3f} of their spread; per-layer sensitivity "
        f"{min(sensitivity.values()):.4f}..{max(sensitivity.values()):.4f}; at most {bound} can fit"
    )
    fits, fails = 0, bound + 1
    if bound:
        if error(order[:bound]) <= tolerance:
            fits = bound
        else:
            fails = bound
    for _ in range(MAX_REFINEMENTS):
        if fails - fits <= 1:
            break
        middle = (fits + fails) // 2
        if error(order[:middle]) <= tolerance:
            fits = middle
        else:
            fails = middle
    chosen = set(order[:fits])
    return [c for c in convs if c in chosen], sensitivity


def write_int8(draft: Int8Draft, onnx_path: str | os.PathLike, gate: dict[str, Any]) -> Path:
    """Rename the draft into place as ``NAME.int8.onnx`` and record what was quantized and the measured loss
    (``gate``) in the sidecar's ``build["int8"]``, and its digest (written from the ONNX metadata if missing)."""
    bundle = Bundle.of(onnx_path)
    info = bundle.info()
    info.build = {**info.build, "int8": {**draft.record, "gate": gate}}
    target = bundle.file("int8_onnx")
    created = not bundle.sidecar.is_file()
    with atomic_path(target) as tmp:
        os.replace(draft.path, tmp)
    bundle.seal(info, SEALED if created else ("int8_onnx",)).save_json(bundle.sidecar)
    return target


def temporary_workdir(onnx_path: str | os.PathLike) -> tempfile.TemporaryDirectory:
    """A scratch folder beside the model (same file system: the draft is renamed, not copied, into place)."""
    path = Path(onnx_path)
    return tempfile.TemporaryDirectory(prefix=f".{path.stem}.int8.", dir=path.parent)
