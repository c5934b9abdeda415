"""Thin click wrappers over the Python API; the shared error handling lives in ``common``."""
