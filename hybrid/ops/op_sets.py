"""The two op sets a model is built with, chosen once at load (hybrid.ops.select_ops).

TorchOps: plain torch, the exact path a CUDA device runs (there int8/fp8 linears go through the
Triton kernel, QuantLinear; elsewhere through the torch reference), and the CPU's under
HYBRID_DEVICE_OPS=torch, which is how tests cover it here. NativeCpuOps: a bf16 CPU device
with the extension built; each op takes its native form where the shape suits it (a few tokens,
a decode batch) and the torch form otherwise, so the model's math never branches on the device.

Legend: T tokens, H hidden.
"""

from __future__ import annotations

import torch

from hybrid.loaders.quant import PackedWeight
from hybrid.ops.linear import Linear, NativeLinear, PackedLinear, QuantLinear, blocks_as_dense
from hybrid.ops.mla_attention import MLAAttention, MLAShape, NativeMLAAttention
from hybrid.ops.paged_kv import TorchPagedKV

NATIVE_NORM_ELEMENTS = 1 << 16  # up to this many bf16 values, norms run natively


class TorchOps:
    name = "torch"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def native_lib(self):
        """The extension for native bodies (routers), or None: this op set runs torch only."""
        return None

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in fp32, round back, then scale: transformers' order, so bf16 results agree.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + a, rms_norm(h + a)): the residual add and the next norm."""
        h = h + a
        return h, self.rms_norm(h, weight, eps)

    def linear(self, weight: torch.Tensor, bias=None, scale=None, name: str = "?") -> Linear:
        if isinstance(weight, PackedWeight):  # no torch kernel for blocks: their values, dense
            from hybrid import native  # noqa: PLC0415

            return Linear(blocks_as_dense(native.lib(), weight, self.dtype).to(self.device), bias, name=name)
        if QuantLinear.fits(weight, scale):
            return QuantLinear(weight, bias, scale, name=name)
        return Linear(weight, bias, scale, name=name)

    def mla_attention(self, layer: int, shape: MLAShape, kv_norm, kv_b) -> MLAAttention:
        return MLAAttention(layer, shape, kv_norm, kv_b, self.rms_norm)

    def paged_kv(self) -> TorchPagedKV:
        """How a paged KV cache's rows are gathered and scattered (hybrid/ops/paged_kv.py)."""
        return TorchPagedKV()


class NativeCpuOps(TorchOps):
    name = "native"

    def __init__(self, device: torch.device, dtype: torch.dtype, lib):
        super().__init__(device, dtype)
        self._lib = lib

    def native_lib(self):
        return self._lib

    def _norm_fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2
                and x.numel() <= NATIVE_NORM_ELEMENTS and x.is_contiguous())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # A few bf16 tokens: one native call (csrc/core/norm.h, same rounding) instead of 7 torch
        # ops of dispatch each; prefill-sized inputs stay with torch's threaded kernels.
        if self._norm_fits(x, weight):
            return self._lib.rms_norm(x, weight, eps, torch.empty_like(x))
        return TorchOps.rms_norm(x, weight, eps)

    def add_rms_norm(self, h, a, weight, eps):
        if self._norm_fits(h, weight) and a.is_contiguous() and a.dtype == h.dtype:
            # h += a (in place: h is this step's own tensor) and its norm, in one native call.
            return h, self._lib.rms_norm(h, weight, eps, torch.empty_like(h), a)
        return super().add_rms_norm(h, a, weight, eps)

    def linear(self, weight, bias=None, scale=None, name: str = "?") -> Linear:
        if isinstance(weight, PackedWeight):
            return PackedLinear(self._lib, weight, bias, name=name)
        if NativeLinear.fits(weight, scale):
            return NativeLinear(self._lib, weight, bias, scale, name=name)
        return Linear(weight, bias, scale, name=name)

    def mla_attention(self, layer, shape, kv_norm, kv_b) -> MLAAttention:
        return NativeMLAAttention(self._lib, layer, shape, kv_norm, kv_b, self.rms_norm)
