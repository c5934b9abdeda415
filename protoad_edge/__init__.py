"""protoad-edge: ProtoAD anomaly detection built with PyTorch, deployed as one ONNX/TensorRT graph.

Data flows one way: images -> features -> prototypes -> network -> ONNX -> engine -> runtime.
Importing this package imports nothing heavy; torch is only needed by the build stage.
"""

__version__ = "0.1.0"
