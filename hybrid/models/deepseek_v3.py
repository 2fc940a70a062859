"""DeepSeek-V3 architecture (DeepSeek-V3/R1, Kimi K2, Kimi K2.5 text model).

Read top to bottom: MLA attention (projections here; the attention against the latent KV cache
is the op set's, hybrid/ops/mla_attention.py), the dense MLP, the decoder layer, the model, and
what the architecture says about itself (facts, cache). Routed experts are the MoE pipeline's
(hybrid/experts/moe_layer.py); weights and ops come from the build context
(hybrid/runtime/context.py), so this file only names tensors and does math. Numerics follow
transformers' DeepseekV3 exactly.

Forward contract (the engine codes against it): a flat ragged batch of T tokens from several
sequences; each token carries its sequence's cache slot and its position. Each layer first
writes every token's latent + rope key into cache[layer][slot, position], then each token
attends to the positions <= its own of its own slot. Chunked prefill and mixed prefill/decode
batches therefore need nothing special.

Legend: T tokens, H hidden, nh heads, D qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim,
C kv_lora_rank, E experts, K picked, I expert width, Vocab vocabulary.
"""

from __future__ import annotations


from hybrid.config import ModelConfig
from hybrid.experts.routers import NoAuxTC
from hybrid.models.batch import Batch
from hybrid.models.decoder_stack import DecoderStack, GatedMLP, PreNormLayer
from hybrid.models.facts import ModelFacts
from hybrid.models.kv_cache import LatentKVCache
from hybrid.models.paged_kv_cache import PagedLatentKVCache
from hybrid.ops.mla_attention import MLAShape


# ---------------------------------------------------------------------------------------------
# MLA attention
# ---------------------------------------------------------------------------------------------
class Attention:
    def __init__(self, config: ModelConfig, layer: int, ctx, prefix: str):
        c = config
        nh, D, R, V, C = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        bias, H = c.attention_bias, c.hidden_size
        self.norm, self.eps = ctx.ops.rms_norm, c.rms_norm_eps
        if c.q_lora_rank is None:
            self.q_proj = ctx.linear(f"{prefix}.q_proj", (nh * (D + R), H), "attention")
        else:
            ql = c.q_lora_rank
            self.q_a_proj = ctx.linear(f"{prefix}.q_a_proj", (ql, H), "attention", bias=bias)
            self.q_a_norm = ctx.norm(f"{prefix}.q_a_layernorm.weight", ql)
            self.q_b_proj = ctx.linear(f"{prefix}.q_b_proj", (nh * (D + R), ql), "attention")
        self.kv_a_proj = ctx.linear(f"{prefix}.kv_a_proj_with_mqa", (C + R, H), "attention", bias=bias)
        # kv_b stays dense: the absorbed form needs it split per head.
        kv_b = ctx.dense_linear(f"{prefix}.kv_b_proj", (nh * (D + V), C))
        shape = MLAShape(nh, D, R, V, C, c.softmax_scale, c.rms_norm_eps, c.rope_interleave)
        self.core = ctx.ops.mla_attention(layer, shape, ctx.norm(f"{prefix}.kv_a_layernorm.weight", C), kv_b)
        self.o_proj = ctx.linear(f"{prefix}.o_proj", (H, nh * V), "attention", bias=bias)
        self.q_lora = c.q_lora_rank is not None

    def __call__(self, x, cos, sin, batch: Batch, cache: LatentKVCache):  # [T, H] -> [T, H]
        if self.q_lora:
            q = self.q_b_proj(self.norm(self.q_a_proj(x), self.q_a_norm, self.eps))  # [T, nh*(D+R)]
        else:
            q = self.q_proj(x)
        kv = self.kv_a_proj(x)  # [T, C+R]
        return self.o_proj(self.core(q, kv, cos, sin, batch, cache))  # [T, nh*V] -> [T, H]


