"""GPU expert cache: the routed experts a profile places in VRAM, and their share of a MoE layer.

The "device" ExpertExecutor (hybrid/experts/executor.py; one per MoE layer, or none):

    cache = GpuExpertCache.from_profile(profile, layer_idx, host_executor, device, dtype)
    cache.held_mask()  # [E] bool, CPU tensor: True where the expert runs here; the MoE layer
                    # passes it to the host executor as its skip mask so each (token, expert)
                    # pair runs exactly once
    cache.submit(x, ids, weights); y_gpu = cache.sync()   # the protocol, over forward():
    y_gpu = cache.forward(x, ids, weights)   # x [T, H], ids [T, K] int, weights [T, K] fp32,
                    # all on cache.device; returns [T, H] fp32: sum over the pairs (t, k) whose
                    # expert is cached of weights[t, k] * expert(x[t]); pairs of other experts
                    # contribute nothing. The layer output is y_cpu + y_gpu + shared.
    cache.swap(out_expert, in_expert, source)   # online re-placement: replace one cached
                    # expert by another (same slot, same bytes); update the CPU mask with it

The cached weights are bf16 (what the planner's budget counts: 3 x H x I x 2 bytes per expert)
or fp32 for the precise path (dtype=torch.float32, 2x the bytes). They are dequantised once from
the packed CPU layout (PackedLayer.unpack_expert(e) -> gate [I, H], up [I, H], down [H, I] fp32),
moved to the device, and the fp32 copies dropped: the RAM copy stays the mmapped packed file.

Legend: T tokens, K picks per token, E routed experts, H hidden, I expert width, C cached
experts (slots), P (token, expert) pairs that hit the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hybrid.experts.executor import Capabilities


class GpuExpertCache:
    def __init__(self, experts, num_experts: int, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor):
        """experts: the C expert ids held, in slot order; gate/up [C, I, H], down [C, H, I]."""
        experts = [int(e) for e in experts]
        C = len(experts)
        if len(set(experts)) != C:
            raise ValueError("GpuExpertCache: an expert id appears twice")
        if any(not 0 <= e < num_experts for e in experts):
            raise ValueError(f"GpuExpertCache: expert ids must be in 0..{num_experts - 1}")
        if gate.dim() != 3 or gate.shape[0] != C or up.shape != gate.shape \
                or down.shape != (C, gate.shape[2], gate.shape[1]):
            raise ValueError(f"GpuExpertCache: expected gate/up [C={C}, I, H] and down [C, H, I], "
                             f"got {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
        self.num_experts = num_experts
        self.experts = experts
        self.gate, self.up, self.down = gate, up, down          # [C, I, H], [C, I, H], [C, H, I]
        self.device, self.dtype = gate.device, gate.dtype
        self.mask = torch.zeros(num_experts, dtype=torch.bool)            # [E], host
        self.mask[experts] = True
        self._slot = torch.full((num_experts,), -1, dtype=torch.long)     # [E] expert -> slot
        self._slot[experts] = torch.arange(C)
        self._result: torch.Tensor | None = None
        self._slot_dev = self._slot.to(self.device)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_source(cls, unpack_expert: Callable, experts, num_experts: int, device,
                    dtype=torch.bfloat16, progress: Callable | None = None) -> "GpuExpertCache":
        """unpack_expert(e) -> (gate [I, H], up [I, H], down [H, I]) fp32 (PackedLayer's)."""
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"GpuExpertCache: dtype must be bfloat16 or float32, got {dtype}")
        experts = [int(e) for e in experts]
        if not experts:
            z = torch.empty(0, 0, 0, device=device, dtype=dtype)
            return cls([], num_experts, z, z, z)
        g0, u0, d0 = unpack_expert(experts[0])
        I, H = g0.shape
        gate = torch.empty(len(experts), I, H, device=device, dtype=dtype)
        up = torch.empty_like(gate)
        down = torch.empty(len(experts), H, I, device=device, dtype=dtype)
        for i, e in enumerate(experts):
            g, u, d = (g0, u0, d0) if i == 0 else unpack_expert(e)
            if g.shape != (I, H) or u.shape != (I, H) or d.shape != (H, I):
                raise ValueError(f"GpuExpertCache: expert {e} has shapes {tuple(g.shape)}, "
                                 f"{tuple(u.shape)}, {tuple(d.shape)}; expected [I={I}, H={H}] "
                                 f"x2 and [H, I]")
            gate[i].copy_(g)
            up[i].copy_(u)
            down[i].copy_(d)
            if progress is not None:
                progress(i + 1, len(experts))
        return cls(experts, num_experts, gate, up, down)

    @classmethod
    def from_packed(cls, packed_layer, experts, device, dtype=torch.bfloat16,
                    progress=None) -> "GpuExpertCache":
        """From anything with unpack_expert(e) and num_experts: a PackedLayer
        (hybrid/experts/cpu_moe.py) or the host executor that runs the layer."""
        return cls.from_source(packed_layer.unpack_expert, experts, packed_layer.num_experts,
                               device, dtype, progress)

    @classmethod
    def from_profile(cls, profile, layer_idx: int, packed_layer, device, dtype=torch.bfloat16,
                     progress=None) -> "GpuExpertCache":
        """The experts `profile` (hybrid.planner.profile.Profile) caches for decoder layer
        `layer_idx`. The caller has already checked the profile against the model and VRAM
        (hybrid.planner.profile.load(path, model=spec, vram_bytes=...))."""
        return cls.from_packed(packed_layer, profile.experts_for_layer(layer_idx), device,
                               dtype, progress)

    # ---- the executor protocol ---------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(device=self.device.type, overlaps_caller=False, accumulates=True)

    def held_mask(self) -> torch.Tensor:
        """[E] bool on the host: the experts this cache runs (the host executor skips them)."""
        return self.mask

    def submit(self, x, ids, weights, skip=None, out=None, accumulate: bool = False) -> None:
        y = self.forward(x, ids, weights)
        if out is not None:
            out.add_(y.to(out.dtype)) if accumulate else out.copy_(y)
            y = out
        self._result = y

    def sync(self) -> torch.Tensor:
        y, self._result = self._result, None
        if y is None:
            raise RuntimeError("GpuExpertCache.sync() without a submit()")
        return y

    # ---- use ---------------------------------------------------------------------------------
    @property
    def num_cached(self) -> int:
        return len(self.experts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, K], weights [T, K] -> y [T, H] fp32 (cached experts' share)."""
        T, H = x.shape
        if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != T:
            raise ValueError(f"GpuExpertCache.forward: x {tuple(x.shape)}, ids "
                             f"{tuple(ids.shape)}, weights {tuple(weights.shape)}; expected "
                             f"[T, H], [T, K], [T, K]")
        y = torch.zeros(T, H, device=x.device, dtype=torch.float32)              # [T, H]
        if not self.experts:
            return y
        if H != self.gate.shape[2]:
            raise ValueError(f"GpuExpertCache.forward: hidden size {H}, cache holds experts "
                             f"with H={self.gate.shape[2]}")
        K = ids.shape[1]
        slots = self._slot_dev[ids.reshape(-1).long()]                            # [T*K]
        hit = torch.nonzero(slots >= 0).squeeze(1)                                # [P]
        if hit.numel() == 0:
            return y
        slot_p = slots[hit]                                                       # [P]
        order = torch.argsort(slot_p, stable=True)
        slot_p, pair = slot_p[order], hit[order]
        tok_p = pair // K                                                         # [P]
        w_p = weights.reshape(-1)[pair].float()                                   # [P]
        # One host sync for the group boundaries: the loop below runs per cached expert hit.
        uniq, counts = torch.unique_consecutive(slot_p, return_counts=True)
        xs_all = x[tok_p].to(self.dtype)                                          # [P, H]
        start = 0
        for s, n in zip(uniq.tolist(), counts.tolist()):
            xs = xs_all[start:start + n]                                          # [n, H]
            h = F.silu(xs @ self.gate[s].T) * (xs @ self.up[s].T)                 # [n, I]
            out = (h @ self.down[s].T).float()                                    # [n, H]
            y.index_add_(0, tok_p[start:start + n], out * w_p[start:start + n, None])
            start += n
        return y

    def swap(self, out_expert: int, in_expert: int, unpack_expert: Callable) -> None:
        """Replace cached `out_expert` by `in_expert` in the same slot (online re-placement)."""
        out_expert, in_expert = int(out_expert), int(in_expert)
        if not self.mask[out_expert]:
            raise ValueError(f"GpuExpertCache.swap: expert {out_expert} is not cached")
        if not 0 <= in_expert < self.num_experts or self.mask[in_expert]:
            raise ValueError(f"GpuExpertCache.swap: expert {in_expert} is cached already or "
                             f"outside 0..{self.num_experts - 1}")
        s = int(self._slot[out_expert])
        g, u, d = unpack_expert(in_expert)
        self.gate[s].copy_(g)
        self.up[s].copy_(u)
        self.down[s].copy_(d)
        self.experts[s] = in_expert
        self.mask[out_expert], self.mask[in_expert] = False, True
        self._slot[out_expert], self._slot[in_expert] = -1, s
        self._slot_dev = self._slot.to(self.device)
