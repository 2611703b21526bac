"""Scripts that use the harness (GPU acceptance, benchmarks); run as `python -m harness.tools.NAME`. Nothing in
the library imports them."""
