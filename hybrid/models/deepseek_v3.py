"""DeepSeek-V3 architecture (DeepSeek-V3/R1, Kimi K2, Kimi K2.5 text model).

Read top to bottom: helpers (RMSNorm, RoPE incl. YaRN), MLA attention against the latent KV
cache, the dense MLP, the decoder layer, the model. Routed experts live in hybrid/experts/
(moe_layer.py dispatches them); weights come from a loader "source" (hybrid/loaders/) so this
file only names tensors and does math. Numerics follow transformers' DeepseekV3 exactly.

Forward contract (the engine codes against it): a flat ragged batch of T tokens from several
sequences; each token carries its sequence's cache slot and its position. Each layer first
writes every token's latent + rope key into cache[layer][slot, position], then each token
attends to the positions <= its own of its own slot. Chunked prefill and mixed prefill/decode
batches therefore need nothing special.

Legend: T tokens, U distinct slots in the batch, Q queries per slot (padded), L keys per slot,
H hidden, nh heads, D qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank,
E experts, K picked, I expert width, Vocab vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybrid import native
from hybrid.config import ModelConfig, yarn_mscale
from hybrid.models.kv_cache import LatentKVCache
from hybrid.models.linear import Linear


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
NATIVE_NORM_ELEMENTS = 1 << 16  # up to this many bf16 values on a CPU, norms run natively (below)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32, round back, then scale: transformers' order, so bf16 results agree.
    # A few bf16 tokens on the CPU: one native call (csrc/router.h, same rounding) instead of 7
    # torch ops of dispatch each; prefill-sized inputs stay with torch's threaded kernels.
    if _native_norm_ok(x, weight):
        return native.lib_or_none().rms_norm(x, weight, eps, torch.empty_like(x))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin scale ("attention factor") for this config."""
    r, dim = config.rope, config.qk_rope_head_dim
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, n, R]; cos/sin [T, R/2] (already times the attention factor)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if interleave:  # pairs (x0, x1), (x2, x3)...; output de-interleaved (same for q and k)
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:  # halves (x0..x_{R/2-1}), (x_{R/2}..)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------
# MLA attention
# ---------------------------------------------------------------------------------------------
class Attention:
    def __init__(self, config: ModelConfig, layer: int, src, prefix: str):
        c = config
        self.config, self.layer = c, layer
        self.nh, self.D, self.R, self.V, self.C = (
            c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank)
        bias, H, nh, qk = c.attention_bias, c.hidden_size, self.nh, self.D + self.R
        if c.q_lora_rank is None:
            self.q_proj = src.linear(f"{prefix}.q_proj", (nh * qk, H))
        else:
            ql = c.q_lora_rank
            self.q_a_proj = src.linear(f"{prefix}.q_a_proj", (ql, H), bias=bias)
            self.q_a_norm = src.norm(f"{prefix}.q_a_layernorm.weight", ql)
            self.q_b_proj = src.linear(f"{prefix}.q_b_proj", (nh * qk, ql))
        self.kv_a_proj = src.linear(f"{prefix}.kv_a_proj_with_mqa", (self.C + self.R, H), bias=bias)
        self.kv_a_norm = src.norm(f"{prefix}.kv_a_layernorm.weight", self.C)
        # kv_b stays dense: the absorbed form needs it split per head.
        kv_b = src.linear(f"{prefix}.kv_b_proj", (nh * (self.D + self.V), self.C), dense=True)
        self.kv_b_proj = kv_b
        w = kv_b.weight.view(self.nh, self.D + self.V, self.C)
        self.w_uk = w[:, : self.D, :]  # [nh, D, C]: q_nope -> latent space
        self.w_uv = w[:, self.D :, :]  # [nh, V, C]: latent -> value space
        self.o_proj = src.linear(f"{prefix}.o_proj", (H, nh * self.V), bias=bias)
        self.scale = c.softmax_scale
        self.eps = c.rms_norm_eps
        self.mode = "auto"  # "auto" | "absorbed" | "expanded" (tests force each)

    def __call__(self, x, cos, sin, slots, positions, groups, cache: LatentKVCache):
        T = x.shape[0]
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(rms_norm(self.q_a_proj(x), self.q_a_norm, self.eps))
        if groups is None:  # decode tokens, one per slot, bf16 on a CPU device: one native call
            return self.o_proj(self._native_decode(q, self.kv_a_proj(x), cos, sin, slots, positions, cache))
        q = q.view(T, self.nh, self.D + self.R)
        q_nope, q_rope = q[..., : self.D], q[..., self.D :]  # [T, nh, D], [T, nh, R]
        kv = self.kv_a_proj(x)  # [T, C+R]
        latent = rms_norm(kv[:, : self.C], self.kv_a_norm, self.eps)  # [T, C]
        interleave = self.config.rope_interleave
        k_rope = apply_rope(kv[:, None, self.C :], cos, sin, interleave)[:, 0]  # [T, R]
        q_rope = apply_rope(q_rope, cos, sin, interleave)  # [T, nh, R]
        cache.write(self.layer, slots, positions, latent, k_rope)

        rows = cache.rows(self.layer, groups.slots, groups.L, groups.one_slot).to(x.dtype)  # [U, L, C+R]
        mode = self.mode
        if mode == "auto":
            # Expanding costs one kv_b matmul per key (nh*(D+V)*C); absorbing costs two per
            # query plus ~3.4x the per-(query, key) work. Expand when queries are a large share
            # of the keys (prefill), absorb otherwise (decode against a long context).
            mode = "expanded" if 4 * groups.Q >= groups.L else "absorbed"
        if mode == "expanded":
            out = self._expanded(q_nope, q_rope, rows, groups)
        else:
            out = self._absorbed(q_nope, q_rope, rows, groups)
        return self.o_proj(out.reshape(T, self.nh * self.V))

    def _native_decode(self, q, kv, cos, sin, slots, positions, cache):
        # q [T, nh*(D+R)], kv [T, C+R] -> [T, nh*V]; writes the tokens' cache rows (csrc/mla_decode.h).
        out = torch.empty(q.shape[0], self.nh * self.V, dtype=q.dtype)
        native.lib_or_none().mla_decode(q, kv, self.kv_a_norm, cos, sin, cache.kv[self.layer], slots, positions,
                                self.kv_b_proj.weight, out, self.nh, self.D, self.V, self.eps, self.scale,
                                self.config.rope_interleave)
        return out

    def _expanded(self, q_nope, q_rope, rows, g):
        U, L = rows.shape[:2]
        lat, kr = rows[..., : self.C], rows[..., self.C :]  # [U, L, C], [U, L, R]
        kv = self.kv_b_proj(lat).view(U, L, self.nh, self.D + self.V)  # [U, L, nh, D+V]
        k = torch.cat([kv[..., : self.D], kr[:, :, None, :].expand(U, L, self.nh, self.R)], -1)
        v = kv[..., self.D :]  # [U, L, nh, V]
        q = g.pad(torch.cat([q_nope, q_rope], -1))  # [U, Q, nh, D+R]
        o = sdpa_chunked(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.mask, self.scale)  # [U, nh, Q, V]
        return g.unpad(o.transpose(1, 2))  # [T, nh, V]

    def _absorbed(self, q_nope, q_rope, rows, g):
        # Scores q.k = (q_nope W_uk) . latent + q_rope . k_rope, and output
        # W_uv (softmax . latent): attention runs in the C-wide latent space, one shared "head"
        # of keys for all nh query heads, so the cache is read once; a cache row [latent, rope]
        # is the key as it stands.
        U, L = rows.shape[:2]
        q_lat = torch.einsum("tnd,ndc->tnc", q_nope, self.w_uk.to(q_nope.dtype))  # [T, nh, C]
        q = g.pad(torch.cat([q_lat, q_rope], -1)).transpose(1, 2)  # [U, nh, Q, C+R]
        k = rows[:, None].expand(U, self.nh, L, self.C + self.R)
        v = rows[:, None, :, : self.C].expand(U, self.nh, L, self.C)
        o = sdpa_chunked(q, k, v, g.mask, self.scale)  # [U, nh, Q, C]
        o = g.unpad(o.transpose(1, 2))  # [T, nh, C]
        return torch.einsum("tnc,nvc->tnv", o, self.w_uv.to(o.dtype))  # [T, nh, V]


