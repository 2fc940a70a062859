"""Qwen3-MoE architecture (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-*; model_type qwen3_moe).

Read top to bottom: GQA attention with per-head q/k RMSNorm against a per-head K/V cache, the
dense MLP, the decoder layer, the model, and what the architecture says about itself (facts,
cache). Routed experts are the MoE pipeline's (hybrid/experts/moe_layer.py) with softmax top-k
routing (hybrid/experts/routers/softmax_topk.py), no shared expert; weights and ops come from
the build context (hybrid/runtime/context.py), so this file only names tensors and does math.
Numerics follow transformers' Qwen3MoeForCausalLM exactly.

Forward contract (the engine codes against it, same as DeepseekV3): a flat ragged batch of T
tokens from several sequences; each token carries its sequence's cache slot and its position.
Each layer first writes every token's rotated key and value into cache[layer][slot, :, position],
then each token attends to the positions <= its own of its own slot. Chunked prefill and mixed
prefill/decode batches therefore need nothing special.

Legend: T tokens, U distinct slots in the batch, Q queries per slot (padded), L keys per slot,
H hidden, nh query heads, nkv K/V heads, g = nh / nkv query heads per K/V head, D head_dim,
E experts, K picked, I expert width, Vocab vocabulary.
"""

from __future__ import annotations

import torch

from hybrid.experts.routers import SoftmaxTopK
from hybrid.models.batch import Batch, SlotGroups
from hybrid.models.decoder_stack import DecoderStack, GatedMLP, PreNormLayer
from hybrid.models.facts import ModelFacts
from hybrid.models.head_kv_cache import HeadKVCache
from hybrid.models.qwen3_moe_config import Qwen3MoeConfig
from hybrid.ops.attention import sdpa_chunked
from hybrid.ops.rope import apply_rope


# ---------------------------------------------------------------------------------------------
# GQA attention
# ---------------------------------------------------------------------------------------------
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: SlotGroups, scale: float) -> torch.Tensor:
    """q [T, nh, D]; k, v [U, nkv, L, D] (the cache rows of the batch's slots) -> [T, nh, D].

    The g query heads that share a K/V head (heads kv*g .. kv*g+g-1, transformers' repeat_kv
    order) are stacked along the query axis, so SDPA sees nkv heads of g*Q queries and the keys
    are read as they lie in the cache, never repeated."""
    U, nkv, L, D = k.shape
    nh, Q = q.shape[1], g.Q
    grp = nh // nkv
    qp = g.pad(q).view(U, Q, nkv, grp, D).permute(0, 2, 3, 1, 4).reshape(U, nkv, grp * Q, D)
    mask = g.mask[:, :, None].expand(U, 1, grp, Q, L).reshape(U, 1, grp * Q, L)
    o = sdpa_chunked(qp, k.to(q.dtype), v.to(q.dtype), mask, scale)  # [U, nkv, g*Q, D]
    o = o.view(U, nkv, grp, Q, D).permute(0, 3, 1, 2, 4).reshape(U, Q, nh, D)
    return g.unpad(o)  # [T, nh, D]


class Attention:
    def __init__(self, config: Qwen3MoeConfig, layer: int, ctx, prefix: str):
        c = config
        self.layer, self.nh, self.nkv, self.D = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        H, nh, nkv, D, bias = c.hidden_size, self.nh, self.nkv, self.D, c.attention_bias
        self.q_proj = ctx.linear(f"{prefix}.q_proj", (nh * D, H), "attention", bias=bias)
        self.k_proj = ctx.linear(f"{prefix}.k_proj", (nkv * D, H), "attention", bias=bias)
        self.v_proj = ctx.linear(f"{prefix}.v_proj", (nkv * D, H), "attention", bias=bias)
        self.o_proj = ctx.linear(f"{prefix}.o_proj", (H, nh * D), "attention", bias=bias)
        self.q_norm = ctx.norm(f"{prefix}.q_norm.weight", D)  # per head, before RoPE
        self.k_norm = ctx.norm(f"{prefix}.k_norm.weight", D)
        self.norm, self.eps, self.scale = ctx.ops.rms_norm, c.rms_norm_eps, c.softmax_scale

    def __call__(self, x, cos, sin, batch: Batch, cache: HeadKVCache):  # [T, H] -> [T, H]
        T, nh, nkv, D = x.shape[0], self.nh, self.nkv, self.D
        q = self.norm(self.q_proj(x).reshape(T * nh, D), self.q_norm, self.eps).view(T, nh, D)
        k = self.norm(self.k_proj(x).reshape(T * nkv, D), self.k_norm, self.eps).view(T, nkv, D)
        v = self.v_proj(x).view(T, nkv, D)
        q, k = apply_rope(q, cos, sin, interleave=False), apply_rope(k, cos, sin, interleave=False)
        batch.write_kv(cache, self.layer, k, v)
        g = batch.groups
        keys, values = cache.rows(self.layer, g.slots, g.L, g.one_slot)  # [U, nkv, L, D] each
        out = gqa_attention(q, keys, values, g, self.scale)  # [T, nh, D]
        return self.o_proj(out.reshape(T, nh * D))


