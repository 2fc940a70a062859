"""The dense bf16 GEMV (csrc/core/dense.h, KernelTable::gemv_bf16) on every ISA path this machine runs:
out [T, N] = x [T, K] . w [N, K]^T on unpacked row-major bf16, the device Linear's CPU decode path.

Shapes cover every K tail of the 32-input (AVX-512) and 16-input (AVX2) steps, row counts around
the 4-row tiles and the 16-row thread split, token counts around the 2- and 4-token tiles, strided
weight rows (a column slice of a wider matrix) and strided, misaligned activation rows.

Tolerance (kernels.h): a bf16 x bf16 product is exact in fp32, so every path, the scalar
reference included, differs from the exact sum only by fp32 rounding in its summation order:
|out - exact| <= gamma * sum_k |w x| with gamma = K * 2^-24 (the classic (K - 1) u bound, rounded
up). Two paths therefore differ by at most 2 gamma sum |w x|; torch's fp32 matmul obeys the
same bound. A bf16 out is the fp32 result rounded to nearest even, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid import native

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
ISAS = list(N.available_isas())
U = 2.0**-24


def bits(t: torch.Tensor) -> np.ndarray:
    """uint16 numpy view of a bf16 tensor (no copy; strides kept)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def bf16_round_bits(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even (kernels.h f32_to_bf16; no NaNs here)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def operands(rng, n, k, t):
    """Strided bf16 operands: w = a column slice of [n, k + 5], x = an offset slice of [t, k + 8]
    (rows start 3 elements in: no 64-byte alignment). Returns torch views and exact float64 copies."""
    wb = torch.from_numpy(rng.standard_normal((n, k + 5), dtype=np.float32)).bfloat16()
    xb = torch.from_numpy(rng.standard_normal((t, k + 8), dtype=np.float32)).bfloat16()
    w, x = wb[:, :k], xb[:, 3 : 3 + k]
    return w, x, w.double().numpy(), x.double().numpy()


def gamma_bound(w64, x64):
    k = w64.shape[1]
    return k * U * (np.abs(x64) @ np.abs(w64).T) + 1e-30


def run(isa, w, x, out_dtype=np.float32, threads=False):
    out = np.full((x.shape[0], w.shape[0]), np.nan if out_dtype == np.float32 else 0xFFFF, out_dtype)
    N.dense_gemv(bits(w), bits(x), out, isa, threads)
    return out


@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 64, 100, 256, 512, 1000, 2048])
def test_matches_exact_scalar_and_torch(k):
    """Every ISA on the same operands (one set of references per shape)."""
    rng = np.random.default_rng(k)
    for n in (1, 15, 16, 17, 100, 512):
        for t in range(1, 10):
            if k * n >= 512 * 512 and t not in (1, 2, 4, 5, 9):
                continue  # large shapes: enough token counts to cover the tiles, keep it quick
            w, x, w64, x64 = operands(rng, n, k, t)
            bound = gamma_bound(w64, x64)
            exact = x64 @ w64.T
            tref = (x.float() @ w.float().T).numpy()
            ref = run("scalar", w, x)
            for isa in ISAS:
                out = ref if isa == "scalar" else run(isa, w, x)
                err = np.abs(out - exact)
                assert (err <= bound).all(), f"{isa} N={n} K={k} T={t}: error {err.max():.3g} > bound"
                assert (np.abs(out - ref) <= 2 * bound).all(), f"{isa} vs scalar N={n} K={k} T={t}"
                assert (np.abs(out - tref) <= 2 * bound).all(), f"{isa} vs torch N={n} K={k} T={t}"


@pytest.mark.parametrize("isa", ISAS)
def test_out_bf16_and_threads_agree(isa):
    """bf16 out = the fp32 out rounded; threads=True (pool split at 16-row units, for matrices of
    4 MiB and more) gives the same bits as inline. 2100 rows: a split that is not a multiple of
    the tiles; T = 33: past the 32-token scratch tile of the bf16 store."""
    rng = np.random.default_rng(5)
    for n, k, ts in ((2100, 1024, (1, 3, 33)), (40, 100, (1, 2, 6))):
        for t in ts:
            w, x, _, _ = operands(rng, n, k, t)
            f32 = run(isa, w, x)
            assert np.array_equal(run(isa, w, x, threads=True), f32)
            for threads in (False, True):
                b = run(isa, w, x, np.uint16, threads)
                assert np.array_equal(b, bf16_round_bits(f32)), f"{isa} N={n} K={k} T={t} threads={threads}"


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_stay_in_their_token(isa):
    """A NaN in one token reaches all of its outputs and no other token's; the zero padding of a
    K tail never turns into inf * 0."""
    rng = np.random.default_rng(9)
    n, k, t = 9, 45, 3
    w, x, _, _ = operands(rng, n, k, t)
    x[1, 40] = float("nan")
    w[4, 44] = float("inf")
    out = run(isa, w, x)
    assert np.isnan(out[1]).all()
    assert np.isfinite(np.delete(out[[0, 2]], 4, axis=1)).all()
    assert np.isinf(out[[0, 2], 4]).all() or np.isnan(out[[0, 2], 4]).all()


