"""Backends: one interface (``base.Backend``) and a class per runtime; the registry maps ``--backend NAME`` to them."""
