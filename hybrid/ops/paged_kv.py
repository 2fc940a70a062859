"""Reading and writing a paged KV cache: the rows of a sequence live in fixed-size blocks of one
pool, found through the sequence's row of a block table.

  physical row of (slot s, position p) = table[s, p // B] * B + p % B

The torch form below is the reference (index_select on the pool, what any device runs); a fused
gather kernel for a CUDA device would be another class with the same two methods, chosen once by
the op set (hybrid/ops/op_sets.py), never a branch inside the attention.

Legend: N blocks in the pool, B tokens per block, W row width, S table rows (slots), M blocks
per slot (table width), T tokens, U slots read, L keys per slot.
"""

from __future__ import annotations

import torch


class TorchPagedKV:
    """gather/scatter over pool [N, B, W] with table [S, M] (int64, on the pool's device)."""

    name = "torch"

    @staticmethod
    def scatter(pool: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> None:
        """rows [T, W] -> pool at (slot_t, position_t)."""
        N, B, W = pool.shape
        phys = table[slots, positions // B] * B + positions % B  # [T]
        pool.view(N * B, W)[phys] = rows.to(pool.dtype)

    @staticmethod
    def gather(pool: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
        """[U, L', W], L' = length rounded up to whole blocks: positions 0..L'-1 of each slot, in
        one contiguous copy (table entries past a slot's own blocks point at any valid block;
        attention masks those keys, and callers slice to the length they need)."""
        N, B, W = pool.shape
        nb = -(-length // B)
        blocks = table[slots, :nb]  # [U, nb]
        return pool.index_select(0, blocks.reshape(-1)).view(blocks.shape[0], nb * B, W)
