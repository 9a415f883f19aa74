"""Shared pytest configuration for the layerpress tests."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import layerpress

# Hypothesis: no per-example deadline (first calls of an op pay one-off costs) and a modest number
# of examples so the suite stays fast; LAYERPRESS_HYPOTHESIS_PROFILE=thorough for a longer run.
settings.register_profile("layerpress", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LAYERPRESS_HYPOTHESIS_PROFILE", "layerpress"))

CPU_GEMM_VARIANTS = list(layerpress.build_info()["cpu_gemm_variants"])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=CPU_GEMM_VARIANTS)
def cpu_variant(request):
    """Forces each CPU GEMM variant this machine supports; restores the automatic choice."""
    layerpress.set_cpu_gemm_variant(request.param)
    try:
        yield request.param
    finally:
        layerpress.set_cpu_gemm_variant("")


@pytest.fixture(autouse=True)
def _automatic_cpu_variant():
    """Every test starts from (and leaves) the automatic CPU GEMM variant choice."""
    layerpress.set_cpu_gemm_variant("")
    yield
    layerpress.set_cpu_gemm_variant("")


@pytest.fixture
def exact_cpu_gemm_variant():
    """For tests of what a model or module computes (imports, conversions, autograd), not of
    kernel rounding: runs on the best CPU GEMM variant that multiplies unrounded operands, so
    their comparisons with float references keep fp32-accumulation tolerances."""
    from lp_testutils import exact_cpu_gemm
    with exact_cpu_gemm() as name:
        yield name


@pytest.fixture(scope="module")
def torch_single_thread():
    """Runs a module's tests with one intra-op thread. On a small, shared (oversubscribed) machine
    every OpenMP parallel region -- even a tiny float64 reference matmul -- can stall for a
    scheduler time slice, which made the big grids 10-100x slower. Modules that use this test the
    multi-threaded paths explicitly (bitwise thread-count independence tests)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
