"""Reading and writing a paged KV cache: the rows of a sequence live in fixed-size blocks of one
pool, found through the sequence's row of a block table.

  physical row of (slot s, position p) = table[s, p // B] * B + p % B

A static decode step (hybrid/engine/step_runner.py) has no table row of its own to follow: its
host half copies the rows' blocks into a fixed-shape block table [B, M'] (gather_blocks reads
through it) and computes each row's physical row (write_rows writes there), so no shape or
index depends on a device value.

The torch form below is the reference (index_select on the pool, what any device runs); a fused
gather kernel for a CUDA device would be another class with the same two methods, chosen once by
the op set (hybrid/ops/op_sets.py), never a branch inside the attention.

Legend: N blocks in the pool, B tokens per block, W row width, S table rows (slots), M blocks
per slot (table width), T tokens, U slots read, L keys per slot.
"""

from __future__ import annotations

import torch


class TorchPagedKV:
    """gather/scatter over pool [N, B, W] with table [S, M] (int64, on the pool's device);
    gather_blocks/write_rows for a static decode batch."""

    name = "torch"

    @staticmethod
    def scatter(pool: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor) -> None:
        """rows [T, W] -> pool at (slot_t, position_t)."""
        B = pool.shape[1]
        TorchPagedKV.write_rows(pool, table[slots, positions // B] * B + positions % B, rows)

    @staticmethod
    def write_rows(pool: torch.Tensor, phys: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [T, W] -> physical rows phys [T] (block * B + offset) of the pool."""
        N, B, W = pool.shape
        pool.view(N * B, W)[phys] = rows.to(pool.dtype)

    @staticmethod
    def gather(pool: torch.Tensor, table: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
        """[U, L', W], L' = length rounded up to whole blocks: positions 0..L'-1 of each slot, in
        one contiguous copy (table entries past a slot's own blocks point at any valid block;
        attention masks those keys, and callers slice to the length they need)."""
        nb = -(-length // pool.shape[1])
        return TorchPagedKV.gather_blocks(pool, table[slots, :nb])

    @staticmethod
    def gather_blocks(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [U, M'] (int32 or int64) -> [U, M'*B, W]: those blocks' rows, in order, in one
        contiguous copy."""
        N, B, W = pool.shape
        return pool.index_select(0, blocks.reshape(-1)).view(blocks.shape[0], blocks.shape[1] * B, W)
