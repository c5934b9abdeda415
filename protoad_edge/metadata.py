"""What a runtime needs to know about a model, stored in the ONNX ``metadata_props`` and in
``NAME.json`` beside it (same content, readable by people). No torch here: the runtime reads it.

The format is versioned (``schema``). Metadata of an older schema is brought up to date on read by
``migrate``, the one place that knows the history; metadata of a newer schema, or of an unknown
format, is refused with both versions and the command that rebuilds the bundle.

The sidecar alone records the sha256 of each file of its bundle (``digests``, see ``bundle.Bundle.check``): a
file cannot hold its own digest, so the ONNX's copy of the metadata leaves them out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import write_text_atomic
from .errors import ProtoADError
from .preprocess import Preprocess

FORMAT = "protoad-edge"
SCHEMA = 4
# Schema 1 named the format and its version in one string.
FORMAT_V1 = "protoad-edge/1"
INPUT_NAME = "image"
MAP_NAME = "anomaly_map"
SCORE_NAME = "score"
# Only in the sidecar (``to_props`` leaves it out): the ONNX is one of the files it describes.
SIDECAR_ONLY = ("digests",)

# ``threshold_rule``: a short name of how the image threshold in force was chosen, the same in the sidecar and in
# every record a run writes; how exactly, and on which images, is ``threshold_detail`` (and the history's entries).
HELD_OUT = "held-out"  # the build: max(max, mean + 3 std) of held-out normal images' scores
TRAINING = "training-images"  # the build, with no image held out: the same on the training images (optimistic)
ON_TEST_SPLIT = "@test-split"  # protoad-eval --set-threshold f1 / normal-max / fpr=X: chosen on a labelled test split
ON_LINE_FRAMES = "@line-frames"  # the same, chosen on frames an operator sorted on the line (--normal/--defect)
MANUAL = "manual"  # protoad-eval --set-threshold NUMBER
OVERRIDE = "--threshold"  # protoad-run --threshold NUMBER (records only: the sidecar is not changed)
UNRECORDED = "unrecorded"  # records, where the metadata names no rule
CUSTOM = "custom"  # a rule protoad-edge does not write (edited by hand): records carry this, not the text
RULE_NAMES = re.compile(
    rf"({HELD_OUT}|{TRAINING}|{MANUAL}|{OVERRIDE}|{UNRECORDED}|{CUSTOM}"
    rf"|(f1|normal-max|fpr=[0-9.e+-]+)({ON_TEST_SPLIT}|{ON_LINE_FRAMES}))"
)
# Schema 2 kept a sentence in ``threshold_rule``: the build's began so, --set-threshold's named its rule so.
V2_BUILD_RULE = "image: max(max, mean + 3 std)"
V2_SET_RULE = re.compile(r"image: (\S+) \(--set-threshold\)")


@dataclass
class ModelInfo:
    """Everything about an exported model that is not its weights."""

    category: str
    resize: int
    crop: int
    backbone: str
    weights: str
    feature_upsample: str
    num_prototypes: int
    image_threshold: float
    pixel_threshold: float
    threshold_rule: str = ""  # one of RULE_NAMES
    threshold_detail: str = ""  # the rule in words, and the images it was applied to
    # Earlier thresholds, oldest first ({"image_threshold", "pixel_threshold", "threshold_rule", "threshold_detail",
    # "replaced"}), kept when ``protoad-eval --set-threshold`` puts new ones in force.
    threshold_history: list[dict[str, Any]] = field(default_factory=list)
    # The bundle's version (``versions.py``): 1 as built, one more with every teach or threshold change; and what
    # made each version from the one before, oldest first ({"version", "from", "what", "when", ...}).
    version: int = 1
    changes: list[dict[str, Any]] = field(default_factory=list)
    # Where the network looks: the region of interest [x, y, w, h] in source-image pixels (None: the whole
    # image), and how that region becomes the square network input (``preprocess.FITS``).
    roi: list[int] | None = None
    fit: str = "crop"
    blur_sigma: float = 4.0
    # What the build's normal images were like, for the run's health checks (``runtime.health``): "images" (how
    # many), "region" ({"min", "max"}: [w, h] of the judged region in their pixels), "brightness", "contrast",
    # "sharpness" ([min, max], ``imagestats``), "scores" ({"images", "count", "p05", "p50", "p95"} of the held-out
    # normal images). None: a bundle built before protoad-edge recorded it (those checks say "unknown").
    built_on: dict[str, Any] | None = None
    # The projection before the prototype stage (``protoad-export --project-dims``), or None (the paper's
    # network): {"dims", "centred", "fitted_on", "variance_kept"}; its arrays are NAME.projection.npz.
    projection: dict[str, Any] | None = None
    input_name: str = INPUT_NAME
    # The network input: N x 3 x crop x crop, RGB, float32 pixel values 0-255.
    input_layout: str = "NCHW"
    input_channels: str = "RGB"
    input_range: str = "0-255"
    outputs: list[str] = field(default_factory=lambda: [MAP_NAME, SCORE_NAME])
    opset: int = 17
    seed: int = 0
    toolkit_version: str = __version__
    format: str = FORMAT
    schema: int = SCHEMA
    # Filled when a TensorRT engine is built from this model (engines are not portable).
    tensorrt_version: str = ""
    gpu_name: str = ""
    tensorrt_precision: str = ""
    # Free-form facts about the build (images, levels, timings, parity): informative only.
    build: dict[str, Any] = field(default_factory=dict)
    # File kind (``bundle.FILES``) -> sha256 of that file of the bundle, as written; None: never recorded (a
    # sidecar older than schema 3, or one written without ``Bundle.seal``): its files run unchecked, with a warning.
    digests: dict[str, str] | None = None

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(resize=self.resize, crop=self.crop, roi=tuple(self.roi) if self.roi else None, fit=self.fit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_props(self) -> dict[str, str]:
        """ONNX metadata_props: one string per field (JSON-encoded), but the sidecar's own."""
        return {k: json.dumps(v) for k, v in self.to_dict().items() if k not in SIDECAR_ONLY}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metadata") -> ModelInfo:
        data = migrate(data, source)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ProtoADError(f"{source}: incomplete metadata ({exc})") from None

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "ONNX metadata") -> ModelInfo:
        try:
            data = {k: json.loads(v) for k, v in props.items()}
        except json.JSONDecodeError as exc:
            raise ProtoADError(f"{source}: metadata is not valid JSON ({exc})") from None
        return cls.from_dict(data, source)

    def save_json(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> ModelInfo:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProtoADError(f"model sidecar not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtoADError(f"cannot read model sidecar {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ProtoADError(f"model sidecar {path} is not a JSON object")
        return cls.from_dict(data, str(path))


def schema_of(data: dict[str, Any], source: str) -> int:
    """The schema version of raw metadata; an unknown format is a ProtoADError."""
    if data.get("format") == FORMAT_V1:
        return 1
    if data.get("format") != FORMAT:
        raise ProtoADError(f"{source}: not a protoad-edge model (format {data.get('format')!r}, expected {FORMAT!r})")
    schema = data.get("schema")
    if not isinstance(schema, int) or schema < 2:
        raise ProtoADError(f"{source}: bad metadata schema {schema!r}")
    return schema


def migrate(data: dict[str, Any], source: str = "metadata") -> dict[str, Any]:
    """Raw metadata of any schema this toolkit knows, as the current schema (a new dict).

    Schema 1 -> 2: ``format`` "protoad-edge/1" became "protoad-edge" plus ``schema``, and the
    TensorRT engine's precision, stored as ``precision``, became ``tensorrt_precision``.
    Schema 2 -> 3: ``threshold_rule`` (a sentence, with the test split's absolute path after --set-threshold)
    became a short name (``rule_name``) and ``threshold_detail`` the sentence, in the history's entries too; the
    sidecar records ``digests`` from then on (none here: nothing has checked the files yet).
    Schema 3 -> 4: the build records its normal images in ``built_on`` (none here: the run's health checks that
    need it say "unknown").
    """
    schema = schema_of(data, source)
    if schema > SCHEMA:
        rebuild = f"protoad-export --category {data.get('category', 'CATEGORY')}"
        raise ProtoADError(
            f"{source}: metadata schema {schema} was written by a newer protoad-edge "
            f"({data.get('toolkit_version', '?')}); this one ({__version__}) reads schemas 1 to {SCHEMA}: "
            f"upgrade protoad-edge, or rebuild the bundle with {rebuild}"
        )
    data = dict(data)
    if schema == 1:
        data["tensorrt_precision"] = data.pop("precision", "")
        data["format"], data["schema"] = FORMAT, 2
    if schema <= 2:
        data.update(_v2_rule(data), schema=3, digests=None)
        data["threshold_history"] = [{**entry, **_v2_rule(entry)} for entry in data.get("threshold_history", [])]
    if schema <= 3:
        data.update(schema=4, built_on=None)
    return data


def _v2_rule(entry: dict[str, Any]) -> dict[str, str]:
    """A schema 2 ``threshold_rule`` sentence as schema 3's short name and detail."""
    sentence = entry.get("threshold_rule") or ""
    named = V2_SET_RULE.match(sentence)
    if not sentence:
        name = ""
    elif sentence.startswith(V2_BUILD_RULE):
        name = TRAINING if "no held-out images" in sentence else HELD_OUT
    elif named is None:
        name = CUSTOM
    else:
        rule = named.group(1)
        name = rule + ON_TEST_SPLIT if RULE_NAMES.fullmatch(rule + ON_TEST_SPLIT) else MANUAL
    return {"threshold_rule": name, "threshold_detail": sentence}


def rule_name(rule: str) -> str:
    """What a record says of the sidecar's ``threshold_rule``: the name itself when protoad-edge writes it, else
    UNRECORDED or CUSTOM - never a hand-edited text (a record goes to every line's log and broker)."""
    if not rule:
        return UNRECORDED
    return rule if RULE_NAMES.fullmatch(rule) else CUSTOM
