"""DeepSeek-V3 "noaux_tc" routing (DeepSeek-V3/R1, Kimi K2/K2.5).

Sigmoid scores; e_score_correction_bias is added for choosing only; with n_group > 1 only the
topk_group groups with the best sum-of-top-2 biased scores are eligible; weights are the unbiased
scores of the picked experts, renormalised when norm_topk_prob, times routed_scaling_factor.
Native body: csrc/models/router.h `route`, same picks and weights within 1e-5.

Legend: T tokens, E experts, G groups, K picked, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoAuxTC:
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    @staticmethod
    def tensors(prefix: str) -> dict[str, str]:
        """Router tensors by role -> checkpoint module path (all [E, H] / [E], read as fp32)."""
        return {"weight": f"{prefix}.gate.weight", "bias": f"{prefix}.gate.e_score_correction_bias"}

    def torch_body(self, x: torch.Tensor, t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, K] int64, weights [T, K] fp32, biased scores [T, E] fp32 (for
        near-tie diagnostics))."""
        T = x.shape[0]
        E, G, K = self.num_experts, self.n_group, self.top_k
        scores = F.linear(x.float(), t["weight"].float()).sigmoid()  # [T, E]
        bias = t.get("bias")
        choice = scores + bias if bias is not None else scores  # [T, E]
        if G > 1:
            group_score = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(-1)  # [T, G]
            group_idx = group_score.topk(self.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
            group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_ok = group_ok[:, :, None].expand(T, G, E // G).reshape(T, E)
            choice = choice.masked_fill(~expert_ok, float("-inf"))
        ids = choice.topk(K, dim=-1, sorted=False)[1]  # [T, K]
        w = scores.gather(1, ids)  # [T, K]
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * self.routed_scaling_factor, choice

    @staticmethod
    def native_in(lib) -> bool:
        return True  # csrc/models/router.h route: in every build

    def native_body(self, lib, x: torch.Tensor, t: dict, ids: torch.Tensor, w: torch.Tensor) -> None:
        """x [T, H] bf16 CPU -> ids [T, K] int32, w [T, K] fp32, written in place."""
        lib.route(x, t["weight"], t.get("bias"), self.n_group, self.topk_group, self.top_k,
                  self.norm_topk_prob, self.routed_scaling_factor, ids, w)
