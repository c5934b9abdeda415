"""NVIDIA helpers shared by the engine build (``export``) and the runtime: cuda-python memory and
TensorRT's import, version and logger. Torch-free, and nothing is imported until first use."""
