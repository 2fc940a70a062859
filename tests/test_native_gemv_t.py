"""The transposed bf16 GEMV (KernelTable::gemv_t_bf16, kernels.h) on every ISA path this machine
runs: out [T, n1 - n0] (+)= x [T, K] . w [K, N][:, n0:n1], fp32 x, bf16 w used along its rows
(MLA decode: q_nope . W_uk, softmax probabilities . latent cache rows).

Shapes cover K around the 16-row blocks and far past them, N around the 16-column zmm, the
8-column ymm and the 64-column chunk, column ranges that start and end off those multiples, W as
a column slice of a wider matrix (row stride > N), x and out rows strided and misaligned, 1 to 6
tokens (and 9) around the 4-token tiles, overwrite and accumulate (out pre-filled with random
values, which the sums start from).

Tolerance. Every path sums each column in increasing i starting from s (the old out value, or
0): the scalar reference rounds each product x * w and each sum, the SIMD paths do one FMA per
step. Against the exact value (float64: the products are exact there) we demand
|out - exact| <= 1e-6 * (|s| + sum_i |x_i w_ij|). The worst-case bound (K + 1) 2^-24 (|s| + sum |x w|)
is larger for K > 15, but rounding errors of random data add like a random walk: the typical
error of an ordered sum grows like K, as does sum |x w|, so the ratio stays near 2^-24 and the
largest seen on these shapes is below 3e-7 at every K, while a row or a column dropped, repeated
or shifted costs ~1/K of the magnitude, far above 1e-6 up to K = 5000. Paths differ from the scalar
reference by at most twice that, and the SIMD paths from each other not at all: the same FMA
steps in the same order. The scalar path is also checked bit for bit against the same ordered
float32 loop written in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

from hybrid import native

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
ISAS = list(N.available_isas())
REL = 1e-6


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns by truncation (any bf16 value will do as test data)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def column_ranges(n: int) -> list[tuple[int, int]]:
    """The whole width, and for wider matrices a range that starts and ends off every multiple of 8."""
    out = [(0, n)]
    if n >= 5:
        out.append((3, n - 1))
    if n >= 100:
        out.append((n // 2 + 1, n))
    return out


def run(isa, w, x, n0, n1, acc, prefill, rng):
    """out as the middle columns of a wider buffer (strided rows, untouched neighbours checked)."""
    t, cols = x.shape[0], n1 - n0
    buf = rng.standard_normal((t, cols + 6)).astype(np.float32)
    keep = buf.copy()
    out = buf[:, 1 : 1 + cols]
    if acc:
        out[...] = prefill
    else:
        out[...] = np.nan  # never read when overwriting
    res = NT.kernel_gemv_t_bf16(isa, w, x, n0, n1, acc, out)
    assert res is out
    assert np.array_equal(buf[:, 0], keep[:, 0]) and np.array_equal(buf[:, 1 + cols :], keep[:, 1 + cols :]), (
        f"{isa} wrote outside out[:, {n0}:{n1}]"
    )
    return out.copy()


@pytest.mark.parametrize("k", [1, 3, 16, 31, 100, 1000, 5000])
def test_matches_exact_scalar_and_each_other(k):
    rng = np.random.default_rng(k)
    for n in (1, 15, 16, 17, 64, 100, 512):
        wide = bf16_bits(rng.standard_normal((k, n + 13), dtype=np.float32))
        w = wide[:, 5 : 5 + n]  # row stride n + 13, first column off any alignment
        w64 = bf16_value(w).astype(np.float64)  # contiguous [K, N]
        abs_w64 = np.abs(w64)
        tokens = (1, 2, 3, 4, 5, 6, 9) if k * n <= 100 * 512 else (1, 2, 3, 4, 5, 6)
        for t in tokens:
            xb = rng.standard_normal((t, k + 7), dtype=np.float32)
            x = xb[:, 2 : 2 + k]  # strided rows, starting 8 bytes in
            x64 = x.astype(np.float64)
            sums, sum_abs = x64 @ w64, np.abs(x64) @ abs_w64  # [T, N], exact products and sums
            for n0, n1 in column_ranges(n):
                for acc in (False, True):
                    s = rng.standard_normal((t, n1 - n0)).astype(np.float32) if acc else np.zeros((t, n1 - n0), np.float32)
                    exact = s + sums[:, n0:n1]
                    mag = np.abs(s) + sum_abs[:, n0:n1]
                    what = f"K={k} N={n} [{n0}, {n1}) T={t} accumulate={acc}"
                    outs = {isa: run(isa, w, x, n0, n1, acc, s, rng) for isa in ISAS}
                    simd = None
                    for isa, out in outs.items():
                        err = np.abs(out - exact)
                        assert (err <= REL * mag + 1e-30).all(), f"{isa} {what}: error {(err / (mag + 1e-30)).max():.3g} x magnitude"
                        assert (np.abs(out - outs["scalar"]) <= 2 * REL * mag + 1e-30).all(), f"{isa} vs scalar {what}"
                        if isa != "scalar":
                            if simd is None:
                                simd = (isa, out)
                            assert np.array_equal(out, simd[1]), f"{isa} vs {simd[0]} {what}: not the same FMA steps"


def test_scalar_is_the_ordered_float32_loop():
    """out = s, then out += x[:, i] * W[i] for i = 0, 1, ...: each product and sum rounded to float32."""
    rng = np.random.default_rng(3)
    for k, n, t, acc in ((37, 29, 3, False), (200, 70, 2, True), (1, 16, 1, True)):
        w = bf16_bits(rng.standard_normal((k, n), dtype=np.float32))
        wf = bf16_value(w)
        x = rng.standard_normal((t, k), dtype=np.float32)
        s = rng.standard_normal((t, n)).astype(np.float32)
        ref = s.copy() if acc else np.zeros((t, n), np.float32)
        for i in range(k):
            ref += x[:, i : i + 1] * wf[i]  # float32 * float32 -> float32, then float32 +
        out = NT.kernel_gemv_t_bf16("scalar", w, x, accumulate=acc, out=s.copy())
        assert np.array_equal(out, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_stays_in_its_token_and_old_out_is_not_read(isa):
    rng = np.random.default_rng(9)
    k, n, t = 70, 40, 3
    w = bf16_bits(rng.standard_normal((k, n), dtype=np.float32))
    x = rng.standard_normal((t, k), dtype=np.float32)
    x[1, 33] = np.nan
    out = NT.kernel_gemv_t_bf16(isa, w, x, out=np.full((t, n), np.nan, np.float32))
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    x[1, 33] = 0.5
    prev = rng.standard_normal((t, n)).astype(np.float32)
    prev[2, 17] = np.inf
    out = NT.kernel_gemv_t_bf16(isa, w, x, 5, 30, True, prev[:, 5:30].copy())
    assert np.isinf(out[2, 12]) and np.isfinite(np.delete(out.ravel(), 2 * 25 + 12)).all()


def test_allocates_out_and_defaults_to_every_column():
    rng = np.random.default_rng(4)
    w = bf16_bits(rng.standard_normal((20, 33), dtype=np.float32))
    x = rng.standard_normal((2, 20), dtype=np.float32)
    out = NT.kernel_gemv_t_bf16("", w, x)
    assert out.dtype == np.float32 and out.shape == (2, 33) and out.flags.c_contiguous
    assert np.array_equal(out, NT.kernel_gemv_t_bf16(N.active_isa(), w, x, 0, 33))  # "" = the active ISA


def test_every_isa_has_the_entry():
    for isa in ISAS:  # scalar, avx2 and avx512 their own; the tables above take avx512's
        assert NT.kernel_entries(isa)["gemv_t_bf16"]


def test_binding_errors():
    w = np.zeros((32, 16), np.uint16)
    x = np.zeros((2, 32), np.float32)
    out = np.zeros((2, 16), np.float32)
    ro = np.zeros((2, 16), np.float32)
    ro.flags.writeable = False
    buf = np.zeros((2, 64), np.float32)
    cases = [
        (("", w.astype(np.float32), x), TypeError, "w must have dtype uint16"),
        (("", w, x.astype(np.float64)), TypeError, "x must have dtype float32"),
        (("", w, x, 0, -1, False, out.astype(np.float64)), TypeError, "out must have dtype float32"),
        (("", w.tolist(), x), TypeError, "w must be a numpy array"),
        (("", w, x[:, :31]), ValueError, r"x has 31 inputs per row but w has 32 rows"),
        (("", w, x[0]), ValueError, "x must have 2 dimensions"),
        (("", w[None], x), ValueError, "w must have 2 dimensions"),
        (("", w[:, ::2], x), ValueError, "w must have contiguous rows"),
        (("", w, np.asfortranarray(np.zeros((3, 32), np.float32))), ValueError, "x must have contiguous rows"),
        (("", w[::-1], x), ValueError, "w row stride must be >= its 16 columns"),
        (("", w[:0], x[:, :0]), ValueError, "w must not be empty"),
        (("", w, x[:0]), ValueError, "x must not be empty"),
        (("", w, x, 5, 5), ValueError, r"column range \[n0, n1\) = \[5, 5\) must satisfy 0 <= n0 < n1 <= N = 16"),
        (("", w, x, -1, 4), ValueError, r"column range \[n0, n1\) = \[-1, 4\)"),
        (("", w, x, 0, 17), ValueError, r"column range \[n0, n1\) = \[0, 17\)"),
        (("", w, x, 0, -1, True), ValueError, "accumulate=True needs out"),
        (("", w, x, 2, 10, False, out), ValueError, r"out must have shape \[T, n1 - n0\] = \[2, 8\], got \[2, 16\]"),
        (("", w, x, 0, -1, False, ro), ValueError, "out must be writable"),
        (("", w, buf[:, :32], 0, -1, False, buf[:, 32:48]), ValueError, "out must not overlap x"),
        (("avx9", w, x), ValueError, "unknown ISA 'avx9'"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            NT.kernel_gemv_t_bf16(*args)
    missing = [i for i in N.isa_names() if i not in ISAS]
    if missing:
        with pytest.raises(ValueError, match=f"ISA '{missing[0]}' cannot run here"):
            NT.kernel_gemv_t_bf16(missing[0], w, x)