SCORES_BUDGET = 256 * 1024**2  # bytes of fp32 attention scores one SDPA call may materialise


def sdpa_chunked(q, k, v, mask, scale):
    """q [U, nh, Q, d], k [U, nh, L, d], v [U, nh, L, dv], mask [U, 1, Q, L] -> [U, nh, Q, dv].
    Where no fused kernel fits (MLA's head dims differ for q/k and v, and the absorbed form's
    are 576 wide), SDPA falls back to materialising [U, nh, Q, L] scores: 17 GB for 8K x 8K at
    64 heads. Splitting the queries bounds that at SCORES_BUDGET; results are identical."""
    U, nh, Q, _ = q.shape
    L = k.shape[2]
    step = max(1, SCORES_BUDGET // max(1, U * nh * L * 4))
    if step >= Q:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    outs = [F.scaled_dot_product_attention(q[:, :, i : i + step], k, v, attn_mask=mask[:, :, i : i + step],
                                           scale=scale) for i in range(0, Q, step)]
    return torch.cat(outs, dim=2)


def _native_ok() -> bool:
    return native.lib_or_none() is not None


def _native_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.dim() == 2 and x.numel() <= NATIVE_NORM_ELEMENTS and x.is_contiguous()
            and native.lib_or_none() is not None)


