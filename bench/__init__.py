"""layerpress benchmark suites (run from the repository root, e.g. ``python -m bench.bench_gemm``)."""
