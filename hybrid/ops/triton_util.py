"""What the Triton kernels share (hybrid/ops/quant_linear_triton.py, hybrid/experts/
grouped_experts_triton.py): the tensor-core product, and how they run under the interpreter.

The interpreter (TRITON_INTERPRET=1, how tests run the kernels on CPU tensors) multiplies bf16
operands wrongly in tl.dot and converts int32 to bf16 wrongly (triton 3.9: results off by ~1e10,
NaNs), so there a kernel runs the same products on fp32 operands (F32=True): a bf16 value, an
int8/int4 one and an fp8 one are exact in fp32 and so is their product, so only the summation
order differs from the tensor cores' fp32 accumulation. Integers reach the operand dtype through
fp32 (exact) for the same reason. The interpreter also rounds fp32 to bf16 by truncation, not to
nearest.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def mm(a, b_t, F32: tl.constexpr):
    """a [M, K] @ b_t [N, K]^T -> [M, N] fp32; F32: fp32 operands, exact products (ieee)."""
    if F32:
        return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b_t))
