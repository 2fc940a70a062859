"""Device linear layers: a weight stored dense or weight-only quantised, and how it is applied.

Formats (chosen per tensor group at load, see hybrid/runtime/context.py):
  dense  weight [N, K] in the compute dtype (bf16 or fp32)
  int8   weight [N, K] int8 + per-output-channel scale [N] fp32: W = q * scale[n]
  fp8    weight [N, K] float8_e4m3fn + per-output-channel scale [N] fp32 (GPUs with FP8)
  blocks a GGUF tensor in its own quantised blocks (hybrid.loaders.quant.PackedWeight), CPU
         device: the bytes per weight llama.cpp reads, where bf16 would read 2-3.5x more
The int8/fp8 forms exist so the ~11.7 B non-expert parameters of K2.5 fit a 24 GB GPU.

Four forms, chosen once per weight by the op set (hybrid/ops/op_sets.py): `Linear` (torch; for
quantised weights the reference, which widens DEQUANT_ROWS rows at a time), `QuantLinear` (an
int8/fp8 weight on a CUDA device: the Triton kernel reads the quantised bytes directly, no
dequantised copy per call; quant_linear_triton.py), `NativeLinear` (a bf16 or int8 CPU
weight: the native GEMV for a few tokens, reading int8 bytes directly) and `PackedLinear` (a
weight in blocks: the expert engine's kernels, activations rounded to int8 per 32 inputs as
llama.cpp rounds them to Q8). The torch op set has no kernel for blocks: it dequantises them
once to a dense Linear (blocks_as_dense).
Legend: T tokens, N outputs, K inputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.loaders.quant import PackedWeight

DEQUANT_ROWS = 4096  # rows of a quantised weight converted per matmul (bounds the temporary)
# Up to this many tokens a dense bf16 weight on the CPU goes through the native GEMV
# (csrc/core/dense.h): torch's CPU bf16 F.linear costs ~30 us per call on small shapes and reorders
# the weight each call (12 GB/s on a 7168x1536 matrix), which made it most of a decode step.
# Beyond a few tokens torch's blocked GEMM (AMX / AVX-512 BF16) is the faster one.
NATIVE_MAX_TOKENS = 4
# ... and up to this many for a weight of at most NATIVE_SMALL_BYTES, which stays in L2 while the
# kernel passes over it once per 4 tokens: a batch of decode tokens from many sequences on a small
# model, where torch's fixed cost per call is most of the time.
NATIVE_SMALL_MAX_TOKENS = 64
NATIVE_SMALL_BYTES = 1 << 20
# An int8 weight goes through the native int8 GEMV up to this many tokens: the alternative, Linear's
# reference, converts the weight to bf16 on every call. Measured on an 18432 x 7168 weight, 2
# threads, 2-vCPU Zen 4 guest: native 14 / 28 / 94 / 399 ms at 8 / 16 / 64 / 256 tokens, the
# reference 84 / 87 / 128 / 268 ms.
NATIVE_INT8_MAX_TOKENS = 64


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, name: str = "?"):
        self.weight = weight  # [N, K]
        self.bias = bias  # [N] or None
        self.scale = scale  # [N] fp32 for int8/fp8, None for dense
        self.name = name
        if weight.dtype in (torch.int8, torch.float8_e4m3fn):
            if scale is None or scale.shape != (weight.shape[0],):
                raise ValueError(f"{name}: quantised weight needs a per-row scale [{weight.shape[0]}]")
            self.format = "int8" if weight.dtype == torch.int8 else "fp8"
        else:
            self.format = "dense"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        for t in (self.bias, self.scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [N, K] tensor of `dtype` (dequantised if needed)."""
        if self.format == "dense":
            return self.weight.to(dtype)
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, N]
        if self.format == "dense":
            return F.linear(x, self.weight, self.bias)
        # Weight-only: x @ (q * s)^T == (x @ q^T) * s, so scale after the matmul (one [T, N]
        # multiply instead of an [N, K] one). The weight is converted DEQUANT_ROWS rows at a
        # time so the temporary stays small (the K2.5 LM head whole would be 2.3 GB in bf16).
        N = self.weight.shape[0]
        if N <= DEQUANT_ROWS:
            y = F.linear(x, self.weight.to(x.dtype))
        else:
            y = torch.cat([F.linear(x, self.weight[i : i + DEQUANT_ROWS].to(x.dtype))
                           for i in range(0, N, DEQUANT_ROWS)], dim=-1)
        # Scale (and bias) in fp32, one rounding to x's dtype after them.
        y = y.float() * self.scale
        return (y if self.bias is None else y + self.bias).to(x.dtype)


