"""The latent KV cache of MLA attention in fixed-size blocks, shared between sequences.

Same rows as LatentKVCache (kv_cache.py: latent and rope key of a token, C + R wide, per
layer), but stored in one pool of N blocks of B tokens per layer instead of a whole-context
grid per slot. Each live sequence owns a row of the block table, its slot: entry i is the pool
block holding its positions i*B .. i*B+B-1. Two sequences whose prompts start alike point their
first entries at the same blocks, so that prefix is stored (and computed) once. Which blocks a
sequence uses, their reference counts, the prefix tree and eviction are the engine's
(hybrid/engine/kv_blocks.py); this class only stores rows and follows the table.

Reads and writes go through the op set's paged op (hybrid/ops/paged_kv.py), chosen at load.

A static decode step (hybrid/engine/step_runner.py, hybrid/models/batch.py DecodeBatch) does not
follow the device table: its host half asks decode_reads for the rows' blocks (a fixed-shape
[B, M'] int32 table, from the host copy of the table kept here) and decode_rows for the physical
row each token writes, and padding rows write the spare block (one pool block past the N the
engine hands out), so nothing in the step reads a device value or has a data-dependent shape.
Table entries past a sequence's own blocks point at the spare block: only masked keys are read
through them.

Legend: L layers, N blocks, B tokens per block, S slots (table rows), M blocks per slot,
C kv_lora_rank, R qk_rope_head_dim, W = C + R, T tokens, U slots read.
"""

from __future__ import annotations

import torch

from hybrid.models.kv_cache import LatentKVCache
from hybrid.models.slot_cache import SlotCache


class PagedLatentKVCache(SlotCache):
    """Per layer a pool [N + 1, B, W] on `device` in `dtype` (block N: the spare block); table
    [S, M] int64 (M = max_len / B rounded up) and its host copy host_table [S, M] int32; `paged`
    (kept as paged_ops) is the op set's paged_kv() (gather / scatter)."""

    def __init__(self, config, num_slots: int, max_len: int, num_blocks: int, block_size: int, paged,
                 device=None, dtype=torch.bfloat16):
        super().__init__(config, num_slots, max_len, device, dtype)
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PagedLatentKVCache: {name} must be a positive integer, got {value!r}")
        L, W = config.num_hidden_layers, config.latent_width
        self.num_blocks, self.block_size, self.paged_ops = num_blocks, block_size, paged
        self.blocks_per_slot = -(-max_len // block_size)  # M
        self.kv = [torch.zeros(self.pool_blocks(num_blocks), block_size, W, device=self.device, dtype=dtype) for _ in range(L)]
        self.host_table = torch.full((num_slots, self.blocks_per_slot), self.spare_block, dtype=torch.int32)
        self.table = self.host_table.to(self.device, torch.long)

    def tensors(self) -> list[torch.Tensor]:
        return self.kv

    elements_per_token = staticmethod(LatentKVCache.elements_per_token)

    # ---- the block table (engine side) ------------------------------------------------------
    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """Slot `slot` reads and writes its positions through `blocks` (in order)."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"PagedLatentKVCache.set_blocks: slot {slot} out of range 0..{self.num_slots - 1}")
        if len(blocks) > self.blocks_per_slot:
            raise ValueError(f"PagedLatentKVCache.set_blocks: {len(blocks)} blocks for slot {slot}, at most "
                             f"{self.blocks_per_slot} (max_len {self.max_len} / block_size {self.block_size})")
        if blocks and not (0 <= min(blocks) and max(blocks) < self.num_blocks):
            raise IndexError(f"PagedLatentKVCache.set_blocks: block ids must be in 0..{self.num_blocks - 1}")
        row = self.host_table[slot]
        row.fill_(self.spare_block)
        row[: len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.table[slot] = row.to(self.device, torch.long)

    @staticmethod
    def pool_blocks(num_blocks: int) -> int:
        """Blocks per layer a pool handing out num_blocks allocates: those and the spare block."""
        return num_blocks + 1

    @property
    def spare_block(self) -> int:
        """The pool block no sequence owns: unused table entries, and padding rows' writes."""
        return self.num_blocks

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst := block src in every layer (copy-on-write of a shared partial block)."""
        for t in self.kv:
            t[dst] = t[src]

    def reset(self, slot: int) -> None:
        """Forget a slot's table row (its blocks belong to the engine's pool, not to the slot)."""
        self.set_blocks(slot, [])

    # ---- what attention calls (same contract as LatentKVCache) ------------------------------
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent [T, C], rope [T, R] -> the rows of (slot_t, position_t)."""
        self.paged_ops.scatter(self.kv[layer], self.table, slots, positions, torch.cat([latent, rope], -1))

    def rows(self, layer: int, slots: torch.Tensor, length: int, one_slot: int | None = None) -> torch.Tensor:
        """[U, L, W]: positions 0..length-1 of each slot, gathered from its blocks."""
        return self.paged_ops.gather(self.kv[layer], self.table, slots, length)[:, :length]

    def decode_view(self, layer: int, slots: torch.Tensor, positions: torch.Tensor):
        """For a fused decode kernel that wants one contiguous [S', P', W] grid: the decode tokens'
        rows gathered into one (token t reads row t), and a commit() that scatters the row each
        token wrote back into its block."""
        T = slots.shape[0]
        # whole blocks: contiguous as gathered, and each token reads only up to its position
        grid = self.paged_ops.gather(self.kv[layer], self.table, slots, int(positions.max()) + 1)  # [T, P', W]
        local = torch.arange(T, device=slots.device)

        def commit() -> None:
            self.paged_ops.scatter(self.kv[layer], self.table, slots, positions, grid[local, positions])

        return grid, local, commit

    # ---- a static decode batch (hybrid/models/batch.py DecodeBatch) ---------------------------
    @staticmethod
    def static_decode() -> bool:
        return True

    @property
    def spare_row(self) -> int:
        """The physical row padding rows of a static decode batch write: the spare block's first."""
        return self.spare_block * self.block_size

    def decode_reads(self, slots: list[int], length: int) -> torch.Tensor:
        """Host [len(slots), M'] int32, M' = length / B rounded up: the blocks each row reads
        (what read_rows takes), from the host table, so the host never waits for the device."""
        return self.host_table[slots, : -(-length // self.block_size)]

    def decode_rows(self, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Host [n] long: the physical row (block * B + offset) token i writes at positions[i]."""
        pos = torch.tensor(positions, dtype=torch.long)
        blocks = self.host_table[slots, pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size

    def read_rows(self, layer: int, reads: torch.Tensor, length: int) -> torch.Tensor:
        """reads [B, M'] (device, decode_reads' copy) -> [B, length, W]: keys 0..length-1 of each row."""
        return self.paged_ops.gather_blocks(self.kv[layer], reads)[:, :length]

    def write_rows(self, layer: int, rows: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
        """latent [B, C], rope [B, R] -> physical rows `rows` [B] of layer (decode_rows, or spare_row)."""
        self.paged_ops.write_rows(self.kv[layer], rows, torch.cat([latent, rope], -1))
