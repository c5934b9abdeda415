"""The thin runtime: drives an exported model (ONNX or TensorRT plan) without PyTorch.

Jetson images ship without torch, so nothing under this package may import it.
"""

from .backend import Backend, open_backend

__all__ = ["Backend", "open_backend"]
