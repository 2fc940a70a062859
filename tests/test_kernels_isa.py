"""The SIMD kernels' own edge cases, on every ISA path this machine runs (tests/test_native_kernels.py
covers the common shapes): token counts around each path's tile widths (AVX2 tiles of 4 tokens,
AVX-512 / VNNI tiles of 8, AMX tiles of 16 rows, AMX taking over from VNNI at 8 tokens for INT4
and 16 for INT8), group counts around the AMX pass of 8 groups (1, 3, 17, 224 groups: less than
a pass, two passes and one group, K2.5 hidden size), block ranges that start past block 0, and
bit-exact int8 quantisation.

References are float64 numpy on the weights the kernels see (our packer + `unpack`) and the int8
activations the scalar path produced. Tolerances (kernels.h): matmul_a8 and matmul_f32 differ
from the reference only in fp32 summation order, bounded by gamma_K * sum |w x| with
gamma_K = 2 K 2^-24; matmul_a16 additionally rounds x to bf16 (checked against the bf16-rounded
x with the same bound, and against the exact x at 2^-8 relative to sum |w x|).
"""

from __future__ import annotations

import numpy as np
import pytest

from hybrid import native

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
ISAS = [i for i in N.available_isas() if i != "scalar"]
EPS32 = 2.0**-24


def bound(w, x):
    k = w.shape[1]
    return 2 * k * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


def packed(rng, fmt, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = N.quantize_pack(w, fmt)
    return q, s, N.unpack(fmt, q, s, n, k).astype(np.float64)


def bf16_round(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("k", [32, 96, 544])
@pytest.mark.parametrize("t", [1, 2, 4, 5, 7, 8, 9, 11, 15, 16, 33])
def test_matmul_a8_tile_edges(isa, fmt, k, t):
    rng = np.random.default_rng(100 * t + k)
    n = 48
    q, s, w = packed(rng, fmt, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    xq, xs, xg = NT.kernel_quantize_row_a8("scalar", x)
    xd = xq.astype(np.float64) * np.repeat(xs, 32, axis=1)
    out = NT.kernel_matmul_a8(isa, fmt, q, s, n, k, xq, xs, xg, 1, 3)  # blocks 1, 2
    ws = w[16:48]
    err = np.abs(out - xd @ ws.T)
    assert (err <= bound(ws, xd)).all(), f"{isa} {fmt} K={k} T={t}: max error {err.max()}"


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("t", [1, 11, 16])
def test_matmul_a8_k25_hidden(isa, fmt, t):
    """K = 7168 (224 groups = 14 AMX passes), the gate/up shape of Kimi K2.5."""
    rng = np.random.default_rng(7 + t)
    n, k = 32, 7168
    q, s, w = packed(rng, fmt, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    xq, xs, xg = NT.kernel_quantize_row_a8("scalar", x)
    xd = xq.astype(np.float64) * np.repeat(xs, 32, axis=1)
    out = NT.kernel_matmul_a8(isa, fmt, q, s, n, k, xq, xs, xg)
    err = np.abs(out - xd @ w.T)
    assert (err <= bound(w, xd)).all(), err.max()


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("t", [1, 2, 4, 5, 9])
def test_matmul_f32_tile_edges(isa, fmt, t):
    rng = np.random.default_rng(200 + t)
    n, k = 48, 96
    q, s, w = packed(rng, fmt, n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    out = NT.kernel_matmul_f32(isa, fmt, q, s, n, k, x, 2, 3)  # block 2 only
    ws = w[32:48]
    err = np.abs(out - x.astype(np.float64) @ ws.T)
    assert (err <= bound(ws, x)).all(), err.max()


@pytest.mark.parametrize("k", [32, 544, 2048])
@pytest.mark.parametrize("t", [1, 7, 8, 9, 17])
def test_matmul_a16_chunks(isa, k, t):
    """K chunks of the bf16 path (512 inputs) and token tiles of 8."""
    if not NT.kernel_entries(isa)["matmul_a16"]:
        pytest.skip(f"{isa} has no matmul_a16 (needs avx512_bf16)")
    rng = np.random.default_rng(300 + t + k)
    n = 32
    q, _, w = packed(rng, "bf16", n, k)
    x = rng.standard_normal((t, k)).astype(np.float32)
    out = NT.kernel_matmul_a16(isa, q, n, k, x)
    xb = bf16_round(x)
    err = np.abs(out - xb @ w.T)
    assert (err <= bound(w, xb)).all(), err.max()
    mag = np.abs(x).astype(np.float64) @ np.abs(w).T
    assert (np.abs(out - x.astype(np.float64) @ w.T) <= 2.0**-8 * mag).all()


@pytest.mark.parametrize("k", [32, 7168])
def test_quantize_row_a8_bit_exact(isa, k):
    """The SIMD quantisers use the scalar formula (x * (127 / amax), nearest even): same bytes."""
    rng = np.random.default_rng(400 + k)
    x = (rng.standard_normal((6, k)) * rng.uniform(1e-3, 1e3, (6, 1))).astype(np.float32)
    x[2, : k // 2] = 0
    x[3, 5::32] = np.abs(x[3]).max() * 2  # a tie-free amax in every group
    x[4] = np.round(x[4] * 4) / 4  # values on a coarse grid: many equal magnitudes
    q, s, g = NT.kernel_quantize_row_a8(isa, x)
    q0, s0, g0 = NT.kernel_quantize_row_a8("scalar", x)
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(g, g0)


@pytest.mark.parametrize("isa_all", ["scalar", *ISAS])
def test_quantize_row_a8_nonfinite_groups(isa_all):
    """A group holding NaN or Inf (in any lane) gets scale NaN, q 0, gsum 0; the other groups are
    quantised as if it were not there, and matmul_a8 turns the NaN scale into NaN outputs (it
    was clamped to +-127: plausible numbers)."""
    rng = np.random.default_rng(410)
    x = rng.standard_normal((4, 32 * 34)).astype(np.float32)
    clean = x.copy()
    bad = {0: [], 1: [], 2: [], 3: []}
    for lane in range(32):  # row 0: one NaN per group, in every lane
        x[0, 32 * lane + lane] = np.nan
        bad[0].append(lane)
    for g, v in ((3, np.inf), (7, -np.inf), (30, np.nan)):
        x[1, 32 * g + 17] = v
        bad[1].append(g)
    x[2, 64:96] = np.nan
    bad[2].append(2)
    q, s, gs = NT.kernel_quantize_row_a8(isa_all, x)
    q0, s0, g0 = NT.kernel_quantize_row_a8("scalar", clean)
    for t, groups in bad.items():
        ok = np.setdiff1d(np.arange(34), groups)
        assert np.isnan(s[t, groups]).all() and not np.isnan(s[t, ok]).any()
        assert (q[t].reshape(34, 32)[groups] == 0).all() and (gs[t, groups] == 0).all()
        np.testing.assert_array_equal(q[t].reshape(34, 32)[ok], q0[t].reshape(34, 32)[ok])
        np.testing.assert_array_equal(s[t, ok], s0[t, ok])
    for fmt in ("int4", "int8"):
        wq, ws, _ = packed(rng, fmt, 32, 32 * 34)
        out = NT.kernel_matmul_a8(isa_all, fmt, wq, ws, 32, 32 * 34, q, s, gs, 0, 2)
        assert np.isnan(out[:3]).all(), (isa_all, fmt)
        assert np.isfinite(out[3]).all()
