"""The batch descriptor a model's forward works on: a flat ragged batch of T tokens.

Each token carries its sequence's cache slot and its position. The model builds one Batch per
forward and hands it to its attention; what the attention needs to know about the batch's shape
(is it a decode step, one token per slot? which tokens share a slot?) is asked here, computed
once, and only when asked: the torch forms use `groups`, a fused decode form asks `decode`.

A decode step on a device runs from static buffers instead (DecodeBatch, below): B rows, one
token per distinct slot, padded to a batch-size bucket, keys read up to a fixed length bucket;
every shape is known before the step starts, so the step has no host synchronisation and can be
captured in a CUDA graph (hybrid/engine/step_runner.py).

Legend: T tokens, U distinct slots in the batch, Q queries per slot (padded), L keys per slot,
B rows of a static decode batch (bucket size).
"""

from __future__ import annotations

from functools import cached_property

import torch


class Batch:
    """input_ids [T] (host), positions [T], slots [T] (on the model's device)."""

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        self.input_ids, self.positions, self.slots = input_ids, positions, slots

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def write_kv(self, cache, layer: int, *parts: torch.Tensor) -> None:
        """Write each token's cache row(s) of `layer` (parts as the cache's write() takes them)."""
        cache.write(layer, self.slots, self.positions, *parts)

    def read_kv(self, cache, layer: int):
        """The keys attention reads for `layer`: each slot group's positions 0..L-1 (groups)."""
        g = self.groups
        return cache.rows(layer, g.slots, g.L, g.one_slot)

    @cached_property
    def decode(self) -> bool:
        """True when no two tokens share a slot (a decode step of several sequences): each
        token then attends to its own slot's cache with no padding or causal mask."""
        T = self.slots.shape[0]
        return T == 1 or int(torch.unique(self.slots).numel()) == T

    @cached_property
    def groups(self) -> "SlotGroups":
        return SlotGroups(self.slots, self.positions)


class SlotGroups:
    """Which tokens share a cache slot, and the padded [U, Q] layout attention runs in.

    Token t goes to row (u_t, r_t): u_t its slot's index among the U distinct slots, r_t its
    rank among that slot's tokens. mask[u, 0, r, j] allows key j <= position of (u, r).
    """

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor):
        uniq, inv, counts = torch.unique(slots, return_inverse=True, return_counts=True)
        T, U = slots.shape[0], uniq.shape[0]
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(T, device=slots.device) - starts[inv[order]]
        self.slots, self.inv, self.rank = uniq, inv, rank
        self.one_slot = int(uniq[0]) if U == 1 else None  # lets attention read a cache view
        self.Q = int(counts.max())
        self.L = int(positions.max()) + 1
        pos = torch.zeros(U, self.Q, dtype=positions.dtype, device=positions.device)
        pos[inv, rank] = positions
        keys = torch.arange(self.L, device=positions.device)
        self.mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [U, 1, Q, L]

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [U, Q, ...]
        out = x.new_zeros(self.slots.shape[0], self.Q, *x.shape[1:])
        out[self.inv, self.rank] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:  # [U, Q, ...] -> [T, ...]
        return x[self.inv, self.rank]


class DecodeBatch(Batch):
    """A static decode batch (device tensors, all B rows): positions [B], slots [B] (the slot
    each row belongs to), reads (what each row attends to, in the cache's own terms: the cache's
    decode_reads, e.g. its slot [B], or its blocks [B, M'] in a paged cache) and rows [B] (write:
    the cache's row for each row's new key, decode_rows; padding rows point at the cache's spare
    row, so they never touch a sequence's rows). Padding rows repeat row 0's token, slot, reads
    and position: their attention and routing equal row 0's, so they pick no expert row 0 does
    not. `length` (host int) is the key length bucket: keys 0..length-1 of each row are read and
    masked by position, so no shape depends on the data."""

    decode = True  # one token per distinct slot, by construction

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, length: int,
                 reads: torch.Tensor):
        super().__init__(positions, positions, slots)  # no token ids: the rows come embedded
        self.rows, self.length, self.reads = rows, length, reads

    def read_kv(self, cache, layer: int):
        return cache.read_rows(layer, self.reads, self.length)  # [B, length, ...]

    @cached_property
    def groups(self) -> "DecodeGroups":
        return DecodeGroups(self.slots, self.positions, self.length)

    def write_kv(self, cache, layer: int, *parts: torch.Tensor) -> None:
        cache.write_rows(layer, self.rows, *parts)


class DecodeGroups:
    """SlotGroups' interface for a DecodeBatch: U = B slots of Q = 1 query, L = `length` keys;
    mask[b, 0, 0, j] allows key j <= positions[b]. Nothing here reads a device value."""

    Q = 1
    one_slot = None

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, length: int):
        self.slots, self.L = slots, length
        keys = torch.arange(length, device=positions.device)
        self.mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]

    @staticmethod
    def pad(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B, 1, ...]
        return x[:, None]

    @staticmethod
    def unpad(x: torch.Tensor) -> torch.Tensor:  # [B, 1, ...] -> [B, ...]
        return x[:, 0]


def check_inputs(input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, vocab: int) -> None:
    """Clear errors for a malformed forward() call (instead of an index crash deep inside)."""
    if not (input_ids.dim() == positions.dim() == slots.dim() == 1):
        raise ValueError("forward: input_ids, positions and slots must be 1-D [T]")
    if not (input_ids.shape == positions.shape == slots.shape):
        raise ValueError(
            f"forward: input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)} and "
            f"slots {tuple(slots.shape)} must have the same length"
        )
    if input_ids.numel() == 0:
        raise ValueError("forward: empty batch")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise IndexError(f"forward: token ids must be in 0..{vocab - 1}")
