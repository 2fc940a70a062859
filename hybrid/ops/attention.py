"""Scaled dot-product attention over padded slot groups, bounded in memory: the torch form every
attention here ends in (MLA's expanded and absorbed forms, Qwen3's grouped-query form).

Legend: U slots, nh heads, Q queries per slot, L keys per slot, d / dv head widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES_BUDGET = 256 * 1024**2  # bytes of fp32 attention scores one SDPA call may materialise


def sdpa_chunked(q, k, v, mask, scale):
    """q [U, nh, Q, d], k [U, nh, L, d], v [U, nh, L, dv], mask [U, 1, Q, L] -> [U, nh, Q, dv].
    Where no fused kernel fits (MLA's head dims differ for q/k and v, and the absorbed form's
    are 576 wide), SDPA falls back to materialising [U, nh, Q, L] scores: 17 GB for 8K x 8K at
    64 heads. Splitting the queries bounds that at SCORES_BUDGET; results are identical."""
    U, nh, Q, _ = q.shape
    L = k.shape[2]
    step = max(1, SCORES_BUDGET // max(1, U * nh * L * 4))
    if step >= Q:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    outs = [F.scaled_dot_product_attention(q[:, :, i : i + step], k, v, attn_mask=mask[:, :, i : i + step],
                                           scale=scale) for i in range(0, Q, step)]
    return torch.cat(outs, dim=2)
