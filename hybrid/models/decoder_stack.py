"""What every decoder-only model here shares, written once: the gated MLP, the pre-norm decoder
layer, and the stack: the embedding table on the host, the layers, the final norm, the LM head
(tied or not), the RoPE tables, the attach points and the forward over a flat ragged batch
(hybrid/models/batch.py). A model class subclasses DecoderStack, sets `cache_class`, and builds
its own layers with `_build`; its file keeps only its own math (attention, routing rule, facts).

Legend: T tokens, H hidden, Vocab vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.models.batch import Batch, check_inputs
from hybrid.ops.rope import rope_cos_sin, rope_inv_freq


class GatedMLP:
    """down(SiLU(gate x) * up x): dense layers and shared experts."""

    def __init__(self, ctx, prefix: str, hidden: int, width: int, group: str):
        self.gate = ctx.linear(f"{prefix}.gate_proj", (width, hidden), group)
        self.up = ctx.linear(f"{prefix}.up_proj", (width, hidden), group)
        self.down = ctx.linear(f"{prefix}.down_proj", (hidden, width), group)

    def __call__(self, x):  # [T, H] -> [T, H]
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PreNormLayer:
    """h + attn(norm(h)), then + mlp(norm(...)): the decoder layer of both architectures. The
    model's subclass passes its attention and its MLP (dense, or a MoELayer)."""

    def __init__(self, config, layer: int, ctx, attn, mlp):
        p, H = f"model.layers.{layer}", config.hidden_size
        self.ops, self.eps = ctx.ops, config.rms_norm_eps
        self.attn, self.mlp = attn, mlp
        self.input_norm = ctx.norm(f"{p}.input_layernorm.weight", H)
        self.post_attn_norm = ctx.norm(f"{p}.post_attention_layernorm.weight", H)

    def __call__(self, h, cos, sin, batch, cache):  # [T, H] -> [T, H]
        a = self.attn(self.ops.rms_norm(h, self.input_norm, self.eps), cos, sin, batch, cache)
        h, normed = self.ops.add_rms_norm(h, a, self.post_attn_norm, self.eps)
        return h + self.mlp(normed)


class DecoderStack:
    cache_class = None  # the model's KV cache type: (config, num_slots, max_len, device, dtype)
    paged_cache_class = None  # its paged form, if it has one (hybrid/models/paged_kv_cache.py)

    def _build(self, config, ctx, make_layer, rope_dim: int, progress=None) -> None:
        """make_layer(i) -> decoder layer i: (h, cos, sin, batch, cache) -> h."""
        self.config = config
        self.device, self.dtype, self.ops = ctx.device, ctx.dtype, ctx.ops
        V, H = config.vocab_size, config.hidden_size
        self.embed = ctx.embedding("model.embed_tokens.weight", (V, H))  # host; only looked-up rows move
        self.layers = []
        for i in range(config.num_hidden_layers):
            self.layers.append(make_layer(i))
            if progress is not None:
                progress(i + 1, config.num_hidden_layers)
        self.norm = ctx.norm("model.norm.weight", H)
        if config.tie_word_embeddings:
            self.lm_head = ctx.tied_linear(self.embed, "lm_head (tied)")
        else:
            self.lm_head = ctx.linear("lm_head", (V, H), "lm_head")
        inv_freq, self.rope_scale = rope_inv_freq(config.rope, rope_dim)
        self.inv_freq = inv_freq.to(self.device)

    # ---- attach points ---------------------------------------------------------------------
    def moe_layers(self) -> dict:
        """{decoder-layer index: MoELayer} (hybrid/experts/moe_layer.py)."""
        return {i: layer.mlp for i, layer in enumerate(self.layers) if self.config.is_moe_layer(i)}

    def kv_paged(self) -> bool:
        """Whether make_cache can build a paged cache (blocks shared between sequences)."""
        return self.paged_cache_class is not None

    def make_cache(self, num_slots: int, max_len: int, num_blocks: int | None = None,
                   block_size: int | None = None):
        """A slot cache (num_slots x max_len), or with num_blocks and block_size a paged one
        (kv_paged() must be true): num_slots table rows over a pool of num_blocks blocks."""
        if num_blocks is None:
            return self.cache_class(self.config, num_slots, max_len, self.device, self.dtype)
        if not self.kv_paged():
            raise ValueError(f"{type(self).__name__} has no paged KV cache")
        return self.paged_cache_class(self.config, num_slots, max_len, num_blocks, block_size,
                                      self.ops.paged_kv(), self.device, self.dtype)

    def kv_bytes_per_token(self) -> int:
        return self.cache_class.bytes_per_token_for(self.config, self.dtype)

    def kv_cache_tokens(self, num_slots: int, max_len: int, num_blocks: int | None = None,
                        block_size: int | None = None) -> int:
        """Token rows per layer make_cache(same arguments) allocates, spare rows and blocks
        included: what a memory check counts (x kv_bytes_per_token()) before allocating."""
        if num_blocks is None:
            return self.cache_class.tokens_for(num_slots, max_len)
        return self.paged_cache_class.pool_blocks(num_blocks) * block_size

    # ---- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                cache, logits_index: torch.Tensor | None = None, embeds=None) -> torch.Tensor:
        """input_ids, positions, slots [T] -> logits [len(logits_index) or T, Vocab] fp32.
        embeds: None, or (rows [n] long, values [n, H]): input embeddings that replace those of
        the tokens at those rows of the batch (an image's tokens, hybrid/models/vision.py)."""
        check_inputs(input_ids, positions, slots, self.config.vocab_size)
        cache.check(slots, positions)
        h = self.embed_rows(input_ids).to(self.device, self.dtype)  # [T, H]
        if embeds is not None:
            rows, values = embeds
            h[rows.to(self.device)] = values.to(self.device, self.dtype)
        batch = Batch(input_ids, positions.to(self.device), slots.to(self.device))
        h = self._layers(h, batch, cache)
        if logits_index is not None:
            if logits_index.numel() == 0:  # a step of prompt chunks that all go on next step
                return torch.empty(0, self.config.vocab_size, device=self.device)
            h = h[logits_index.to(self.device)]
        return self._head(h)  # [len(logits_index) or T, Vocab]

    __call__ = forward

    def embed_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> their rows [T, H] of the host table (indexing: ~30 us); the caller
        moves them to the device (a static decode step copies them into its input buffer)."""
        return F.embedding(input_ids.cpu(), self.embed)

    @torch.inference_mode()
    def decode_static(self, h: torch.Tensor, batch, cache) -> torch.Tensor:
        """The device part of a decode step, from embedded rows h [B, H] (device) and a
        DecodeBatch (hybrid/models/batch.py): logits [B, Vocab] fp32. Every shape is fixed by
        B and batch.length, and nothing reads a device value on the host except the MoE
        layers' hand-offs to the CPU experts (hybrid/experts/staging.py), so a step replays
        from static buffers and can be captured (hybrid/engine/step_runner.py)."""
        return self._head(self._layers(h, batch, cache))

    def _layers(self, h: torch.Tensor, batch, cache) -> torch.Tensor:  # [T, H] -> [T, H]
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.rope_scale)  # [T, R/2]
        for layer in self.layers:
            h = layer(h, cos, sin, batch, cache)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, Vocab] fp32
        h = self.ops.rms_norm(h, self.norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()
