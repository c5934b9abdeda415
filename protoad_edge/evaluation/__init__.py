"""Evaluation: metrics on labelled test splits beside the paper's tables, report pictures, backend
comparison, and speed (``protoad-bench``). Torch-free unless the torch backend is asked for."""
