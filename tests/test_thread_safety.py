"""The ops and QuantLinear called from 8 Python threads at once give the serial results bit for
bit (every CPU GEMM variant forced, both norm kernel variants, the WTA-CRS ops, the CPU output
cache of large outputs, the run-time choice between the GEMM's small-M and tiled paths), and
two threads moving one QuantLinear between dtypes/devices (repacking it) do not corrupt it.

Sized for CI: small shapes, 8 threads x 1,000 calls for the fast ops, fewer calls for the
large outputs that go through the output cache (8 MB and more each)."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

import layerpress
from layerpress import QuantSpec
from layerpress import ops as lp_ops
from layerpress.nn import QuantLinear

THREADS = 8
CALLS = 1000
_ops = torch.ops.layerpress


def run_threads(cases, reference, calls=CALLS, threads=THREADS):
    """Each thread calls ``cases[j % len(cases)]()`` for ``j`` in its share of ``calls`` (offset
    per thread, so different cases run at the same time) and compares with ``reference[j]``
    bit for bit. Returns the failures (at most a few per thread)."""
    barrier = threading.Barrier(threads)
    failures = []

    def worker(t):
        try:
            barrier.wait()
            for j in range(calls):
                c = (j + t) % len(cases)
                got = cases[c]()
                want = reference[c]
                if not all(torch.equal(g, w) for g, w in zip(got, want)):
                    failures.append(f"thread {t} call {j}: case {c} differs from the serial result")
                    if len(failures) > 20:
                        return
        except Exception as e:  # noqa: BLE001  (reported below, with the thread)
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return failures


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _serial(cases):
    return [tuple(t.clone() for t in _tuple(c())) for c in cases]


def _wrap(cases):
    return [lambda c=c: _tuple(c()) for c in cases]


@pytest.fixture(scope="module")
def layers():
    """Small QuantLinear layers: 4-bit per-OC g32 asymmetric, 3-bit per-IC symmetric, 2-bit whole
    rows with bias."""
    torch.manual_seed(0)
    specs = [QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=32, axis="ic", symmetric=True),
             QuantSpec(bits=2, group_size=-1)]
    out = []
    for spec in specs:
        lin = torch.nn.Linear(96, 64, bias=spec.bits == 2)
        out.append(QuantLinear.from_linear(lin, spec))
    return out


def test_quantlinear_forward_threads_every_variant(cpu_variant, layers):
    # M = 1, 3 (the small-M path), 17, 40 (tiled), fp32 and bf16 activations
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(m, 96, generator=g).to(dt) for m in (1, 3, 17, 40) for dt in (torch.float32, torch.bfloat16)]
    cases = [lambda m=m, x=x: m(x) for m in layers for x in xs]
    with torch.no_grad():
        ref = _serial(cases)
        failures = run_threads(_wrap(cases), ref)
    assert not failures, failures[:5]


@pytest.mark.parametrize("norm_variant", ["generic", "avx512"])
def test_norm_ops_threads(norm_variant, monkeypatch):
    if norm_variant == "avx512" and "avx512f" not in layerpress.build_info()["cpu_features"]:
        pytest.skip("no AVX-512 on this CPU")
    monkeypatch.setenv("LAYERPRESS_CPU_NORM_KERNEL", norm_variant)
    g = torch.Generator().manual_seed(2)
    cases = []
    for rows, cols, dt in ((3, 37, torch.float32), (8, 64, torch.bfloat16), (5, 130, torch.float16)):
        x = torch.randn(rows, cols, generator=g).to(dt)
        r = torch.randn(rows, cols, generator=g).to(dt)
        w = torch.randn(cols, generator=g).to(dt)
        b = torch.randn(cols, generator=g).to(dt)
        gy = torch.randn(rows, cols, generator=g).to(dt)
        cases += [
            lambda x=x, w=w: _ops.rms_norm(x, w, 1e-6),
            lambda x=x, r=r, w=w: _ops.add_rms_norm(x, r, w, 1e-6),
            lambda x=x, w=w, b=b: _ops.layer_norm(x, w, b, 1e-5),
            lambda x=x, r=r, w=w, b=b: _ops.add_layer_norm(x, r, w, b, 1e-5),
        ]
        _, rstd = _ops.rms_norm(x, w, 1e-6)
        _, mean, rstd_l = _ops.layer_norm(x, w, b, 1e-5)
        cases += [
            lambda gy=gy, x=x, w=w, rstd=rstd: _ops.rms_norm_backward(gy, x, w, rstd, None, True),
            lambda gy=gy, x=x, w=w, mean=mean, rstd=rstd_l: _ops.layer_norm_backward(gy, x, w, mean, rstd, None, True, True),
        ]
    ref = _serial(cases)
    assert not (failures := run_threads(_wrap(cases), ref)), failures[:5]


def test_wtacrs_ops_threads():
    g = torch.Generator().manual_seed(3)
    cases = []
    for m, d, n, k, dt in ((50, 24, 16, 10, torch.float32), (33, 40, 8, 12, torch.bfloat16)):
        x = torch.randn(m, d, generator=g).to(dt)
        grad = torch.randn(m, n, generator=g).to(dt)
        norms = _ops.wtacrs_row_norms(x)
        idx, scales = _ops.wtacrs_select(norms, k, 1234)
        rows = _ops.wtacrs_gather_scale(x, idx, None)
        cases += [
            lambda x=x: _ops.wtacrs_row_norms(x),
            lambda norms=norms, k=k: _ops.wtacrs_select(norms, k, 1234),
            lambda x=x, idx=idx, scales=scales: _ops.wtacrs_gather_scale(x, idx, scales),
            lambda grad=grad, rows=rows, idx=idx, scales=scales: _ops.wtacrs_wgrad(grad, rows, idx, scales),
        ]
    ref = _serial(cases)
    assert not (failures := run_threads(_wrap(cases), ref)), failures[:5]


def test_large_outputs_through_the_output_cache_threads():
    # outputs of >= 8 MB come from the CPU output cache (cpp/ops/cpu_output_cache.cpp): blocks
    # handed out and given back by 8 threads at once must never be shared by two live outputs
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 1024, generator=g)
    w = torch.randn(1024, generator=g)
    cases = [lambda: _ops.rms_norm(x, w, 1e-6), lambda: _ops.rms_norm(x * 2, None, 1e-6)]
    ref = _serial(cases)

    def with_other_work():
        y = cases[0]()
        y2 = cases[1]()
        return y + y2  # both alive at once, each checked

    assert not (failures := run_threads(_wrap([with_other_work]), [ref[0] + ref[1]], calls=12)), failures[:5]
    assert _ops.cpu_output_cache_held_bytes() <= 256 << 20


def test_gemm_variant_choice_under_threads(layers):
    # the automatic variant and the small-M/tiled choice made per call, concurrently
    x1, x2 = torch.randn(1, 96), torch.randn(64, 96)
    m = layers[0]
    cases = [lambda: m(x1), lambda: m(x2)]
    with torch.no_grad():
        ref = _serial(cases)
        assert not (failures := run_threads(_wrap(cases), ref)), failures[:5]


def test_concurrent_to_does_not_corrupt_the_layer():
    torch.manual_seed(5)
    lin = torch.nn.Linear(128, 64)
    with torch.no_grad():
        lin.bias.copy_(lin.bias.half().float())  # survives the .half() round trips exactly
    m = QuantLinear.from_linear(lin, QuantSpec(bits=4, group_size=32))
    canonical = [t.clone() for t in m.canonical() if t is not None]
    x = torch.randn(5, 128)
    with torch.no_grad():
        y_ref = m(x)
    errors = []
    barrier = threading.Barrier(2)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave the moves

    def mover(t):
        try:
            barrier.wait()
            for j in range(200):
                if (j + t) % 3 == 0:
                    m.to(torch.float16)
                elif (j + t) % 3 == 1:
                    m.to(torch.float32)
                else:
                    m.to("cpu")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    pool = [threading.Thread(target=mover, args=(t,)) for t in range(2)]
    try:
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    m.to(torch.float32)
    assert m.scales.dtype == torch.float16  # the scales keep their dtype through every cast
    assert all(torch.equal(a, b) for a, b in zip(canonical, [t for t in m.canonical() if t is not None]))
    with torch.no_grad():
        assert torch.equal(m(x), y_ref)
    # repacking (canonical -> the CPU layout and back) from two threads at once
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = QuantLinear(128, 64, QuantSpec(bits=4, group_size=32))

    def loader():
        try:
            barrier.wait()
            for _ in range(50):
                fresh.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=loader) for _ in range(2)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors
    with torch.no_grad():
        assert torch.equal(fresh(x), y_ref)


def test_quantize_pack_threads():
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(64, 128, generator=g) for _ in range(3)]
    specs = [QuantSpec(bits=b, group_size=32, axis=a) for b, a in ((4, "oc"), (3, "ic"), (8, "oc"))]
    cases = []
    for w, spec in zip(ws, specs):
        def quant_pack(w=w, spec=spec):
            codes, s, z = lp_ops.quantize(w, spec)
            return (lp_ops.pack(codes, spec.bits), s) + (() if z is None else (z,))
        cases.append(quant_pack)
    ref = _serial(cases)
    assert not (failures := run_threads(_wrap(cases), ref, calls=300)), failures[:5]