def test_every_isa_has_the_entry():
    for isa in ISAS:
        assert NT.kernel_entries(isa)["gemv_bf16"]


# ---- torch front door (hybrid.native.gemv_bf16) ------------------------------------------------


def test_torch_wrapper_allocates_and_writes():
    rng = np.random.default_rng(11)
    w, x, w64, x64 = operands(rng, 48, 96, 3)
    y = native.gemv_bf16(w, x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 48) and y.is_contiguous()
    ref = run("", w, x)
    assert np.array_equal(bits(y), bf16_round_bits(ref))
    out32 = torch.empty(3, 48)
    assert native.gemv_bf16(w, x, out32, isa="scalar", threads=False) is out32
    assert (np.abs(out32.numpy() - x64 @ w64.T) <= gamma_bound(w64, x64)).all()
    # contiguous operands, a strided out (rows of a wider buffer)
    wide = torch.zeros(3, 60, dtype=torch.bfloat16)
    native.gemv_bf16(w.contiguous(), x.contiguous(), wide[:, 5:53])
    assert torch.equal(wide[:, 5:53], y) and not wide[:, :5].any() and not wide[:, 53:].any()


def test_torch_wrapper_errors():
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    cases = [
        (lambda: native.gemv_bf16(w.float(), x), TypeError, "weight must have dtype torch.bfloat16"),
        (lambda: native.gemv_bf16(w, x.half()), TypeError, "x must have dtype torch.bfloat16"),
        (lambda: native.gemv_bf16(bits(w), x), TypeError, "weight must be a torch.Tensor"),
        (lambda: native.gemv_bf16(w, x.to("meta")), TypeError, "x must be a CPU tensor"),
        (lambda: native.gemv_bf16(w, x[:, :31]), ValueError, "x has 31 inputs per row but weight has 32"),
        (lambda: native.gemv_bf16(w, x[0]), ValueError, "x must have 2 dimensions"),
        (lambda: native.gemv_bf16(w[:, ::2], x[:, :16]), ValueError, "weight must have contiguous rows"),
        (lambda: native.gemv_bf16(w.t(), x[:, :16]), ValueError, "weight must have contiguous rows"),
        (lambda: native.gemv_bf16(w[:0], x), ValueError, "weight must not be empty"),
        (lambda: native.gemv_bf16(w, x[:0]), ValueError, "x must not be empty"),
        (lambda: native.gemv_bf16(w, x, torch.empty(2, 15)), ValueError, "out must have shape [T, N] = [2, 16]"),
        (lambda: native.gemv_bf16(w, x, torch.empty(2, 16, dtype=torch.float16)), TypeError, "out must have dtype"),
        (lambda: native.gemv_bf16(w, x, x[:, :16]), ValueError, "out must not overlap x"),
        (lambda: native.gemv_bf16(w, x, isa="sse9"), ValueError, "unknown ISA 'sse9'"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
            call()


# ---- numpy front door (hybrid._native.dense_gemv) ----------------------------------------------


def test_numpy_binding_errors():
    w = np.zeros((16, 32), np.uint16)
    x = np.zeros((2, 32), np.uint16)
    out = np.zeros((2, 16), np.float32)
    ro = np.zeros((2, 16), np.float32)
    ro.flags.writeable = False
    buf = np.zeros((2, 64), np.uint16)
    cases = [
        ((w.astype(np.float32), x, out), TypeError, "w must have dtype uint16"),
        ((w, x.astype(np.int16), out), TypeError, "x must have dtype uint16"),
        ((w, x, out.astype(np.float64)), TypeError, "out must have dtype float32 or uint16"),
        ((w.tolist(), x, out), TypeError, "w must be a numpy array"),
        ((w, x[:, :30], out), ValueError, "x has 30 inputs per row but w has 32"),
        ((w, x[0], out), ValueError, "x must have 2 dimensions"),
        ((w[:, ::2], x[:, :16], out), ValueError, "w must have contiguous rows"),
        ((w[:0], x, out[:, :0]), ValueError, "w must not be empty"),
        ((w, x, out[:, :15]), ValueError, r"out must have shape \[T, N\] = \[2, 16\]"),
        ((w, x, ro), ValueError, "out must be writable"),
        ((w, buf[:, :32], buf[:, 32:48]), ValueError, "out must not overlap x"),
        ((w, x, out, "avx9"), ValueError, "unknown ISA 'avx9'"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            N.dense_gemv(*args)


def test_single_row_or_column_strides_are_free():
    """A dimension of size 1 may carry any stride (numpy and torch give odd ones to such views)."""
    rng = np.random.default_rng(2)
    w, x, w64, x64 = operands(rng, 16, 1, 1)
    col = torch.zeros(16, 7, dtype=torch.bfloat16)
    col[:, 3:4] = w
    out = np.zeros((1, 16), np.float32)
    N.dense_gemv(bits(col[:, 3:4]), bits(x), out)
    assert np.array_equal(out, (x64 @ w64.T).astype(np.float32))  # K = 1: one exact product
