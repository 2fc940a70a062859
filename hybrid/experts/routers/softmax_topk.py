"""Softmax top-k routing (Qwen3-MoE, Mixtral): softmax over the E router logits, the K most
probable experts, their probabilities as weights, renormalised to sum 1 when norm_topk_prob.
Native body: csrc/models/router.h `route_softmax` (ties go to the lower expert index, as torch.topk's
do on the CPU for these sizes).

Legend: T tokens, E experts, K picked, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SoftmaxTopK:
    num_experts: int
    top_k: int
    norm_topk_prob: bool

    @staticmethod
    def tensors(prefix: str) -> dict[str, str]:
        return {"weight": f"{prefix}.gate.weight"}

    def torch_body(self, x: torch.Tensor, t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (ids [T, K] int64, weights [T, K] fp32, probabilities [T, E] fp32)."""
        probs = F.linear(x.float(), t["weight"].float()).softmax(dim=-1)  # [T, E]
        w, ids = probs.topk(self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return ids, w, probs

    @staticmethod
    def native_in(lib) -> bool:
        return True  # csrc/models/router.h route_softmax: in every build

    def native_body(self, lib, x: torch.Tensor, t: dict, ids: torch.Tensor, w: torch.Tensor) -> None:
        lib.route_softmax(x, t["weight"], self.top_k, self.norm_topk_prob, ids, w)
