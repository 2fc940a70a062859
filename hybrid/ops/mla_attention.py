"""MLA attention against the latent KV cache, after the projections: the op a DeepSeek-V3 layer
hands its q and compressed kv to.

Two forms, chosen once at load by the op set:
  MLAAttention        torch (what a CUDA device runs): latent norm, RoPE, cache write, then the
                      expanded or the absorbed form over the padded slot groups;
  NativeMLAAttention  a bf16 CPU device: a decode batch (one token per slot) runs in one native
                      call (csrc/models/mla_decode.h: ~45 torch ops per layer become one); anything
                      else takes the torch form.

Legend: T tokens, U distinct slots, Q queries per slot (padded), L keys per slot,
nh heads, D qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid.ops.attention import sdpa_chunked
from hybrid.ops.rope import apply_rope

MODES = ("auto", "absorbed", "expanded")


@dataclass(frozen=True)
class MLAShape:
    heads: int        # nh
    nope: int         # D
    rope: int         # R
    value: int        # V
    latent: int       # C
    scale: float      # softmax scale
    eps: float        # latent RMSNorm eps
    interleave: bool  # RoPE layout of the checkpoint


class MLAAttention:
    """kv_norm [C]; kv_b: the kv_b_proj Linear (dense, [nh*(D+V), C]); norm: the op set's rms_norm."""

    def __init__(self, layer: int, shape: MLAShape, kv_norm: torch.Tensor, kv_b, norm):
        self.layer, self.s = layer, shape
        self.kv_norm, self.kv_b, self.norm = kv_norm, kv_b, norm
        w = kv_b.weight.view(shape.heads, shape.nope + shape.value, shape.latent)
        self.w_uk = w[:, : shape.nope, :]  # [nh, D, C]: q_nope -> latent space
        self.w_uv = w[:, shape.nope :, :]  # [nh, V, C]: latent -> value space
        self.mode = "auto"  # "auto" | "absorbed" | "expanded" (tests force each)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"attention mode must be {'|'.join(MODES)}, got {mode!r}")
        self.mode = mode

    def __call__(self, q, kv, cos, sin, batch, cache) -> torch.Tensor:
        """q [T, nh*(D+R)], kv [T, C+R] -> [T, nh*V]; writes the tokens' cache rows first."""
        s, T = self.s, q.shape[0]
        q = q.view(T, s.heads, s.nope + s.rope)
        q_nope, q_rope = q[..., : s.nope], q[..., s.nope :]  # [T, nh, D], [T, nh, R]
        latent = self.norm(kv[:, : s.latent], self.kv_norm, s.eps)  # [T, C]
        k_rope = apply_rope(kv[:, None, s.latent :], cos, sin, s.interleave)[:, 0]  # [T, R]
        q_rope = apply_rope(q_rope, cos, sin, s.interleave)  # [T, nh, R]
        batch.write_kv(cache, self.layer, latent, k_rope)

        g = batch.groups
        rows = batch.read_kv(cache, self.layer).to(q.dtype)  # [U, L, C+R]
        mode = self.mode
        if mode == "auto":
            # Expanding costs one kv_b matmul per key (nh*(D+V)*C); absorbing costs two per
            # query plus ~3.4x the per-(query, key) work. Expand when queries are a large share
            # of the keys (prefill), absorb otherwise (decode against a long context).
            mode = "expanded" if 4 * g.Q >= g.L else "absorbed"
        out = self._expanded(q_nope, q_rope, rows, g) if mode == "expanded" else self._absorbed(q_nope, q_rope, rows, g)
        return out.reshape(T, s.heads * s.value)

    def _expanded(self, q_nope, q_rope, rows, g):
        s = self.s
        U, L = rows.shape[:2]
        lat, kr = rows[..., : s.latent], rows[..., s.latent :]  # [U, L, C], [U, L, R]
        kv = self.kv_b(lat).view(U, L, s.heads, s.nope + s.value)  # [U, L, nh, D+V]
        k = torch.cat([kv[..., : s.nope], kr[:, :, None, :].expand(U, L, s.heads, s.rope)], -1)
        v = kv[..., s.nope :]  # [U, L, nh, V]
        q = g.pad(torch.cat([q_nope, q_rope], -1))  # [U, Q, nh, D+R]
        o = sdpa_chunked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.mask, s.scale)  # [U, nh, Q, V]
        return g.unpad(o.transpose(1, 2))  # [T, nh, V]

    def _absorbed(self, q_nope, q_rope, rows, g):
        # Scores q.k = (q_nope W_uk) . latent + q_rope . k_rope, and output
        # W_uv (softmax . latent): attention runs in the C-wide latent space, one shared "head"
        # of keys for all nh query heads, so the cache is read once; a cache row [latent, rope]
        # is the key as it stands.
        s = self.s
        U, L = rows.shape[:2]
        q_lat = torch.einsum("tnd,ndc->tnc", q_nope, self.w_uk.to(q_nope.dtype))  # [T, nh, C]
        q = g.pad(torch.cat([q_lat, q_rope], -1)).transpose(1, 2)  # [U, nh, Q, C+R]
        k = rows[:, None].expand(U, s.heads, L, s.latent + s.rope)
        v = rows[:, None, :, : s.latent].expand(U, s.heads, L, s.latent)
        o = sdpa_chunked(q, k, v, g.mask, s.scale)  # [U, nh, Q, C]
        o = g.unpad(o.transpose(1, 2))  # [T, nh, C]
        return torch.einsum("tnc,nvc->tnv", o, self.w_uv.to(o.dtype))  # [T, nh, V]


class NativeMLAAttention(MLAAttention):
    """Decode batches of bf16 tokens against a bf16 cache in one native call; the rest as torch."""

    def __init__(self, lib, layer: int, shape: MLAShape, kv_norm: torch.Tensor, kv_b, norm):
        super().__init__(layer, shape, kv_norm, kv_b, norm)
        self._lib = lib

    def __call__(self, q, kv, cos, sin, batch, cache) -> torch.Tensor:
        if self.mode != "auto" or cache.dtype != torch.bfloat16 or q.dtype != torch.bfloat16 or not batch.decode:
            return super().__call__(q, kv, cos, sin, batch, cache)
        s = self.s
        out = torch.empty(q.shape[0], s.heads * s.value, dtype=q.dtype)  # [T, nh*V]
        # The kernel reads one contiguous grid per layer: a slot cache's own, or the decode
        # tokens' blocks gathered from a paged cache (written back by commit).
        grid, slots, commit = cache.decode_view(self.layer, batch.slots, batch.positions)
        self._lib.mla_decode(q, kv, self.kv_norm, cos, sin, grid, slots, batch.positions,
                             self.kv_b.weight, out, s.heads, s.nope, s.value, s.eps, s.scale, s.interleave)
        commit()
        return out
