"""The CUDA emulator from Python: builds cuda/emu (CMake, host compiler only) and calls the
emulated kernels of cuda/kernels on CPU tensors through liblayerpress_cuda_emu.so (emu_capi.cpp).

Each wrapper allocates its outputs like the CUDA launcher in cuda/ops does and raises
``EmulatedLaunchError`` (with the emulator's diagnosis) when a launch fails.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
EMU_SOURCE = ROOT / "cuda" / "emu"
DEFAULT_BUILD = ROOT / "build" / "cuda-emu"

FLOAT_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NORM_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
AXIS = {"oc": 0, "ic": 1}
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


class EmulatedLaunchError(RuntimeError):
    pass


def build(build_dir: Path = DEFAULT_BUILD, kernel_dir: Optional[Path] = None, sanitize: str = "") -> Path:
    """Configures and builds the emulator (incremental); returns the build directory."""
    build_dir = Path(build_dir)
    cmd = ["cmake", "-S", str(EMU_SOURCE), "-B", str(build_dir), f"-DLP_EMU_SANITIZE={sanitize}",
           f"-DLP_EMU_KERNEL_DIR={kernel_dir or ROOT / 'cuda' / 'kernels'}"]
    if shutil.which("ninja") and not (build_dir / "Makefile").exists():
        cmd += ["-G", "Ninja"]
    for step in (cmd, ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(step, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed: {' '.join(step)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return build_dir


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class Emulator:
    """The emulated kernels of one build of liblayerpress_cuda_emu.so."""

    def __init__(self, build_dir: Path):
        self.build_dir = Path(build_dir)
        self.lib = ctypes.CDLL(str(self.build_dir / "liblayerpress_cuda_emu.so"))
        self.lib.lp_emu_last_error.restype = ctypes.c_char_p
        self.lib.lp_emu_norm_backward_workspace.restype = ctypes.c_size_t
        i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        sig = {
            "lp_emu_configure": [i32, i32, ctypes.c_ulonglong, i32],
            "lp_emu_quantize": [p, i32, i64, i64, i32, i32, i32, i32, i32, p, p, p, i32, p],
            "lp_emu_pack": [p, i64, i64, i32, p],
            "lp_emu_unpack": [p, i64, i64, i32, p],
            "lp_emu_dequantize": [p, p, p, i64, i64, i32, i32, i32, i32, i32, p, i32],
            "lp_emu_gemm": [i32, p, p, p, i64, i64, i32, i32, i32, i32, i32, i64, i32, p, i64, p, p],
            "lp_emu_norm_forward": [i64, i64, i32, i32, ctypes.c_double, p, i64, p, i64, p, p, p, p, p, p],
            "lp_emu_norm_backward_workspace": [i64, i64, i32, i32, i32, i32],
            "lp_emu_norm_backward": [i64, i64, i32, i32, p, i64, p, i64, p, p, p, p, i64, p, p, p, p],
            "lp_emu_wtacrs_row_norms": [p, i32, i64, i64, i64, p],
            "lp_emu_wtacrs_select": [p, p, p, i64, i64, p, ctypes.c_ulonglong, p, p],
            "lp_emu_wtacrs_gather_scale": [p, i32, i64, i64, p, p, i64, p],
            "lp_emu_wtacrs_wgrad": [p, i64, i64, p, i64, p, p, i64, i32, p],
        }
        for name, args in sig.items():
            getattr(self.lib, name).argtypes = args
        self.configure()

    def configure(self, threads: int = 0, schedule: str = "forward", seed: int = 1, sm_count: int = 0) -> None:
        """OS threads running blocks (0: every core) and the order in which ready CUDA threads resume."""
        self.lib.lp_emu_configure(threads, SCHEDULES[schedule], seed, sm_count)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise EmulatedLaunchError(f"{what}: cudaError {rc}: {self.lib.lp_emu_last_error().decode()}")

    # ---- format ops ---------------------------------------------------------------------------------
    def quantize(self, w, bits, group, axis, symmetric, scale_dtype, scales=None, zeros=None):
        """Like torch.ops.layerpress.quantize; returns (codes, scales, zeros, nonfinite flag)."""
        n, k = w.shape
        g = group if group != -1 else (k if axis == "oc" else n)
        shape = (n, k // g) if axis == "oc" else (k, n // g)
        given = scales is not None
        codes = torch.empty(n, k, dtype=torch.uint8)
        s = scales.clone() if given else torch.empty(shape, dtype=scale_dtype)
        z = None if symmetric else (zeros.clone() if given else torch.empty(shape, dtype=torch.uint8))
        flag = torch.zeros(1, dtype=torch.int32)
        w = w.contiguous()
        self._check(self.lib.lp_emu_quantize(_ptr(w), FLOAT_TYPE[w.dtype], n, k, bits, group, AXIS[axis],
                                             int(symmetric), FLOAT_TYPE[s.dtype], _ptr(codes), _ptr(s), _ptr(z),
                                             int(given), _ptr(flag)), "quantize")
        return codes, s, z, bool(flag.item())

    def pack(self, codes, bits):
        out = torch.empty(codes.shape[0], codes.shape[1] * bits // 32, dtype=torch.int32)
        self._check(self.lib.lp_emu_pack(_ptr(codes), codes.shape[0], codes.shape[1], bits, _ptr(out)), "pack")
        return out

    def unpack(self, q, bits):
        k = q.shape[1] * 32 // bits
        out = torch.empty(q.shape[0], k, dtype=torch.uint8)
        self._check(self.lib.lp_emu_unpack(_ptr(q), q.shape[0], k, bits, _ptr(out)), "unpack")
        return out

    def dequantize(self, q, s, z, bits, group, axis, symmetric, out_dtype):
        n, k = q.shape[0], q.shape[1] * 32 // bits
        out = torch.empty(n, k, dtype=out_dtype)
        self._check(self.lib.lp_emu_dequantize(_ptr(q), _ptr(s), _ptr(z), n, k, bits, group, AXIS[axis],
                                               int(symmetric), FLOAT_TYPE[s.dtype], _ptr(out),
                                               FLOAT_TYPE[out_dtype]), "dequantize")
        return out

    def gemm(self, x, q, s, z, bias, bits, group, axis, symmetric, transposed=False):
        """y = x · Wᵀ + bias (x [M, K], row stride allowed) or, transposed, y = x · W (x [M, N])."""
        n, k = q.shape[0], q.shape[1] * 32 // bits
        m = x.shape[0]
        assert x.stride(1) == 1
        y = torch.empty(m, k if transposed else n, dtype=x.dtype)
        self._check(self.lib.lp_emu_gemm(int(transposed), _ptr(q), _ptr(s), _ptr(z), n, k, bits, group,
                                         AXIS[axis], int(symmetric), FLOAT_TYPE[s.dtype], m, FLOAT_TYPE[x.dtype],
                                         _ptr(x), x.stride(0), _ptr(bias), _ptr(y)),
                    "gemm_t" if transposed else "gemm")
        return y

    # ---- norms --------------------------------------------------------------------------------------
    def norm_forward(self, x, weight, bias, eps, center, residual=None):
        """x [rows, cols] (row stride allowed). Returns (y, h or None, mean or None, rstd)."""
        rows, cols = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = torch.empty(rows, cols, dtype=x.dtype)
        h = torch.empty(rows, cols, dtype=x.dtype) if residual is not None else None
        mean = torch.empty(rows, dtype=acc) if center else None
        rstd = torch.empty(rows, dtype=acc)
        self._check(self.lib.lp_emu_norm_forward(
            rows, cols, NORM_TYPE[x.dtype], int(center), eps, _ptr(x), x.stride(0), _ptr(residual),
            0 if residual is None else residual.stride(0), _ptr(weight), _ptr(bias), _ptr(y), _ptr(h), _ptr(mean),
            _ptr(rstd)), "norm_forward")
        return y, h, mean, rstd

    def norm_backward(self, grad_y, x, weight, mean, rstd, grad_h, center, weight_grad, bias_grad):
        rows, cols = x.shape
        dx = torch.empty(rows, cols, dtype=x.dtype)
        dw = torch.empty(cols, dtype=x.dtype) if weight_grad else None
        db = torch.empty(cols, dtype=x.dtype) if bias_grad else None
        ws_bytes = self.lib.lp_emu_norm_backward_workspace(rows, cols, NORM_TYPE[x.dtype], int(center),
                                                           int(weight_grad), int(bias_grad))
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8)
        self._check(self.lib.lp_emu_norm_backward(
            rows, cols, NORM_TYPE[x.dtype], int(center), _ptr(grad_y), grad_y.stride(0), _ptr(x), x.stride(0),
            _ptr(weight), _ptr(mean), _ptr(rstd), _ptr(grad_h), 0 if grad_h is None else grad_h.stride(0),
            _ptr(dx), _ptr(dw), _ptr(db), _ptr(ws)), "norm_backward")
        return dx, dw, db

    # ---- WTA-CRS ------------------------------------------------------------------------------------
    def row_norms(self, x):
        out = torch.empty(x.shape[0], dtype=torch.float32)
        self._check(self.lib.lp_emu_wtacrs_row_norms(_ptr(x), FLOAT_TYPE[x.dtype], x.shape[0], x.shape[1],
                                                     x.stride(0), _ptr(out)), "wtacrs_row_norms")
        return out

    def select(self, sorted_w, cum, order, k, c, seed):
        m = sorted_w.shape[0]
        idx = torch.empty(k, dtype=torch.int64)
        scale = torch.empty(k, dtype=torch.float32)
        c_t = torch.tensor([c], dtype=torch.int64)
        self._check(self.lib.lp_emu_wtacrs_select(_ptr(sorted_w), _ptr(cum), _ptr(order), m, k, _ptr(c_t), seed,
                                                  _ptr(idx), _ptr(scale)), "wtacrs_select")
        return idx, scale

    def gather_scale(self, x, idx, scales=None):
        out = torch.empty(idx.shape[0], x.shape[1], dtype=x.dtype)
        self._check(self.lib.lp_emu_wtacrs_gather_scale(_ptr(x), FLOAT_TYPE[x.dtype], x.shape[1], x.stride(0),
                                                        _ptr(idx), _ptr(scales), idx.shape[0], _ptr(out)),
                    "wtacrs_gather_scale")
        return out

    def wgrad(self, grad, rows, idx, scales=None):
        n, d = grad.shape[1], rows.shape[1]
        dw = torch.empty(n, d, dtype=grad.dtype)
        self._check(self.lib.lp_emu_wtacrs_wgrad(_ptr(grad), grad.stride(0), n, _ptr(rows), d, _ptr(idx),
                                                 _ptr(scales), idx.shape[0], FLOAT_TYPE[grad.dtype], _ptr(dw)),
                    "wtacrs_wgrad")
        return dw
