"""The build stage: normal images -> patch features -> FINCH prototypes -> network -> checked ONNX bundle.

``pipeline.build(BuildConfig(...))`` is the Python API behind ``protoad-export``. Importing this
package imports nothing heavy: ``config`` and ``datasets`` are torch-free, the rest needs torch.
"""
