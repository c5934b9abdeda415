"""Facts about the network that torch-free code needs too: the CLIs' choices and the TensorRT build.

``build.features`` builds the backbone from ``FEATURE_INFO``, and ``build.network`` names its L2
normalisation ``L2NORM_MODULE``, so these values cannot drift from the network they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BACKBONE = "wide_resnet50_2"


@dataclass(frozen=True)
class FeatureInfo:
    """One backbone stage the patch embedding uses (timm's ``feature_info`` in spirit)."""

    name: str
    channels: int
    stride: int


FEATURE_INFO = (FeatureInfo("layer1", 256, 4), FeatureInfo("layer2", 512, 8), FeatureInfo("layer3", 1024, 16))
FEATURE_CHANNELS = sum(f.channels for f in FEATURE_INFO)  # 1792
PATCH_STRIDE = FEATURE_INFO[0].stride


def stage_size(size: int, stride: int) -> int:
    """Spatial size after a stride-``stride`` ResNet stage: every stride-2 op rounds up."""
    for _ in range(int(math.log2(stride))):
        size = (size + 1) // 2
    return size


def feature_size(crop: int) -> int:
    """Side of the patch map (stride 4) for a ``crop`` x ``crop`` input: 56 at crop 224."""
    return stage_size(crop, PATCH_STRIDE)


# The network's L2 normalisation is the submodule of this name, so its ONNX nodes are named
# "/l2norm/...": the scope that FP16 graphs and engines keep in FP32 (its sum of squares overflows FP16).
L2NORM_MODULE = "l2norm"
FP32_SCOPE = f"/{L2NORM_MODULE}/"
# Prototypes per block of the graph's prototype stage (``build.network.NearestPrototype``); a teach that appends
# prototypes (``export/prototypes.py``) fills the last block to it and adds blocks of it, as an export would.
PROTOTYPE_CHUNK = 512

# Choice lists shared by the CLIs and the Python API.
UPSAMPLE_MODES = ("bilinear", "nearest")
DATASET_KINDS = ("mvtec", "btad", "folder")
DEVICES = ("auto", "cpu", "cuda")
ENGINE_PRECISIONS = ("fp16", "fp32", "int8")  # int8: from NAME.int8.onnx (protoad-export --int8)
TENSORRT_CHOICES = ("auto", "yes", "no")

# The one Q/DQ form written, because TensorRT's ONNX parser builds no other: INT8 activations and weights with zero
# points of 0 (symmetric: a non-negative activation uses 7 of the 8 bits), float biases. The sidecar records it
# and the TensorRT INT8 build refuses a model recorded otherwise.
QDQ_SCHEME = "int8 symmetric activations and weights, zero points 0, float biases"
