"""A MoE layer's device share, grouped by expert: the tile plan, and the torch reference of the
grouped kernel (grouped_experts_triton.py).

    plan = plan_tiles(slot_of, ids, weights, slots, block_m)    # fixed shapes, no host sync
    grouped_experts_torch(x, plan, experts, y)                 # y [T, H] fp32 += the share

The plan sorts the T*K (token, expert) pairs by cache slot (pairs of uncached experts last,
never in a tile) and cuts each slot's run into tiles of at most block_m pairs. Its sizes depend
only on T, K, the slot count and block_m, never on the routing: at most ceil(P / BM) + min(P, C)
tiles (each used slot adds at most one partial tile); the unused ones have tile_slot -1 and an
empty range, and their programs return at once. So a CUDA graph can hold the launch.

The reference walks the used tiles on the host (one sync: it is the CPU's path, and the layout's
check) with the weights the kernel multiplies by (DeviceExperts.slot_weights, exact in fp32),
fp32 products and the kernel's one rounding (h to the activation dtype before down).

Legend: T tokens, K picks per token, P = T*K pairs, C slots, E experts, H hidden, BM block_m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybrid.experts.device_layout import DeviceExperts


@dataclass
class TilePlan:
    token: torch.Tensor       # [P] int32: the token of each pair, pairs sorted by slot
    weight: torch.Tensor      # [P] fp32: its routing weight
    tile_slot: torch.Tensor   # [N] int32: the slot of each tile, -1 for an unused one
    tile_start: torch.Tensor  # [N] int32: its pairs are [start, end) of token / weight
    tile_end: torch.Tensor    # [N] int32
    block_m: int              # BM, pairs per tile at most


def block_m_for(tokens: int) -> int:
    """Pairs per tile for a batch of `tokens` (a shape, not the routing): 16 (the smallest
    tensor-core tile) for decode batches, 64 for prefill-sized ones."""
    return 16 if tokens <= 64 else 64


def plan_tiles(slot_of: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slots: int,
               block_m: int) -> TilePlan:
    """slot_of [E] long: the slot of each expert, -1 if uncached; ids [T, K] int, weights
    [T, K]; all on one device. Only fixed-shape ops: no host sync."""
    T, K = ids.shape
    P, C, BM = T * K, slots, block_m
    dev = ids.device
    slot = slot_of[ids.reshape(-1).long()]                                    # [P]
    key = torch.where(slot < 0, torch.full_like(slot, C), slot)               # misses -> C
    order = torch.argsort(key, stable=True)                                   # [P]
    token = torch.div(order, K, rounding_mode="floor").to(torch.int32)
    weight = weights.reshape(-1)[order].float()
    counts = torch.zeros(C + 1, dtype=torch.long, device=dev).scatter_add_(
        0, key, torch.ones_like(key))[:C]                                     # [C]
    tiles_per = torch.div(counts + BM - 1, BM, rounding_mode="floor")         # [C]
    tile_cum = torch.cumsum(tiles_per, 0)                                     # [C]
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    n = -(-P // BM) + min(P, C)
    j = torch.arange(n, device=dev)                                           # [N]
    s = torch.searchsorted(tile_cum, j, right=True)                           # [N] slot of tile j
    used = s < C
    sc = s.clamp(max=max(C - 1, 0))
    start = seg_start[sc] + (j - (tile_cum[sc] - tiles_per[sc])) * BM
    end = torch.minimum(start + BM, seg_end[sc])
    zero = torch.zeros_like(start)
    return TilePlan(token, weight,
                    torch.where(used, sc, torch.full_like(sc, -1)).to(torch.int32),
                    torch.where(used, start, zero).to(torch.int32),
                    torch.where(used, end, zero).to(torch.int32), BM)


def grouped_experts_torch(x: torch.Tensor, plan: TilePlan, experts: DeviceExperts,
                          y: torch.Tensor) -> None:
    """Add the device share to y [T, H] fp32: what grouped_experts_triton computes."""
    tiles = torch.stack((plan.tile_slot, plan.tile_start, plan.tile_end)).tolist()  # one sync
    weights, held = None, -1
    for s, a, b in zip(*tiles):
        if b <= a:
            continue
        if s != held:
            weights, held = experts.slot_weights(s), s    # gate [I, H], up [I, H], down [H, I]
        gate, up, down = weights
        tok = plan.token[a:b].long()                                          # [n]
        xs = x[tok].float()                                                   # [n, H]
        h = F.silu(xs @ gate.T) * (xs @ up.T) * plan.weight[a:b, None]        # [n, I] fp32
        h = h.to(x.dtype).float()                                             # the kernel's rounding
        y.index_add_(0, tok, h @ down.T)
