"""How the MoE layer hands its device tensors to a host executor, chosen once at load.

HostStaging: the device is the CPU, the tensors already are where the engine reads them.
PinnedStaging: a CUDA device; x, ids and weights are copied into pinned host buffers (real DMA
that does not stall the stream) and the stream is synchronised once, so the host buffers are
complete before the CPU reads them: the one host sync of a MoE layer.
"""

from __future__ import annotations

import torch


class HostStaging:
    def to_host(self, x, ids, w):
        return x, ids, w


class PinnedStaging:
    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def _copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._buffers[name] = buf
        buf.copy_(t, non_blocking=True)
        return buf

    def to_host(self, x, ids, w):
        out = self._copy("x", x), self._copy("ids", ids), self._copy("w", w)
        torch.cuda.current_stream().synchronize()
        return out


def staging_for(device: torch.device):
    return PinnedStaging() if torch.device(device).type == "cuda" else HostStaging()
