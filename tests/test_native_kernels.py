"""Every kernel of every ISA table this machine runs, against float64 numpy references of the
same math (csrc/core/kernels.h). Weights are packed with our packer and dequantised with `unpack`, so
the references use exactly the weights the kernels see.

Tolerances: the int8 activations are the same for every path (produced by one quantize call), so
matmul_a8 differs from the reference only by fp32 accumulation; matmul_f32 / matmul_a16 likewise.
For a dot product of n terms summed in fp32 the worst-case error is gamma_n * sum |w x| with
gamma_n ~ n * 2^-24; the kernels sum in blocks, so n = K is a safe (loose) bound.
"""

from __future__ import annotations

import numpy as np
import pytest
from native_ref import bf16_round

from hybrid import native

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
ISAS = N.available_isas()
EPS32 = 2.0**-24


def fp32_bound(w, x):
    """gamma_K * sum_k |w_k x_k| per (token, row): the fp32 summation error bound."""
    K = w.shape[1]
    return 2 * K * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


def packed(rng, fmt, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = N.quantize_pack(w, fmt)
    return q, s, N.unpack(fmt, q, s, n, k)


@pytest.mark.parametrize("k", [32, 256, 7168])
def test_quantize_row_a8_matches_rule(isa, k):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, k)) * rng.uniform(0.01, 10, (5, 1))).astype(np.float32)
    x[1, :32] = 0  # an all-zero group: scale 0, q 0
    q, scale, gsum = NT.kernel_quantize_row_a8(isa, x)
    g = x.reshape(5, k // 32, 32)
    amax = np.abs(g).max(axis=2)
    np.testing.assert_allclose(scale, amax / 127, rtol=2e-7, atol=0)
    safe = np.where(scale > 0, scale, 1)[..., None]
    exact = np.where(scale[..., None] > 0, g / safe, 0)
    # Round to nearest: at most half a quantum (+ the rounding of x * (1/scale) itself).
    assert np.abs(q.reshape(g.shape) - exact).max() <= 0.5 + 1e-4
    assert (q[1, :32] == 0).all() and scale[1, 0] == 0
    np.testing.assert_array_equal(gsum, q.reshape(g.shape).astype(np.int64).sum(axis=2))
    if isa != "scalar":  # same rule as the reference, so the same bytes up to ties
        q0, s0, _ = NT.kernel_quantize_row_a8("scalar", x)
        assert np.abs(q.astype(int) - q0).max() <= 1
        assert (q != q0).mean() < 1e-3
        np.testing.assert_array_equal(scale, s0)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("t", [1, 3, 17, 64])
@pytest.mark.parametrize("blocks", [None, (1, 3)])
def test_matmul_a8(isa, fmt, t, blocks):
    rng = np.random.default_rng(2 + t)
    n, k = 64, 512
    q, s, w = packed(rng, fmt, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    xq, xs, xg = NT.kernel_quantize_row_a8("scalar", x)
    b0, b1 = blocks or (0, n // 16)
    out = NT.kernel_matmul_a8(isa, fmt, q, s, n, k, xq, xs, xg, b0, b1)
    xd = xq.astype(np.float64) * np.repeat(xs, 32, axis=1)  # the activations the kernel sees
    ws = w[16 * b0:16 * b1].astype(np.float64)
    ref = xd @ ws.T
    assert out.shape == (t, 16 * (b1 - b0))
    assert (np.abs(out - ref) <= fp32_bound(ws, xd)).all(), np.abs(out - ref).max()


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("t", [1, 3, 17, 64])
def test_matmul_f32(isa, fmt, t):
    rng = np.random.default_rng(3 + t)
    n, k = 48, 256
    q, s, w = packed(rng, fmt, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    out = NT.kernel_matmul_f32(isa, fmt, q, s, n, k, x)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert (np.abs(out - ref) <= fp32_bound(w, x)).all(), np.abs(out - ref).max()
    part = NT.kernel_matmul_f32(isa, fmt, q, s, n, k, x, 1, 2)
    np.testing.assert_allclose(part, out[:, 16:32], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [1, 3, 17, 64])
def test_matmul_a16(isa, t):
    rng = np.random.default_rng(4 + t)
    n, k = 48, 256
    q, _, w = packed(rng, "bf16", n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    xb = bf16_round(x)
    ref = xb @ w.T.astype(np.float64)
    bound = fp32_bound(w, xb)
    r = NT.reference_matmul_a16(q, n, k, x)
    assert (np.abs(r - ref) <= bound).all()
    if not NT.kernel_entries(isa)["matmul_a16"]:
        with pytest.raises(ValueError, match="matmul_a16"):
            NT.kernel_matmul_a16(isa, q, n, k, x)
        return
    out = NT.kernel_matmul_a16(isa, q, n, k, x)
    assert (np.abs(out - ref) <= bound).all(), np.abs(out - ref).max()


def test_k25_sizes(isa):
    """Kimi K2.5 matrix shapes: gate_up rows x H=7168 and down rows x I=2048 (a row slice)."""
    rng = np.random.default_rng(5)
    for n, k in ((32, 7168), (32, 2048)):
        q, s, w = packed(rng, "int4", n, k)
        x = rng.standard_normal((3, k)).astype(np.float32)
        xq, xs, xg = NT.kernel_quantize_row_a8("scalar", x)
        xd = xq.astype(np.float64) * np.repeat(xs, 32, axis=1)
        out = NT.kernel_matmul_a8(isa, "int4", q, s, n, k, xq, xs, xg)
        assert (np.abs(out - xd @ w.T.astype(np.float64)) <= fp32_bound(w, xd)).all()
        out = NT.kernel_matmul_f32(isa, "int4", q, s, n, k, x)
        assert (np.abs(out - x.astype(np.float64) @ w.T.astype(np.float64)) <= fp32_bound(w, x)).all()


def test_dispatch_facts():
    info = native.isa()
    assert info["available"][0] == "scalar"
    assert info["active"] in info["available"]
    assert set(info["available"]) <= set(N.isa_names())
    for name in N.isa_names():
        reason = N.isa_unavailable_reason(name)
        assert (reason == "") == (name in info["available"])
    assert "unknown ISA" in N.isa_unavailable_reason("sse9")
    if "avx512_bf16" in info["available"]:  # the level builds lattice operands with VBMI (simd_iq.h)
        assert "avx512_vbmi" in info["cpu"]["flags"]
    with pytest.raises(ValueError, match="cannot run here"):
        NT.kernel_matmul_f32("sse9", "bf16", np.zeros(16 * 32 * 2, np.uint8), None, 16, 32,
                            np.zeros((1, 32), np.float32))
