"""Weight-only int8 / fp8 linear layers in Triton: y = (x @ q^T) * scale (+ bias), reading the
quantised bytes directly.

    y = quant_linear_triton(x, q, scale, bias)   # x [T, K] bf16/fp32, q [N, K] int8 or
                                                 # float8_e4m3fn, scale [N] fp32 -> y [T, N] x.dtype

One program per [BT, BN] block of y: it streams its BN rows of q in [BN, BK] blocks, widens
them in registers to the activation dtype (exact: |q| <= 127 and e4m3 values are bf16 values),
multiplies on the tensor cores with fp32 accumulation, and scales once per output at the end
(x @ (q * s)^T = (x @ q^T) * s). Each weight byte is read once per BT tokens and no dequantised
copy of the weight exists: decode reads 1 byte per parameter (was 1 read + 2 written + 2 read
through the bf16 copy Linear made per call). Block sizes are fixed by the shape (decode: 16
tokens x 32 rows, so a 1536-row projection still spreads over 48 programs; blocks_for), not
autotuned: no GPU has measured them yet.
Under the interpreter (tests) the products run on fp32 operands: hybrid/ops/triton_util.py.

Legend: T tokens, N outputs, K inputs, BT/BN/BK block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.ops.triton_util import interpreting, mm


@triton.jit
def _quant_linear_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, T, N, K, stride_x, stride_q, stride_y,
                         HAS_BIAS: tl.constexpr, OP: tl.constexpr, F32: tl.constexpr,
                         BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)                                 # [BN]
    t = tl.program_id(1) * BT + tl.arange(0, BT)                                 # [BT]
    k = tl.arange(0, BK)
    tmask, nmask = t < T, n < N
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + k
        kmask = kk < K
        xb = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_x + kk[None, :],
                     mask=tmask[:, None] & kmask[None, :], other=0.0)            # [BT, BK]
        # Clamped, not masked: every load is in bounds and finite (x is 0 past K; rows past N
        # are not stored), and fp8 needs no fill value (the interpreter has no fp8 zero).
        qb = tl.load(q_ptr + tl.minimum(n, N - 1)[:, None].to(tl.int64) * stride_q
                     + tl.minimum(kk, K - 1)[None, :])                           # [BN, BK]
        acc += mm(xb, qb.to(tl.float32).to(OP), F32)
    y = acc * tl.load(s_ptr + n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + t[:, None].to(tl.int64) * stride_y + n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & nmask[None, :])


def blocks_for(tokens: int) -> tuple[int, int, int, int]:
    """(BT, BN, BK, warps) for a batch of `tokens`: decode-sized batches get narrow row blocks
    (more programs over a memory-bound GEMV), prefill-sized ones square-ish tiles. From ptxas -v
    for sm_90 (tests/test_triton_compile.py): 128 registers each, no spills (64 x 64 x 64 on 4
    warps took 255 and spilled)."""
    return (16, 32, 128, 4) if tokens <= 16 else (64, 64, 64, 8)


def quant_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype (bf16 or fp32)."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantised linear: x must be bf16 or fp32, got {x.dtype}")
    N, K = q.shape
    if x.shape[-1] != K:
        raise ValueError(f"quantised linear: x has {x.shape[-1]} inputs, the weight {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return y.reshape(*x.shape[:-1], N)
    BT, BN, BK, warps = blocks_for(T)
    f32 = x.dtype == torch.float32 or interpreting()
    op = tl.float32 if f32 else tl.bfloat16
    _quant_linear_kernel[(triton.cdiv(N, BN), triton.cdiv(T, BT))](
        x2, q, scale, bias if bias is not None else scale, y, T, N, K,
        x2.stride(0), q.stride(0), y.stride(0), HAS_BIAS=bias is not None, OP=op, F32=f32,
        BT=BT, BN=BN, BK=BK, num_warps=warps)
    return y.reshape(*x.shape[:-1], N)