# ---------------------------------------------------------------------------------------------
# Decoder layer: GQA attention, then a dense MLP (mlp_only_layers, or off the decoder_sparse_step)
# or the routed experts (no shared expert)
# ---------------------------------------------------------------------------------------------
def decoder_layer(c: Qwen3MoeConfig, layer: int, ctx) -> PreNormLayer:
    p = f"model.layers.{layer}"
    if c.is_moe_layer(layer):
        rule = SoftmaxTopK(c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)
        mlp = ctx.moe(layer, f"{p}.mlp", rule, None)  # hybrid.experts.moe_layer.MoELayer
    else:
        mlp = GatedMLP(ctx, f"{p}.mlp", c.hidden_size, c.intermediate_size, "dense")
    return PreNormLayer(c, layer, ctx, Attention(c, layer, ctx, f"{p}.self_attn"), mlp)


class Qwen3Moe(DecoderStack):
    """The whole model: Qwen3Moe(config, ctx) with ctx a hybrid.runtime.context.BuildContext."""

    config_class = Qwen3MoeConfig
    cache_class = HeadKVCache
    # config.json fields that decide placement: a profile made for one checkpoint stays valid for
    # another with the same values (hybrid/models/spec.py hashes them).
    HASH_FIELDS = (
        "hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
        "num_hidden_layers", "decoder_sparse_step", "mlp_only_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size",
    )

    def __init__(self, config, ctx, progress=None):
        self._build(config, ctx, lambda i: decoder_layer(config, i, ctx), config.head_dim, progress)

    # ---- what the architecture says about itself ---------------------------------------------
    @staticmethod
    def facts(c: Qwen3MoeConfig) -> ModelFacts:
        H, nh, nkv, D, L, V = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                               c.num_hidden_layers, c.vocab_size)
        moe, dense_I = c.moe_layers, c.intermediate_size
        attn = [(nh * D, H), (nkv * D, H), (nkv * D, H), (H, nh * D)]  # q, k, v, o
        biases = (nh * D + 2 * nkv * D + H) if c.attention_bias else 0
        return ModelFacts(
            model_type=c.model_type, num_layers=L, moe_layers=moe, hidden=H, vocab=V,
            num_experts=c.num_experts, top_k=c.num_experts_per_tok, expert_width=c.moe_intermediate_size,
            shared_width=0, dense_width=dense_I, tie_word_embeddings=c.tie_word_embeddings,
            group_matrices={
                "attention": [m for m in attn for _ in range(L)],
                "shared": [],
                "dense": [(dense_I, H), (dense_I, H), (H, dense_I)] * (L - len(moe)),
                "lm_head": [] if c.tie_word_embeddings else [(V, H)],  # tied: always dense, below
            },
            # Per layer: input and post-attention norms, q/k norms, attention biases; the final
            # norm; tied, the LM head's copy of the table.
            always_dense_params=L * (2 * H + 2 * D + biases) + H + (V * H if c.tie_word_embeddings else 0),
            router_params=len(moe) * c.num_experts * H,
            kv_elements_per_token=HeadKVCache.elements_per_token(c),
            attention_heads=nh, attention_key_width=2 * D, attention_out_width=nh * D,
            # Per query head per key: the score (D multiply-adds) and the weighted value sum (D).
            attention_flops_per_key=4 * nh * D,
        )
