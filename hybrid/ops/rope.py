"""Rotary position embeddings: inverse frequencies (default and YaRN) and their application.

Legend: T tokens, n heads, R rotated width.
"""

from __future__ import annotations

import math

import torch

from hybrid.config import RopeConfig, yarn_mscale


def rope_inv_freq(r: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale ("attention factor") for `r`."""
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if r.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, blend linearly between
    # the dimensions whose wavelength fits beta_fast / beta_slow rotations in the original
    # context; scale cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    factor, omax = r.factor, r.original_max_position_embeddings
    if r.attention_factor is not None:
        attn_factor = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        attn_factor = yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor)
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(rotations):
        return dim * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, attn_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, R/2] fp32, already times the attention factor."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, n, R]; cos/sin [T, R/2] (already times the attention factor)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if interleave:  # pairs (x0, x1), (x2, x3)...; output de-interleaved (same for q and k)
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:  # halves (x0..x_{R/2-1}), (x_{R/2}..)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
