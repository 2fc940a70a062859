"""A plain per-head K/V cache (GQA attention: Qwen3-MoE and kin).

Each layer keeps the rotated keys and the values of its K/V heads, one entry per (slot,
position): 2 x nkv x D elements per token per layer, e.g. Qwen3-30B-A3B: 48 layers x 2 x 4 x
128 x 2 bytes = 96 KB per token in bf16. Same interface as LatentKVCache (both are a
SlotCache, slot_cache.py), so the engine and the memory planner need not know which one a
model uses.

Layout is head-major, [S, nkv, P, D] per layer, so one slot's first L positions are the
[nkv, L, D] key block attention multiplies against as it stands (a view for a single slot).

Legend: L layers, S slots (concurrent sequences), P max positions, nkv K/V heads, D head_dim,
T tokens, U distinct slots in a batch.
"""

from __future__ import annotations

import torch

from hybrid.models.slot_cache import SlotCache


class HeadKVCache(SlotCache):
    """Per layer: k, v [S, nkv, P, D] on `device` in `dtype`. `config` needs num_hidden_layers,
    num_key_value_heads and head_dim."""

    def __init__(self, config, num_slots: int, max_len: int, device=None, dtype=torch.bfloat16):
        super().__init__(config, num_slots, max_len, device, dtype)
        L, nkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.k = [torch.zeros(num_slots, nkv, max_len, D, device=self.device, dtype=dtype) for _ in range(L)]
        self.v = [torch.zeros(num_slots, nkv, max_len, D, device=self.device, dtype=dtype) for _ in range(L)]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]

    @staticmethod
    def elements_per_token(config) -> int:
        """Cache elements one token costs across all layers: K and V of every K/V head."""
        return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, nkv, D] -> cache[layer][slot_t, :, position_t]."""
        self.k[layer][slots, :, positions] = k.to(self.dtype)
        self.v[layer][slots, :, positions] = v.to(self.dtype)

    def rows(self, layer: int, slots: torch.Tensor, length: int,
             one_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [U, nkv, L, D]: positions 0..length-1 of each slot. A single slot is a view."""
        if one_slot is not None:
            s = slice(one_slot, one_slot + 1)
            return self.k[layer][s, :, :length], self.v[layer][s, :, :length]
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]
