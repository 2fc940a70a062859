"""Weight-only int8 / fp8 linear (Triton, under TRITON_INTERPRET=1 on CPU tensors) and the torch
reference Linear, against float64 on the stored weights.

Tolerances: the kernel multiplies the exact weights (|q| <= 127 and e4m3 values are exact in
bf16 and fp32) and scales once per output; with fp32 activations the only error is fp32
summation: |y - ref| <= 1e-5 * sum_k |x_k| |w_nk|. With bf16 activations x is bf16 in both and y
is rounded to bf16 once at the end: + 2^-7 |ref| (one bf16 ulp: rounding to nearest on a GPU
moves it at most half that; the interpreter truncates); the torch reference's bf16 GEMM also
rounds x @ q^T before the scale: + 2^-7 |x @ w^T| (bias not included).
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU
triton = pytest.importorskip("triton")

from hybrid.ops.linear import Linear, QuantLinear  # noqa: E402
from hybrid.ops.op_sets import TorchOps  # noqa: E402
from hybrid.ops.quant_linear_triton import quant_linear_triton  # noqa: E402

FORMATS = [torch.int8, torch.float8_e4m3fn]


def _weight(N, K, wdtype, seed):
    g = torch.Generator().manual_seed(seed)
    if wdtype == torch.int8:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    else:
        q = (torch.randn(N, K, generator=g) * 8).to(wdtype)
    scale = (torch.rand(N, generator=g) + 0.5) / (K**0.5 * 64)
    bias = torch.randn(N, generator=g)
    return q, scale, bias


def _check(y, x, q, scale, bias):
    w = q.double() * scale.double()[:, None]                                   # [N, K]
    xw = x.double() @ w.T
    ref = xw + (0 if bias is None else bias.double())
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-7 * (ref.abs() + xw.abs())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3e} (scale {ref.abs().max().item():.3e})"


@pytest.mark.parametrize("wdtype", FORMATS, ids=["int8", "fp8"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T,N,K,with_bias", [(1, 50, 100, False), (5, 64, 96, True),
                                             (37, 70, 130, True)])  # decode, odd, prefill blocks
def test_kernel_and_reference_match_float64(wdtype, act, T, N, K, with_bias):
    q, scale, bias = _weight(N, K, wdtype, seed=T + N)
    bias = bias.to(act) if with_bias else None
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(K)).to(act)
    y = quant_linear_triton(x, q, scale, bias)
    assert y.dtype == act and y.shape == (T, N)
    _check(y, x, q, scale, bias)
    _check(Linear(q, bias, scale)(x), x, q, scale, bias)          # the torch reference
    _check(QuantLinear(q, bias, scale)(x), x, q, scale, bias)     # the layer around the kernel


def test_batched_input_and_op_choice():
    q, scale, _ = _weight(48, 64, torch.int8, seed=1)
    x = torch.randn(2, 3, 64).bfloat16()
    y = quant_linear_triton(x, q, scale)
    assert y.shape == (2, 3, 48)
    _check(y.reshape(6, 48), x.reshape(6, 64), q, scale, None)
    # On the CPU the op set keeps the torch reference; QuantLinear is for CUDA weights only.
    ops = TorchOps(torch.device("cpu"), torch.bfloat16)
    assert type(ops.linear(q, None, scale)) is Linear
    assert not QuantLinear.fits(q, scale)
    with pytest.raises(ValueError, match="int8 or fp8"):
        QuantLinear(torch.zeros(4, 4), None, None, name="w")
