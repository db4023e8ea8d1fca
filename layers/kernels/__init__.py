"""Kernels with one public entry each (``api.py``) and a reference implementation beside it."""
