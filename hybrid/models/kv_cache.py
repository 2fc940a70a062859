"""The latent KV cache of MLA attention.

MLA never needs per-head keys and values at decode time: the absorbed form attends directly
against the compressed latent c_kv (kv_lora_rank wide, after kv_a_layernorm) and the single
shared rope key (qk_rope_head_dim wide, already rotated). So the cache stores exactly those,
one row per (slot, position) per layer: (512 + 64) x 2 bytes x 61 layers = 70 KB per token for
K2.5 in bf16, against 61 x 64 heads x (192 + 128) x 2 = 2.5 MB for an expanded cache.

Legend: L layers, S slots (concurrent sequences), P max positions, C kv_lora_rank,
R qk_rope_head_dim.
"""

from __future__ import annotations

import torch

from hybrid.config import ModelConfig
from hybrid.models.slot_cache import SlotCache


class LatentKVCache(SlotCache):
    """Per layer: rows [S, P, C+R] = latent (first C) and rope key (last R), on `device` in
    `dtype`. One row per token keeps both parts adjacent, so the absorbed attention uses a row
    as its key directly (no concatenation per step). `latent` / `rope` are views of it.

    Each layer's rows are one flat allocation [S*P + 1, C+R]: row slot*P + position, and one
    spare row (`spare_row`) that padding rows of a static decode batch write to (write_rows)."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, device=None, dtype=torch.bfloat16):
        super().__init__(config, num_slots, max_len, device, dtype)
        L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        S, P = num_slots, max_len
        # One allocation per layer keeps a slot's rows contiguous: attention reads [slot, :L].
        self.flat = [torch.zeros(self.tokens_for(S, P), C + R, device=self.device, dtype=dtype) for _ in range(L)]
        self.kv = [f[: S * P].view(S, P, C + R) for f in self.flat]  # [S, P, C+R] views
        self.latent = [t[..., :C] for t in self.kv]  # [S, P, C] views
        self.rope = [t[..., C:] for t in self.kv]  # [S, P, R] views

    def tensors(self) -> list[torch.Tensor]:
        return self.kv

    @property
    def nbytes(self) -> int:
        """What the cache holds, the spare row of each layer included (tensors() are views
        without it)."""
        return sum(f.numel() * f.element_size() for f in self.flat)

    @staticmethod
    def elements_per_token(config: ModelConfig) -> int:
        """Cache elements one token costs across all layers: latent and rope key of every layer."""
        return config.num_hidden_layers * config.latent_width

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent [T, C], rope [T, R] -> cache[layer][slot_t, position_t]."""
        self.kv[layer][slots, positions] = torch.cat([latent, rope], -1).to(self.dtype)

    @staticmethod
    def tokens_for(num_slots: int, max_len: int) -> int:
        """S * P rows and the spare row."""
        return num_slots * max_len + 1

    @staticmethod
    def static_decode() -> bool:
        return True

    @property
    def spare_row(self) -> int:
        """The flat row no slot owns: where padding rows of a static decode batch write."""
        return self.num_slots * self.max_len

    def write_rows(self, layer: int, rows: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent [B, C], rope [B, R] -> flat rows `rows` [B] of layer (slot * P + position, or
        spare_row); a static decode batch's write (hybrid/models/batch.py DecodeBatch)."""
        self.flat[layer][rows] = torch.cat([latent, rope], -1).to(self.dtype)

    def decode_reads(self, slots: list[int], length: int) -> torch.Tensor:
        """Host [len(slots)] long: what each row of a static decode batch reads (read_rows): its slot."""
        return torch.tensor(slots, dtype=torch.long)

    def decode_rows(self, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Host [n] long: the flat row (slot * P + position) token i writes."""
        return torch.tensor(slots, dtype=torch.long) * self.max_len + torch.tensor(positions, dtype=torch.long)

    def read_rows(self, layer: int, reads: torch.Tensor, length: int) -> torch.Tensor:
        """reads [B] (device slots) -> [B, length, C+R]: a static decode batch's keys."""
        return self.kv[layer][reads, :length]

    def rows(self, layer: int, slots: torch.Tensor, length: int, one_slot: int | None = None) -> torch.Tensor:
        """[U, L, C+R]: positions 0..length-1 of each slot. A single slot is a view (no copy)."""
        if one_slot is not None:
            return self.kv[layer][one_slot : one_slot + 1, :length]
        return self.kv[layer][slots, :length]

    def decode_view(self, layer: int, slots: torch.Tensor, positions: torch.Tensor):
        """For a fused decode kernel: the layer's [S, P, C+R] grid as it stands, the tokens' own
        slots, and a commit() with nothing to do (the kernel wrote the rows in place)."""
        return self.kv[layer], slots, _nothing


def _nothing() -> None:
    pass
