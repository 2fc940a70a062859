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


class LatentKVCache:
    """Per layer: rows [S, P, C+R] = latent (first C) and rope key (last R), on `device` in
    `dtype`. One row per token keeps both parts adjacent, so the absorbed attention uses a row
    as its key directly (no concatenation per step). `latent` / `rope` are views of it."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, device=None, dtype=torch.bfloat16):
        if num_slots <= 0:
            raise ValueError(f"LatentKVCache: num_slots must be positive, got {num_slots}")
        if max_len <= 0:
            raise ValueError(f"LatentKVCache: max_len must be positive, got {max_len}")
        self.config = config
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
        # One allocation per layer keeps a slot's rows contiguous: attention reads [slot, :L].
        self.kv = [torch.zeros(num_slots, max_len, C + R, device=self.device, dtype=dtype) for _ in range(L)]
        self.latent = [t[..., :C] for t in self.kv]  # [S, P, C] views
        self.rope = [t[..., C:] for t in self.kv]  # [S, P, R] views

    @staticmethod
    def bytes_per_token_for(config: ModelConfig, dtype=torch.bfloat16) -> int:
        """Cache bytes one token costs across all layers (for memory planning before allocating)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return config.num_hidden_layers * config.latent_width * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.config, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def reset(self, slot: int) -> None:
        """Forget a slot's contents (a finished sequence). Attention only ever reads positions a
        sequence has written, so this is hygiene, not correctness."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"LatentKVCache.reset: slot {slot} out of range 0..{self.num_slots - 1}")
        for t in self.kv:
            t[slot].zero_()

    def check(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Raise a clear error for slots/positions outside the cache (instead of an index crash)."""
        if slots.numel() == 0:
            return
        smin, smax = int(slots.min()), int(slots.max())
        if smin < 0 or smax >= self.num_slots:
            raise IndexError(f"slots must be in 0..{self.num_slots - 1}, got {smin}..{smax}")
        pmin, pmax = int(positions.min()), int(positions.max())
        if pmin < 0 or pmax >= self.max_len:
            raise IndexError(
                f"positions must be in 0..{self.max_len - 1} (cache max_len {self.max_len}), got {pmin}..{pmax}"
            )

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent [T, C], rope [T, R] -> cache[layer][slot_t, position_t]."""
        self.kv[layer][slots, positions] = torch.cat([latent, rope], -1).to(self.dtype)

    def rows(self, layer: int, slots: torch.Tensor, length: int, one_slot: int | None = None) -> torch.Tensor:
        """[U, L, C+R]: positions 0..length-1 of each slot. A single slot is a view (no copy)."""
        if one_slot is not None:
            return self.kv[layer][one_slot : one_slot + 1, :length]
        return self.kv[layer][slots, :length]