class SlotGroups:
    """Which tokens share a cache slot, and the padded [U, Q] layout attention runs in.

    Token t goes to row (u_t, r_t): u_t its slot's index among the U distinct slots, r_t its
    rank among that slot's tokens. mask[u, 0, r, j] allows key j <= position of (u, r).
    """

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor):
        uniq, inv, counts = torch.unique(slots, return_inverse=True, return_counts=True)
        T, U = slots.shape[0], uniq.shape[0]
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(T, device=slots.device) - starts[inv[order]]
        self.slots, self.inv, self.rank = uniq, inv, rank
        self.one_slot = int(uniq[0]) if U == 1 else None  # lets attention read a cache view
        self.Q = int(counts.max())
        self.L = int(positions.max()) + 1
        pos = torch.zeros(U, self.Q, dtype=positions.dtype, device=positions.device)
        pos[inv, rank] = positions
        keys = torch.arange(self.L, device=positions.device)
        self.mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [U, 1, Q, L]

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [U, Q, ...]
        out = x.new_zeros(self.slots.shape[0], self.Q, *x.shape[1:])
        out[self.inv, self.rank] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:  # [U, Q, ...] -> [T, ...]
        return x[self.inv, self.rank]


# ---------------------------------------------------------------------------------------------
# Dense MLP (dense layers and the shared expert)
# ---------------------------------------------------------------------------------------------
class MLP:
    def __init__(self, src, prefix: str, hidden: int, width: int):
        self.gate = src.linear(f"{prefix}.gate_proj", (width, hidden))
        self.up = src.linear(f"{prefix}.up_proj", (width, hidden))
        self.down = src.linear(f"{prefix}.down_proj", (hidden, width))

    def __call__(self, x):  # [T, H] -> [T, H]
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ---------------------------------------------------------------------------------------------
# Decoder layer and model
# ---------------------------------------------------------------------------------------------
class DecoderLayer:
    def __init__(self, config: ModelConfig, layer: int, src):
        p = f"model.layers.{layer}"
        self.attn = Attention(config, layer, src, f"{p}.self_attn")
        H = config.hidden_size
        self.input_norm = src.norm(f"{p}.input_layernorm.weight", H)
        self.post_attn_norm = src.norm(f"{p}.post_attention_layernorm.weight", H)
        self.eps = config.rms_norm_eps
        if config.is_moe_layer(layer):
            width = config.moe_intermediate_size * config.n_shared_experts
            shared = MLP(src, f"{p}.mlp.shared_experts", H, width) if config.n_shared_experts else None
            self.mlp = src.moe_layer(layer, f"{p}.mlp", shared)  # hybrid.experts.moe_layer.MoELayer
        else:
            self.mlp = MLP(src, f"{p}.mlp", H, config.intermediate_size)

    def __call__(self, h, cos, sin, slots, positions, groups, cache):
        a = self.attn(rms_norm(h, self.input_norm, self.eps), cos, sin, slots, positions, groups, cache)
        if _native_norm_ok(h, self.post_attn_norm) and a.is_contiguous() and a.dtype == h.dtype:
            # h += a (in place: h is this step's own tensor) and its norm, in one native call.
            normed = native.lib_or_none().rms_norm(h, self.post_attn_norm, self.eps, torch.empty_like(h), a)
        else:
            h = h + a
            normed = rms_norm(h, self.post_attn_norm, self.eps)
        return h + self.mlp(normed)


