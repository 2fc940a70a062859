"""Routing rules. One file per rule; each rule is a small frozen dataclass that says which
router tensors it reads (`tensors(prefix)`), and has a torch body and a native CPU body:

    rule = NoAuxTC(num_experts=384, top_k=8, n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=2.827)
    router = Router(rule, {"weight": w [E, H] fp32, "bias": b [E] fp32}, lib=ops.native_lib())
    ids, weights = router(x)      # x [T, H] -> ids [T, K] int32, weights [T, K] fp32

The body is chosen once, when the Router is made: native when the op set hands it the extension
(a bf16 CPU device) and the extension has the rule's kernel (`native_in(lib)`), torch
otherwise. A new rule is one file with a dataclass that has `tensors`, `torch_body`,
`native_body` and `native_in`.

Legend: T tokens, E experts, K picked, H hidden.
"""

from __future__ import annotations

import torch

from hybrid.experts.routers.noaux_tc import NoAuxTC
from hybrid.experts.routers.softmax_topk import SoftmaxTopK

RULES = {"noaux_tc": NoAuxTC, "softmax_topk": SoftmaxTopK}

__all__ = ["NoAuxTC", "RULES", "Router", "SoftmaxTopK"]


class Router:
    def __init__(self, rule, tensors: dict[str, torch.Tensor | None], lib=None):
        self.rule, self.tensors = rule, tensors
        # The extension when the native body runs (decided here, once), else None.
        self._lib = lib if lib is not None and rule.native_in(lib) else None

    @property
    def top_k(self) -> int:
        return self.rule.top_k

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lib is not None and x.dtype == torch.bfloat16 and x.is_contiguous():
            T, K = x.shape[0], self.rule.top_k  # results land on the host, where the CPU experts read them
            ids = torch.empty(T, K, dtype=torch.int32)
            w = torch.empty(T, K, dtype=torch.float32)
            self.rule.native_body(self._lib, x, self.tensors, ids, w)
            return ids, w
        ids, w, _ = self.rule.torch_body(x, self.tensors)
        return ids.to(torch.int32), w
