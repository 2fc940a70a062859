"""The dense int8 GEMV (csrc/core/dense.h dense_gemv_i8, KernelTable::gemv_i8) on every ISA path this
machine runs: out [T, N] = (x [T, K] . w [N, K]^T) * scale [N], w int8 with a per-row fp32 scale
(device_weights="int8" on the CPU), x bf16. And the device Linear that uses it (NativeLinear).

Shapes cover every K tail of the 16-input (AVX-512) and 8-input (AVX2) steps, row counts around
the 4-row tiles and the 16-row thread split, token counts around the 2- and 4-token tiles, strided
weight rows and strided, misaligned activation rows.

Tolerance (kernels.h): an int8 x bf16 product is exact in fp32 (7 + 8 significant bits), so every
path, the scalar reference included, differs from the exact sum only by fp32 rounding in its
summation order: |sum - exact| <= gamma * sum_k |w x| with gamma = K * 2^-24, and the scale
multiply adds one more rounding (2^-24 relative). A bf16 out is the fp32 result rounded to
nearest even, bit for bit.
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


def bf16_round(a: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest even (kernels.h f32_to_bf16; torch rounds the same way)."""
    return a.float().to(torch.bfloat16)


def operands(rng, n, k, t):
    """Strided operands: w = a column slice of int8 [n, k + 5], x = an offset slice of bf16
    [t, k + 8] (rows start 3 elements in), scale fp32 [n]. Returns them and exact float64 copies."""
    wb = torch.from_numpy(rng.integers(-127, 128, size=(n, k + 5), dtype=np.int8))
    xb = torch.from_numpy(rng.standard_normal((t, k + 8), dtype=np.float32)).bfloat16()
    w, x = wb[:, :k], xb[:, 3: 3 + k]
    scale = torch.from_numpy(rng.uniform(1e-3, 2e-2, size=n).astype(np.float32))
    return w, scale, x, w.double(), scale.double(), x.double()


def check(out, w64, s64, x64):
    k = w64.shape[1]
    exact = (x64 @ w64.T) * s64
    bound = (k * U * (x64.abs() @ w64.abs().T) + U * (x64 @ w64.T).abs()) * s64 + 1e-30
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("k", [1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 256, 1000, 2048])
def test_every_isa_matches_the_exact_sum(k):
    rng = np.random.default_rng(k)
    for n, t in [(1, 1), (3, 2), (4, 1), (5, 3), (17, 4), (33, 5), (64, 9)]:
        w, s, x, w64, s64, x64 = operands(rng, n, k, t)
        for isa in ISAS:
            out = torch.full((t, n), float("nan"))
            native.gemv_i8(w, s, x, out, isa=isa, threads=False)
            check(out, w64, s64, x64)


@pytest.mark.parametrize("isa", ISAS)
def test_out_bf16_and_threads_agree(isa):
    """bf16 out is the fp32 out rounded once; the pool split (a 4 MiB+ weight) changes no bit."""
    rng = np.random.default_rng(3)
    w, s, x, w64, s64, x64 = operands(rng, 600, 7168, 3)   # 4.3 MB of int8: split over the pool
    f32 = native.gemv_i8(w, s, x, torch.empty(3, 600), isa=isa, threads=False)
    check(f32, w64, s64, x64)
    assert torch.equal(native.gemv_i8(w, s, x, torch.empty(3, 600), isa=isa, threads=True), f32)
    y = native.gemv_i8(w, s, x, isa=isa)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 600)
    assert torch.equal(y, bf16_round(f32))


def test_every_isa_has_the_entry():
    for isa in ISAS:
        assert NT.kernel_entries(isa)["gemv_i8"]


def test_errors_name_the_argument():
    w = torch.zeros(16, 32, dtype=torch.int8)
    s = torch.ones(16)
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    cases = [
        (lambda: native.gemv_i8(w.float(), s, x), TypeError, "weight must have dtype torch.int8"),
        (lambda: native.gemv_i8(w, s.double(), x), TypeError, "scale must have dtype torch.float32"),
        (lambda: native.gemv_i8(w, s[:15], x), ValueError, "scale must have shape [16]"),
        (lambda: native.gemv_i8(w, torch.ones(32)[::2], x), ValueError, "scale must be contiguous"),
        (lambda: native.gemv_i8(w, s, x.half()), TypeError, "x must have dtype torch.bfloat16"),
        (lambda: native.gemv_i8(w, s, x[:, :31]), ValueError, "x has 31 inputs per row but weight has 32"),
        (lambda: native.gemv_i8(w[:, ::2], s, x[:, :16]), ValueError, "weight must have contiguous rows"),
        (lambda: native.gemv_i8(w[:0], s[:0], x), ValueError, "weight must not be empty"),
        (lambda: native.gemv_i8(w, s, x, torch.empty(2, 15)), ValueError, "out must have shape [T, N] = [2, 16]"),
        (lambda: native.gemv_i8(w, s, x, isa="sse9"), ValueError, "unknown ISA 'sse9'"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
            call()


# ---- the device Linear ---------------------------------------------------------------------------

def test_native_linear_int8_equals_the_reference():
    """NativeLinear of an int8 weight (the native op set on the CPU): a few tokens through the
    native GEMV, more through Linear's reference; both within bf16 rounding of the exact value,
    bias included."""
    from hybrid.ops.linear import NATIVE_INT8_MAX_TOKENS as NATIVE_MAX_TOKENS, Linear, NativeLinear

    rng = np.random.default_rng(5)
    w, s, x, w64, s64, x64 = operands(rng, 3000, 512, NATIVE_MAX_TOKENS + 3)
    w, x = w.contiguous(), x.contiguous()
    bias = torch.randn(3000).bfloat16()
    assert NativeLinear.fits(w, s) and not NativeLinear.fits(w, s.double()) and not NativeLinear.fits(w.t(), s[:512])
    lin = NativeLinear(N, w, bias, s, name="t")
    ref = Linear(w, bias, s, name="t")
    y = (x64 @ w64.T) * s64
    exact = y + bias.double()
    # two bf16 roundings (the product, then the bias add), each within 2^-8 of what it rounds
    tol_all = 2.0**-8 * (y.abs() + exact.abs()) + 2.0**-8 * bias.double().abs()
    for rows in (1, NATIVE_MAX_TOKENS, NATIVE_MAX_TOKENS + 3):   # native, native, reference
        got, want = lin(x[:rows]), ref(x[:rows])
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 3000)
        tol = tol_all[:rows]
        assert ((got.double() - exact[:rows]).abs() <= tol).all()
        assert ((want.double() - exact[:rows]).abs() <= tol).all()


def test_native_op_set_picks_it_for_int8_weights():
    from hybrid.ops import select_ops
    from hybrid.ops.linear import NativeLinear

    ops = select_ops(torch.device("cpu"), torch.bfloat16, None)
    if ops.name != "native":
        pytest.skip(f"op set here is {ops.name}")
    w = torch.zeros(8, 16, dtype=torch.int8)
    assert isinstance(ops.linear(w, None, torch.ones(8), name="q"), NativeLinear)
