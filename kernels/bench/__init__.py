"""GPU scripts for the kernels and the sparse decode engine (no methods, no harness suites); run as
`python -m kernels.bench.NAME`. Nothing in the library imports them. Scripts that need the methods' mask sources
(decode latency, per-kernel step profiles) are in harness/tools/."""
