"""Weight formats found in checkpoints, and the device formats we convert to.

Checkpoint formats:
  FP8 block (DeepSeek-V3): weight [N, K] float8_e4m3fn + weight_scale_inv [ceil(N/bn), ceil(K/bk)]
    fp32; W[n, k] = w[n, k] * scale_inv[n // bn, k // bk].
  compressed-tensors pack-quantized INT4 (Kimi K2 Thinking / K2.5 routed experts):
    weight_packed [N, K/8] int32, element k of a row at bits 4*(k % 8) of word k // 8, stored
    as the unsigned nibble q + 8 (q in [-8, 7]); weight_scale [N, K/G] (bf16); weight_shape [2];
    W[n, k] = q[n, k] * scale[n, k // G].
Device formats (hybrid/ops/linear.py): int8 / fp8 weight-only with a per-row scale; "blocks": a GGUF
tensor kept in its own quantised blocks (repacked for the native kernels, PackedWeight), on a CPU
device only.

Legend: N rows (outputs), K columns (inputs), G group size.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEVICE_FORMATS = ("dense", "int8", "fp8", "blocks")  # what a device linear weight may be stored as


class PackedWeight:
    """A linear weight [N, K] held in a packed kernel layout (csrc/core/kernels.h): qweight uint8
    [bytes] and scales int16 [count] (bf16 / fp16 bits; None for the K types), as
    hybrid.native's pack_gguf makes them from a GGUF tensor's blocks. `format` is the kernel's
    format name ("q4_k", "q8_0", ...)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor | None, format: str, shape: tuple[int, int],
                 name: str = "?"):
        self.qweight, self.scales, self.format, self.shape, self.name = qweight, scales, format, tuple(shape), name

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + (0 if self.scales is None else 2 * self.scales.numel())


def dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      name: str = "?") -> torch.Tensor:
    """w [N, K] fp8, scale_inv [ceil(N/bn), ceil(K/bk)] -> [N, K] fp32."""
    N, K = w.shape
    bn, bk = block
    want = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}.weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} "
                         f"for weight {N}x{K} with block {bn}x{bk}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return w.float() * s


def unpack_int4(packed: torch.Tensor, n: int, k: int, name: str = "?") -> torch.Tensor:
    """packed [N, ceil(K/8)] int32 -> q [N, K] int8 in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"{name}.weight_packed has dtype {packed.dtype}, expected int32")
    if tuple(packed.shape) != (n, -(-k // 8)):
        raise ValueError(f"{name}.weight_packed has shape {tuple(packed.shape)}, expected {(n, -(-k // 8))}")
    b = packed.contiguous().view(torch.uint8).view(n, -1)  # little-endian: byte j = elems 2j, 2j+1
    q = torch.stack([b & 0x0F, b >> 4], dim=-1).view(n, -1)[:, :k]
    return q.to(torch.int8) - 8


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, n: int, k: int, group: int,
                 name: str = "?") -> torch.Tensor:
    """compressed-tensors pack-quantized -> [N, K] fp32."""
    want = (n, -(-k // group))
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}.weight_scale has shape {tuple(scale.shape)}, expected {want}")
    q = unpack_int4(packed, n, k, name)
    return q.float() * scale.float().repeat_interleave(group, 1)[:, :k]


def quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q [N, K] int8 or float8_e4m3fn, scale [N] fp32), symmetric per row."""
    wf = w.float()
    amax = wf.abs().amax(dim=1).clamp(min=1e-12)  # [N]
    if fmt == "int8":
        scale = amax / 127.0
        q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    elif fmt == "fp8":
        scale = amax / FP8_MAX
        q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"unknown device weight format {fmt!r} (int8|fp8)")
    return q, scale
