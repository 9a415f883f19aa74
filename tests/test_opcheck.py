"""torch.library.opcheck for every torch.ops.layerpress op: schema (no hidden mutation or
aliasing), fake (meta) implementations vs the real kernels, autograd registration, and AOT
dispatch with dynamic shapes (which also runs the registered gemm backward)."""
from __future__ import annotations

import pytest
import torch

from layerpress import Layout, QuantSpec, ops

from lp_testutils import make_weight, spec_id

pytestmark = pytest.mark.usefixtures("torch_single_thread")

L = torch.ops.layerpress
CPU = int(Layout.CPU_BITPLANE16)
CANON = int(Layout.CANONICAL)

SPECS = [
    (QuantSpec(4, 32, "oc", False, torch.float16), 20, 64),   # asymmetric, odd row tile count
    (QuantSpec(3, -1, "ic", True, torch.bfloat16), 33, 96),   # symmetric (zeros None), odd N
    (QuantSpec(8, 32, "ic", False, torch.float32), 64, 32),   # smallest K
    (QuantSpec(2, -1, "oc", True, torch.float32), 1, 32),     # a single output row
]


def _args(spec, n, k, seed=0):
    w = make_weight(n, k, torch.float32, seed)
    codes, s, z = ops.quantize(w, spec)
    q = ops.pack(codes, spec.bits)
    nq, ns, nz = ops.repack(q, s, z, spec)
    return w, codes, s, z, q, (nq, ns, nz)


def _cases():
    cases = []
    for spec, n, k in SPECS:
        sid = f"{spec_id(spec)}-{n}x{k}"
        w, codes, s, z, q, (nq, ns, nz) = _args(spec, n, k)
        b, g, a, sym = spec.bits, spec.group_size, spec.axis_id, spec.symmetric
        zz = None if sym else z
        cases += [
            (f"quantize-{sid}", L.quantize, (w, b, g, a, sym, spec.scale_dtype), {}),
            (f"quantize-bf16-{sid}", L.quantize, (w.bfloat16(), b, g, a, sym, spec.scale_dtype), {}),
            (f"quantize-given-{sid}", L.quantize, (w, b, g, a, sym, spec.scale_dtype),
             {"scales": s, "zeros": zz}),
            (f"pack-{sid}", L.pack, (codes, b), {}),
            (f"unpack-{sid}", L.unpack, (q, b), {}),
            (f"dequantize-{sid}", L.dequantize, (q, s, zz, b, g, a), {}),
            (f"dequantize-out-{sid}", L.dequantize, (q, s, zz, b, g, a), {"out_dtype": torch.bfloat16}),
            (f"repack-{sid}", L.repack, (q, s, zz, b, g, a, CPU), {}),
            (f"unrepack-{sid}", L.unrepack, (nq, ns, nz if not sym else None, b, g, a, CPU, n), {}),
        ]
        nzz = None if sym else nz
        x = torch.randn(3, k)
        bias = torch.randn(n)
        cases += [
            (f"gemm-bias-grad-{sid}", L.gemm,
             (x.clone().requires_grad_(), nq, ns, nzz, bias.clone().requires_grad_(), b, g, a, CPU, n), {}),
            (f"gemm-nobias-3d-grad-{sid}", L.gemm,
             (torch.randn(2, 3, k, requires_grad=True), nq, ns, nzz, None, b, g, a, CPU, n), {}),
            (f"gemm-bf16-{sid}", L.gemm, (x.bfloat16(), nq, ns, nzz, bias.bfloat16(), b, g, a, CPU, n), {}),
            (f"gemm-f16-1d-{sid}", L.gemm, (torch.randn(k).half(), nq, ns, nzz, None, b, g, a, CPU, n), {}),
            (f"gemm_t-{sid}", L.gemm_t, (torch.randn(3, n), nq, ns, nzz, b, g, a, CPU, n), {}),
            (f"gemm_t-bf16-3d-{sid}", L.gemm_t, (torch.randn(2, 2, n).bfloat16(), nq, ns, nzz, b, g, a, CPU, n), {}),
        ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,op,args,kwargs", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args, kwargs):
    result = torch.library.opcheck(op, args, kwargs)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_every_op_is_covered():
    ops_checked = {c[1]._qualified_op_name.split("::")[1] for c in CASES}
    assert ops_checked >= {"quantize", "pack", "unpack", "dequantize", "repack", "unrepack", "gemm", "gemm_t"}


@pytest.mark.parametrize("spec,n,k", SPECS, ids=[spec_id(s) for s, _, _ in SPECS])
def test_fake_shapes_match_real(spec, n, k):
    """Fake (meta) outputs have the real outputs' shapes, dtypes and strides, also for the
    symmetric empty zeros tensor (outside opcheck, through FakeTensorMode directly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, codes, s, z, q, (nq, ns, nz) = _args(spec, n, k)
    b, g, a, sym = spec.bits, spec.group_size, spec.axis_id, spec.symmetric
    zz, nzz = (None, None) if sym else (z, nz)
    calls = [
        (L.quantize, (w, b, g, a, sym, spec.scale_dtype)),
        (L.pack, (codes, b)), (L.unpack, (q, b)), (L.dequantize, (q, s, zz, b, g, a)),
        (L.repack, (q, s, zz, b, g, a, CPU)), (L.unrepack, (nq, ns, nzz, b, g, a, CPU, n)),
        (L.gemm, (torch.randn(2, 5, k), nq, ns, nzz, None, b, g, a, CPU, n)),
        (L.gemm_t, (torch.randn(5, n), nq, ns, nzz, b, g, a, CPU, n)),
    ]
    mode = FakeTensorMode()
    for op, args in calls:
        real = op(*args)
        with mode:
            fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
            fake = op(*fargs)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), op


def test_repack_canonical_layout_is_a_copy():
    """Layout 0 is the canonical layout itself: repack/unrepack to it return equal copies."""
    spec, n, k = SPECS[0]
    w, codes, s, z, q, _ = _args(spec, n, k)
    rq, rs, rz = ops.repack(q, s, z, spec, Layout.CANONICAL)
    assert torch.equal(rq, q) and torch.equal(rs, s) and torch.equal(rz, z)
    assert rq.data_ptr() != q.data_ptr()
    uq, us, uz = ops.unrepack(q, s, z, spec, n, Layout.CANONICAL)
    assert torch.equal(uq, q) and torch.equal(us, s) and torch.equal(uz, z)


@pytest.mark.parametrize("which", ["repack", "unrepack"])
def test_opcheck_canonical_layout(which):
    spec, n, k = SPECS[0]
    w, codes, s, z, q, _ = _args(spec, n, k)
    b, g, a = spec.bits, spec.group_size, spec.axis_id
    if which == "repack":
        result = torch.library.opcheck(L.repack, (q, s, z, b, g, a, CANON))
    else:
        result = torch.library.opcheck(L.unrepack, (q, s, z, b, g, a, CANON, n))
    assert all(v == "SUCCESS" for v in result.values()), result
