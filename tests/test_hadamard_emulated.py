"""The CUDA hadamard kernel (cuda/kernels/hadamard_cuda.cu) in the CUDA emulator, against the
CPU op's portable variant. Both run the same stages in the same order with the same roundings
(scale and signs first, butterflies h = 1, 2, 4, ..., one rounding to the element type at the
end), so the results must be bit-identical. Emulated, not verified: a GPU run of
scripts/gpu_check.sh verifies it (docs/cuda_emulator.md). The GEMM's rotation on CUDA is a separate
launch of this kernel in the launcher (cuda/ops/hadamard_cuda_launch.h), which the emulator does
not cover."""
from __future__ import annotations

import ctypes

import pytest
import torch

from layerpress.ops.rotation import hadamard, random_signs

from cuda_emu import DEFAULT_BUILD, NORM_TYPE, EmulatedLaunchError, Emulator, build
from cuda_testutils import assert_same_bits

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.fixture(scope="module")
def emu():
    e = Emulator(build(DEFAULT_BUILD))
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    e.lib.lp_emu_hadamard.argtypes = [i64, i64, i64, i32, i32, p, i64, p, p, i64]
    return e


def emulated_hadamard(emu, x: torch.Tensor, block: int, signs, transpose: bool) -> torch.Tensor:
    """x: a CPU tensor [rows, cols] with unit column stride (any row stride)."""
    assert x.dim() == 2 and x.stride(1) == 1
    y = torch.empty(x.shape, dtype=x.dtype)
    sp = None if signs is None else ctypes.c_void_p(signs.data_ptr())
    err = emu.lib.lp_emu_hadamard(x.shape[0], x.shape[1], block, NORM_TYPE[x.dtype], int(transpose),
                                  ctypes.c_void_p(x.data_ptr()), x.stride(0), sp, ctypes.c_void_p(y.data_ptr()),
                                  y.stride(0))
    if err:
        raise EmulatedLaunchError(emu.lib.lp_emu_last_error().decode())
    return y


# (rows, cols, block): one warp per 32 lanes with a ragged last warp, 16-lane groups, E = 2..8
# elements per thread, cross-warp stages through shared memory (512, 2048), E = 16 (16384).
CASES = [(3, 16, 16), (5, 48, 16), (7, 64, 32), (3, 128, 64), (2, 384, 128), (3, 512, 256),
         (2, 1024, 512), (1, 4096, 2048), (1, 16384, 16384)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,block", CASES, ids=[f"{r}x{c}-b{b}" for r, c, b in CASES])
def test_matches_cpu(emu, monkeypatch, dtype, rows, cols, block):
    monkeypatch.setenv("LAYERPRESS_CPU_HADAMARD_KERNEL", "generic")
    g = torch.Generator().manual_seed(cols + block)
    x = torch.randn(rows, cols + 16, generator=g, dtype=torch.float64).to(dtype)[:, 16:]  # row stride > cols
    s = random_signs(cols, block)
    for transpose in (False, True):
        assert_same_bits(emulated_hadamard(emu, x, block, s, transpose), hadamard(x, block, s, transpose),
                         f"{dtype} T={transpose}")
    assert_same_bits(emulated_hadamard(emu, x, block, None, False), hadamard(x, block), f"{dtype} no signs")


@pytest.mark.parametrize("schedule", ("reverse", "random"))
def test_thread_orders(emu, monkeypatch, schedule):
    """The shared-memory stages under other thread orders (a missing barrier shows here)."""
    monkeypatch.setenv("LAYERPRESS_CPU_HADAMARD_KERNEL", "generic")
    emu.configure(schedule=schedule, seed=99)
    try:
        x = torch.randn(2, 2048)
        s = random_signs(2048, 4)
        for block in (1024, 64):
            assert_same_bits(emulated_hadamard(emu, x, block, s, False), hadamard(x, block, s), f"{schedule} b{block}")
    finally:
        emu.configure()


def test_too_large_block_is_refused(emu):
    x = torch.randn(1, 65536)
    with pytest.raises(EmulatedLaunchError):
        emulated_hadamard(emu, x, 65536, None, False)
