"""The thin runtime: drives an exported model (ONNX or TensorRT plan) without PyTorch.

Jetson images ship without torch, so nothing under this package may import it. Which backend runs
which file of a bundle is decided by ``protoad_edge.runtime.backends.registry``.
"""

from .backends.base import Backend, BackendFacts, BackendOptions

__all__ = ["Backend", "BackendFacts", "BackendOptions"]
