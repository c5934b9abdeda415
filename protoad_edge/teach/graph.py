"""The bundle's ``NAME.onnx`` as teaching reads it, through onnxruntime (no torch, as on a Jetson).

One session runs the bundle's own graph up to its features (``export.prototypes.head_graph``): the patch vectors
the prototype stage compares and, where the graph projects, the raw features the L2 normalisation reads (a projected
graph's prototypes are stored in 1792 dimensions, so teaching needs them unprojected too). The prototype stage is
left out: at K 7,000 it costs four times the backbone, while the exact search of ``teach.search`` finds each patch's
nearest prototype at a third of a brute-force product. So a frame's patch scores before teaching are the line's
own up to float32 rounding (the same dot products summed in another order). A second, small session is the graph's
tail (upsampling, blur, maximum), which turns patch scores, before and after teaching, into maps and image scores.

Why a cut of ``NAME.onnx`` and not an extra file or an extra output of the graph: the backbone is already in the
bundle (an extra file would carry its 100 MB again), every bundle built so far has the scope it is cut at (no
re-export), and the graph the line runs keeps its two outputs (an extra output would cost every frame a copy of
the features, and change the interface that Triton configurations and TensorRT plans are built for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..builder.projection import FittedProjection, load_projection
from ..bundle import Bundle
from ..errors import ProtoADError
from ..export import prototypes as xp
from ..metadata import MAP_NAME, SCORE_NAME, ModelInfo
from ..preprocess import to_batch
from .search import Cells, centres

BATCH = 4  # frames per session call (bounds the memory of the feature outputs)


@dataclass
class Seen:
    """What the bundle sees in some frames: their patch vectors and scores."""

    compared: np.ndarray  # float32 [N, h*w, D]: unit patch vectors as the prototype stage compares them
    unit: np.ndarray  # float32 [N, h*w, 1792]: unit patch vectors before any projection (``compared`` without one)
    patch_scores: np.ndarray  # float32 [N, h, w]: 1 - the highest cosine to a prototype
    maps: np.ndarray  # float32 [N, S, S]
    scores: np.ndarray  # float32 [N]


class BundleGraph:
    """``NAME.onnx`` loaded once: its prototypes, its features and scores of frames, its tail."""

    def __init__(self, bundle: Bundle, info: ModelInfo, threads: int = 0) -> None:
        import onnxruntime as ort

        if not bundle.onnx.is_file():
            raise ProtoADError(
                f"teaching reads {bundle.onnx} (the features and the prototype stage come from it), and "
                f"it does not exist: copy it beside {bundle.sidecar.name}, or rebuild the bundle with "
                "protoad-export"
            )
        where = str(bundle.onnx)
        self.bundle, self.info = bundle, info
        bundle.check(bundle.onnx)  # what is taught must be the bundle's own graph (its sidecar's digest)
        self.model = xp.load(bundle.onnx)
        self.taps = xp.taps(self.model, where)
        self.prototypes = xp.read_prototypes(self.model, where)
        if len(self.prototypes) != info.num_prototypes:
            raise ProtoADError(
                f"{where} holds {len(self.prototypes):,} prototypes, its sidecar says "
                f"{info.num_prototypes:,}: restore the pair the build or the last teach wrote"
            )
        self.projection: FittedProjection | None = None
        if info.projection:
            bundle.check(bundle.file("projection"))
            self.projection = load_projection(bundle.file("projection"), info.projection)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        raw = self.projection is not None
        self.outputs = [self.taps.compared, self.taps.raw][: 1 + raw]
        head = xp.head_graph(self.model, raw)
        self.session = ort.InferenceSession(head, options, providers=["CPUExecutionProvider"])
        self.tail = ort.InferenceSession(xp.tail_graph(self.model), options, providers=["CPUExecutionProvider"])
        self.cells = Cells(self.prototypes, centres(self.prototypes, seed=info.seed))  # the old prototypes' tree

    def see(self, crops: np.ndarray) -> Seen:
        """The patch vectors, patch scores, maps and scores of uint8 [N, S, S, 3] ``crops``."""
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, len(crops), BATCH):
            out = self.session.run(self.outputs, {self.info.input_name: to_batch(crops[start : start + BATCH])})
            for part, value in zip(parts, out):
                part.append(value)
        compared, *raw = (np.concatenate(p) for p in parts)
        n, d, h, w = compared.shape
        compared = np.ascontiguousarray(compared.reshape(n, d, -1).transpose(0, 2, 1))
        flat = compared.reshape(n * h * w, d)
        best, _ = self.cells.best(flat, flat @ self.cells.centres.T)
        patch = (1.0 - best).reshape(n, h, w)
        maps, scores = self.judge(patch)
        if self.projection is None:
            unit = compared
        else:
            unit = raw[0].reshape(n, raw[0].shape[1], -1).transpose(0, 2, 1)
            unit = np.ascontiguousarray(unit / np.maximum(np.linalg.norm(unit, axis=2, keepdims=True), 1e-12))
        return Seen(compared, unit, patch, maps, scores)

    def judge(self, patch_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps [N, S, S] and image scores [N] of patch scores [N, h, w], as the graph's tail computes them."""
        maps, scores = self.tail.run(
            [MAP_NAME, SCORE_NAME], {self.taps.patch_scores: patch_scores[:, None].astype(np.float32)}
        )
        return maps[:, 0], scores

    def to_graph(self, unit: np.ndarray) -> np.ndarray:
        """Unit 1792-d prototypes [P, 1792] as the graph compares them: projected and re-normalised where it projects
        (``build.network.Projection.rows``), else as they are."""
        if self.projection is None:
            return unit.astype(np.float32)
        p = self.projection
        rows = (unit.astype(np.float32) - p.mean[None, :]) @ p.matrix.T
        return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).astype(np.float32)
