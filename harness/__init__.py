"""Benchmarking harness for contextual sparsity in OPT models (see README.md and DESIGN.md)."""

__version__ = "0.1.0"
