"""What every KV cache shares: a fixed grid of (slot, position) rows per layer.

A subclass allocates its per-layer tensors (each with the slot as its first dimension), lists
them in `tensors()`, and says what a token costs in `elements_per_token(config)`; the size,
reset and bounds checks below are the same for every layout.

Legend: S slots (concurrent sequences), P max positions.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Base of LatentKVCache and HeadKVCache: S slots of P positions on `device` in `dtype`.
    Error messages name the concrete class."""

    def __init__(self, config, num_slots: int, max_len: int, device=None, dtype=torch.bfloat16):
        name = type(self).__name__
        if num_slots <= 0:
            raise ValueError(f"{name}: num_slots must be positive, got {num_slots}")
        if max_len <= 0:
            raise ValueError(f"{name}: max_len must be positive, got {max_len}")
        self.config = config
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache owns, each [S, ...] (slot first)."""
        raise NotImplementedError

    @staticmethod
    def elements_per_token(config) -> int:
        """Cache elements one token costs across all layers."""
        raise NotImplementedError

    @staticmethod
    def static_decode() -> bool:
        """Whether a static decode batch can use it: decode_reads / decode_rows (its host half),
        read_rows / write_rows (its device half) and spare_row for padding rows (hybrid/models/
        batch.py DecodeBatch)."""
        return False

    @staticmethod
    def tokens_for(num_slots: int, max_len: int) -> int:
        """Token rows per layer a cache of num_slots x max_len allocates (spare rows included),
        for memory planning before allocating."""
        return num_slots * max_len

    @classmethod
    def bytes_per_token_for(cls, config, dtype=torch.bfloat16) -> int:
        """Cache bytes one token costs across all layers (for memory planning before allocating)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cls.elements_per_token(config) * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.config, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self, slot: int) -> None:
        """Forget a slot's contents (a finished sequence). Attention only ever reads positions a
        sequence has written, so this is hygiene, not correctness."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"{type(self).__name__}.reset: slot {slot} out of range 0..{self.num_slots - 1}")
        for t in self.tensors():
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