class QuantLinear(Linear):
    """An int8/fp8 weight on a CUDA device, through the Triton weight-only kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, name: str = "?"):
        super().__init__(weight, bias, scale, name)
        if self.format == "dense":
            raise ValueError(f"{name}: QuantLinear needs an int8 or fp8 weight, got {weight.dtype}")
        from hybrid.ops.quant_linear_triton import quant_linear_triton  # noqa: PLC0415

        self._run = quant_linear_triton
        self._scale = scale.float().contiguous()
        self._weight = weight if weight.stride(1) == 1 else weight.contiguous()

    @staticmethod
    def fits(weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        """A quantised CUDA weight, and triton importable."""
        if scale is None or weight.dtype not in (torch.int8, torch.float8_e4m3fn) \
                or weight.device.type != "cuda" or weight.dim() != 2:
            return False
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, N]
        return self._run(x, self._weight, self._scale, self.bias)


class NativeLinear(Linear):
    """A CPU weight with unit inner stride, dense bf16 or int8 with its fp32 row scale: a few bf16
    tokens go through the native GEMV (hybrid.native gemv_bf16 / gemv_i8, csrc/core/dense.h; int8
    bytes are read as they are, 1 per weight, with no dequantised copy), more through torch's GEMM
    (for int8, Linear's reference, whose per-call conversion is then spread over the tokens)."""

    def __init__(self, lib, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, name: str = "?"):
        super().__init__(weight, bias, scale, name)
        self._lib = lib
        small = weight.numel() * weight.element_size() <= NATIVE_SMALL_BYTES
        self._max_tokens = NATIVE_SMALL_MAX_TOKENS if small else NATIVE_MAX_TOKENS
        if self.format == "int8":
            self._max_tokens = max(self._max_tokens, NATIVE_INT8_MAX_TOKENS)

    @staticmethod
    def fits(weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        on_cpu = weight.device.type == "cpu" and weight.dim() == 2 and weight.stride(1) == 1
        if scale is None:
            return on_cpu and weight.dtype == torch.bfloat16
        return (on_cpu and weight.dtype == torch.int8 and scale.dtype == torch.float32
                and scale.shape == (weight.shape[0],) and scale.is_contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] -> [T, N]
        if x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] <= self._max_tokens and x.stride(1) == 1:
            if self.format == "dense":
                y = self._lib.dense_gemv_torch(self.weight, x, None, "", True)  # [T, N] bf16
            else:   # the scale applied in fp32, then one rounding to bf16
                y = self._lib.dense_gemv_i8_torch(self.weight, self.scale, x, None, "", True)
            return y if self.bias is None else y + self.bias
        if self.format == "dense":
            return F.linear(x, self.weight, self.bias)
        return Linear.__call__(self, x)


def blocks_as_dense(lib, w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A PackedWeight's values as a dense [N, K] tensor of `dtype` (the blocks' exact values,
    rounded once to dtype)."""
    n, k = w.shape
    s = w.scales.numpy().view(np.uint16) if w.scales is not None else None
    return torch.from_numpy(lib.unpack(w.format, w.qweight.numpy(), s, n, k)).to(dtype)


class PackedLinear(Linear):
    """A weight kept in its GGUF blocks on a CPU device (device_weights="blocks"): every call goes
    through the native packed linear (hybrid.native.packed_linear: x bf16 rounded to int8 per 32
    inputs, then the format's matmul_a8, decode GEMV or prefill GEMM by token count)."""

    def __init__(self, lib, packed: PackedWeight, bias: torch.Tensor | None = None, name: str = "?"):
        self._lib, self.packed, self.bias, self.name = lib, packed, bias, name
        self.weight, self.scale = packed.qweight, None
        self.format = "blocks"

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return blocks_as_dense(self._lib, self.packed, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [T, K] bf16 -> [T, N] bf16
        p = self.packed
        if x.dtype != torch.bfloat16 or x.dim() != 2:
            raise TypeError(f"{self.name}: a weight in blocks takes bf16 activations [T, K], got {x.dtype} "
                            f"{list(x.shape)}")
        if x.shape[0] == 0:  # no tokens: nothing to read (the kernel takes at least one row)
            return x.new_empty((0, p.shape[0]))
        y = self._lib.packed_linear_torch(p.qweight, p.scales, p.format, p.shape[0], p.shape[1],
                                          x if x.stride(1) == 1 else x.contiguous(), None, "", True)
        return y if self.bias is None else y + self.bias