# ---------------------------------------------------------------------------------------------
# Decoder layer: MLA attention, then a dense MLP (the first layers) or the MoE with shared experts
# ---------------------------------------------------------------------------------------------
def decoder_layer(c: ModelConfig, layer: int, ctx) -> PreNormLayer:
    p, H = f"model.layers.{layer}", c.hidden_size
    if c.is_moe_layer(layer):
        shared = None
        if c.n_shared_experts:
            shared = GatedMLP(ctx, f"{p}.mlp.shared_experts", H, c.moe_intermediate_size * c.n_shared_experts, "shared")
        rule = NoAuxTC(c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group,
                       c.norm_topk_prob, c.routed_scaling_factor)
        mlp = ctx.moe(layer, f"{p}.mlp", rule, shared)  # hybrid.experts.moe_layer.MoELayer
    else:
        mlp = GatedMLP(ctx, f"{p}.mlp", H, c.intermediate_size, "dense")
    return PreNormLayer(c, layer, ctx, Attention(c, layer, ctx, f"{p}.self_attn"), mlp)


class DeepseekV3(DecoderStack):
    """The whole text model: DeepseekV3(config, ctx) with ctx a hybrid.runtime.context.BuildContext."""

    config_class = ModelConfig
    cache_class = LatentKVCache
    paged_cache_class = PagedLatentKVCache
    # config.json fields that decide placement: a profile made for one checkpoint stays valid for
    # another with the same values (hybrid/models/spec.py hashes them).
    HASH_FIELDS = (
        "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
        "num_experts_per_tok", "n_shared_experts", "num_hidden_layers", "first_k_dense_replace",
        "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim", "num_attention_heads", "vocab_size",
    )

    def __init__(self, config, ctx, progress=None):
        self._build(config, ctx, lambda i: decoder_layer(config, i, ctx), config.qk_rope_head_dim, progress)

    def set_attention_mode(self, mode: str) -> None:
        """auto | absorbed | expanded (tests force each form)."""
        for layer in self.layers:
            layer.attn.core.set_mode(mode)

    # ---- what the architecture says about itself ---------------------------------------------
    @staticmethod
    def facts(c: ModelConfig) -> ModelFacts:
        H, nh, D, R, V, C, L = (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                                c.v_head_dim, c.kv_lora_rank, c.num_hidden_layers)
        moe = tuple(i for i in range(L) if c.is_moe_layer(i))
        q = [(nh * (D + R), H)] if c.q_lora_rank is None else [(c.q_lora_rank, H), (nh * (D + R), c.q_lora_rank)]
        attn = q + [(C + R, H), (H, nh * V)]  # kv_b is kept dense: always_dense below
        shared_I = c.moe_intermediate_size * c.n_shared_experts
        E = c.n_routed_experts
        kv_b = nh * (D + V) * C
        return ModelFacts(
            model_type=c.model_type, num_layers=L, moe_layers=moe, hidden=H, vocab=c.vocab_size,
            num_experts=E, top_k=c.num_experts_per_tok, expert_width=c.moe_intermediate_size,
            shared_width=shared_I, dense_width=c.intermediate_size, tie_word_embeddings=c.tie_word_embeddings,
            group_matrices={
                "attention": [m for m in attn for _ in range(L)],
                "shared": [(shared_I, H), (shared_I, H), (H, shared_I)] * len(moe) if shared_I else [],
                "dense": [(c.intermediate_size, H), (c.intermediate_size, H), (H, c.intermediate_size)] * (L - len(moe)),
                "lm_head": [] if c.tie_word_embeddings else [(c.vocab_size, H)],  # tied: always dense, below
            },
            # kv_b, the norms (input, post-attention, kv_a, q_a per layer; the final one) and,
            # tied, the LM head's copy of the table.
            always_dense_params=(L * kv_b + L * (2 * H + C + (c.q_lora_rank or 0)) + H
                                 + (c.vocab_size * H if c.tie_word_embeddings else 0)),
            dense_attention_per_layer=kv_b,
            router_params=len(moe) * (E * H + E),
            kv_elements_per_token=LatentKVCache.elements_per_token(c),
            attention_heads=nh, attention_key_width=D + V + R, attention_out_width=nh * V,
            # Absorbed decode: scores (C+R) and the latent sum (C) per head per key, 2 flops each.
            attention_flops_per_key=4 * nh * c.latent_width,
        )