class DeepseekV3:
    """The whole text model. Build with DeepseekV3(config, src) where src is a loader source."""

    def __init__(self, config: ModelConfig, src, progress=None):
        self.config = config
        self.device, self.dtype = src.device, src.dtype
        # The table stays in host memory (2.3 GB for K2.5); only looked-up rows move.
        V, H = config.vocab_size, config.hidden_size
        self.embed = src.embedding("model.embed_tokens.weight", (V, H))  # host
        self.layers = []
        for i in range(config.num_hidden_layers):
            self.layers.append(DecoderLayer(config, i, src))
            if progress is not None:
                progress(i + 1, config.num_hidden_layers)
        self.norm = src.norm("model.norm.weight", H)
        if config.tie_word_embeddings:
            self.lm_head = Linear(self.embed.to(self.device, self.dtype), name="lm_head (tied)")
        else:
            self.lm_head = src.linear("lm_head", (V, H))
        inv_freq, self.rope_scale = rope_inv_freq(config)
        self.inv_freq = inv_freq.to(self.device)
        # Decode steps (one token per slot) run MLA attention in one native call when the device
        # is the CPU and the compute dtype bf16 (csrc/mla_decode.h: ~45 torch ops per layer, each
        # 3-30 us of dispatch on a CPU, become one). Tests switch it off to compare.
        self.native_decode = self.device.type == "cpu" and self.dtype == torch.bfloat16 and _native_ok()

    def set_attention_mode(self, mode: str) -> None:
        if mode not in ("auto", "absorbed", "expanded"):
            raise ValueError(f"attention mode must be auto|absorbed|expanded, got {mode!r}")
        for layer in self.layers:
            layer.attn.mode = mode

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                cache: LatentKVCache, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions, slots [T] -> logits [len(logits_index) or T, Vocab] fp32."""
        if not (input_ids.dim() == positions.dim() == slots.dim() == 1):
            raise ValueError("forward: input_ids, positions and slots must be 1-D [T]")
        if not (input_ids.shape == positions.shape == slots.shape):
            raise ValueError(
                f"forward: input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)} and "
                f"slots {tuple(slots.shape)} must have the same length"
            )
        if input_ids.numel() == 0:
            raise ValueError("forward: empty batch")
        vocab = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise IndexError(f"forward: token ids must be in 0..{vocab - 1}")
        cache.check(slots, positions)

        h = F.embedding(input_ids.cpu(), self.embed).to(self.device, self.dtype)  # [T, H] (indexing: ~30 us)
        positions, slots = positions.to(self.device), slots.to(self.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        cos, sin = freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale
        native = (self.native_decode and cache.dtype == torch.bfloat16
                  and all(layer.attn.mode == "auto" for layer in self.layers)
                  and (slots.shape[0] == 1 or int(torch.unique(slots).numel()) == slots.shape[0]))
        groups = None if native else SlotGroups(slots, positions)  # None: Attention's native path
        for layer in self.layers:
            h = layer(h, cos, sin, slots, positions, groups, cache)
        if logits_index is not None:
            h = h[logits_index.to(self.device)]
        h = rms_norm(h, self.norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()  # [len(logits_index) or T, Vocab]

    __call__ = forward
