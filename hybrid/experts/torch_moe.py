"""Routed experts in plain torch: the reference executor.

Each expert's gate/up/down weights are held as ordinary tensors of any float dtype; work is
grouped by expert (one F.linear triple per expert that has tokens). An ExpertExecutor
(hybrid/experts/executor.py); submit() here computes at once, on the tensors' device.

Legend: B tokens, K picked per token, E experts, H hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.experts.device_layout import CompactExpert
from hybrid.experts.executor import Capabilities


class TorchMoE:
    def __init__(self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]):
        # gate[e], up[e]: [I, H]; down[e]: [H, I]
        if not (len(gate) == len(up) == len(down)) or not gate:
            raise ValueError("TorchMoE: gate, up and down need one tensor per expert, same count")
        self.gate, self.up, self.down = gate, up, down
        self.num_experts = len(gate)
        self.hidden = gate[0].shape[1]
        self._result: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gate + self.up + self.down)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                skip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, H], ids [B, K] int, weights [B, K] fp32 -> y [B, H] fp32.
        skip_mask [E] bool: experts computed elsewhere contribute nothing here."""
        B, H = x.shape
        if H != self.hidden:
            raise ValueError(f"TorchMoE: x has hidden size {H}, experts expect {self.hidden}")
        y = torch.zeros(B, H, dtype=torch.float32, device=x.device)
        flat_ids = ids.reshape(-1).long()  # [B*K]
        if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= self.num_experts):
            raise IndexError(f"TorchMoE: expert ids must be in 0..{self.num_experts - 1}")
        flat_w = weights.reshape(-1).float()
        token_of = torch.arange(B, device=x.device).repeat_interleave(ids.shape[1])  # [B*K]
        order = torch.argsort(flat_ids, stable=True)
        experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            sel = order[start : start + n]
            start += n
            if skip_mask is not None and bool(skip_mask[e]):
                continue
            tok = token_of[sel]
            w_dtype = self.gate[e].dtype
            xe = x[tok].to(w_dtype)  # [n, H]
            h = F.silu(F.linear(xe, self.gate[e])) * F.linear(xe, self.up[e])  # [n, I]
            out = F.linear(h, self.down[e]).float()  # [n, H]
            y.index_add_(0, tok, out * flat_w[sel, None])
        return y

    def capabilities(self) -> Capabilities:
        return Capabilities(device=self.gate[0].device.type, overlaps_caller=False, accumulates=True)

    def unpack_expert(self, e: int):
        return self.gate[e].float(), self.up[e].float(), self.down[e].float()

    def compact_expert(self, e: int, device=None) -> CompactExpert:
        return CompactExpert.dense(*(t[e].to(device or t[e].device)
                                     for t in (self.gate, self.up, self.down)))

    def twin(self) -> "TorchMoE":
        """A second executor over the same tensors: a second job in flight (expert deferral)."""
        return TorchMoE(self.gate, self.up, self.down)

    def submit(self, x, ids, weights, skip=None, out=None, accumulate: bool = False) -> None:
        y = self.forward(x, ids, weights, skip)
        if out is not None:
            # One rounding to out's dtype, as `y.to(out.dtype) + out` would do.
            out.add_(y.to(out.dtype)) if accumulate else out.copy_(y)
            y = out
        self._result = y

    def sync(self) -> torch.Tensor:
        if self._result is None:
            raise RuntimeError("TorchMoE.sync() without a submit()")
        y, self._result = self._result, None
        return y
