"""Exporters: the PyTorch network -> ONNX (-> FP16 ONNX -> TensorRT plan).

One function per format; each is timed, logged and checked by its caller (``protoad_edge.builder.pipeline``).
"""
