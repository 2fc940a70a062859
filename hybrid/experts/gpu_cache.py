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
    cache.swap(out_expert, in_expert, compact_expert)   # online re-placement: replace one
                    # cached expert by another (same slot, same bytes); update the CPU mask with it

The cached weights stay in the host executor's own bits (device_layout.py): INT4 or INT8 group-32
experts of a packed CPU layer as they are (24.8 MB per K2.5 expert in INT4, what the planner's
budget counts: ModelSpec.expert_bytes of the storage format), dense ones (the torch reference
executor's, a bf16 packed layer's) in the compute dtype. They come from the source's
compact_expert(e), bit for bit, go to the device, and the host copies are dropped: the RAM copy
stays the mmapped packed file.

The share runs as one grouped launch per layer (grouped_experts.py plans the tiles with fixed
shapes and no host sync): the Triton kernel on a CUDA device (grouped_experts_triton.py), its
torch reference elsewhere (the CPU, HYBRID_DEVICE_OPS=torch), chosen once at construction.

Legend: T tokens, K picks per token, E routed experts, H hidden, I expert width, C cached
experts (slots).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybrid.experts.device_layout import CompactExpert, DeviceExperts
from hybrid.experts.executor import Capabilities
from hybrid.experts.grouped_experts import block_m_for, grouped_experts_torch, plan_tiles

BACKENDS = ("triton", "torch")


def default_backend(device: torch.device) -> str:
    """The Triton kernel on CUDA (when triton is installed), the torch reference elsewhere."""
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return "torch"
    return "triton"


def _kernel(backend: str):
    if backend == "torch":
        return grouped_experts_torch
    from hybrid.experts.grouped_experts_triton import grouped_experts_triton  # noqa: PLC0415

    return grouped_experts_triton


class GpuExpertCache:
    def __init__(self, experts, num_experts: int, store: DeviceExperts | None,
                 backend: str | None = None):
        """experts: the C expert ids held, in slot order; store: their weights (C slots; None
        when C is 0); backend: "triton" or "torch" (None: default_backend of the device)."""
        experts = [int(e) for e in experts]
        C = len(experts)
        if len(set(experts)) != C:
            raise ValueError("GpuExpertCache: an expert id appears twice")
        if any(not 0 <= e < num_experts for e in experts):
            raise ValueError(f"GpuExpertCache: expert ids must be in 0..{num_experts - 1}")
        if (store.slots if store is not None else 0) != C:
            raise ValueError(f"GpuExpertCache: {C} experts but "
                             f"{0 if store is None else store.slots} slots of weights")
        self.num_experts = num_experts
        self.experts = experts
        self.store = store
        self.device = store.gate_up_q.device if store is not None else torch.device("cpu")
        backend = backend or default_backend(self.device)
        if backend not in BACKENDS:
            raise ValueError(f"GpuExpertCache: backend must be one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        self.backend = backend
        self._run = _kernel(backend)
        self.mask = torch.zeros(num_experts, dtype=torch.bool)            # [E], host
        self.mask[experts] = True
        self._slot = torch.full((num_experts,), -1, dtype=torch.long)     # [E] expert -> slot
        self._slot[experts] = torch.arange(C)
        self._result: torch.Tensor | None = None
        self._slot_dev = self._slot.to(self.device)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_source(cls, compact_expert: Callable[[int], CompactExpert], experts, num_experts: int,
                    device, dtype=torch.bfloat16, progress: Callable | None = None,
                    backend: str | None = None) -> "GpuExpertCache":
        """compact_expert(e, device) -> CompactExpert (an executor's or PackedLayer's: the
        expert's bits, unpacked on the device). dtype: the activations' dtype, bf16 or fp32
        (also the storage of dense experts)."""
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"GpuExpertCache: dtype must be bfloat16 or float32, got {dtype}")
        experts = [int(e) for e in experts]
        if not experts:
            return cls([], num_experts, None, backend)
        if any(not 0 <= e < num_experts for e in experts):
            raise ValueError(f"GpuExpertCache: expert ids must be in 0..{num_experts - 1}")
        first = compact_expert(experts[0], device)
        first.check(f"GpuExpertCache: expert {experts[0]}")
        H, I = first.shape
        store = DeviceExperts(first.format, len(experts), H, I, device, dtype)
        for i, e in enumerate(experts):
            ex = first if i == 0 else compact_expert(e, device)
            store.write(i, ex, f"GpuExpertCache: expert {e}")
            if progress is not None:
                progress(i + 1, len(experts))
        return cls(experts, num_experts, store, backend)

    @classmethod
    def from_packed(cls, packed_layer, experts, device, dtype=torch.bfloat16,
                    progress=None, backend: str | None = None) -> "GpuExpertCache":
        """From anything with compact_expert(e) and num_experts: a PackedLayer
        (hybrid/experts/cpu_moe.py) or the host executor that runs the layer."""
        return cls.from_source(packed_layer.compact_expert, experts, packed_layer.num_experts,
                               device, dtype, progress, backend)

    @classmethod
    def from_profile(cls, profile, layer_idx: int, packed_layer, device, dtype=torch.bfloat16,
                     progress=None) -> "GpuExpertCache":
        """The experts `profile` (hybrid.planner.profile.Profile) caches for decoder layer
        `layer_idx`. The caller has already checked the profile against the model and VRAM
        (hybrid.planner.profile.load(path, model=spec, vram_bytes=...))."""
        return cls.from_packed(packed_layer, profile.experts_for_layer(layer_idx), device,
                               dtype, progress)

    def head(self, n: int) -> "GpuExpertCache":
        """A cache of this one's first n experts, sharing its device memory (n >= 1)."""
        return GpuExpertCache(self.experts[:n], self.num_experts, self.store.head(n), self.backend)

    # ---- the executor protocol ---------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(device=self.device.type, overlaps_caller=False, accumulates=True)

    def held_mask(self) -> torch.Tensor:
        """[E] bool on the host: the experts this cache runs (the host executor skips them)."""
        return self.mask

    def submit(self, x, ids, weights, skip=None, out=None, accumulate: bool = False) -> None:
        if out is not None and accumulate and out.dtype == torch.float32 and out.is_contiguous():
            self._result = self.forward(x, ids, weights, out=out)   # added in place
            return
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
        return 0 if self.store is None else self.store.nbytes

    @property
    def format(self) -> str | None:
        """"int4", "int8" or "dense" (None when empty)."""
        return None if self.store is None else self.store.format

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], ids [T, K], weights [T, K] -> y [T, H] fp32 (cached experts' share);
        out: a zeroed or partial [T, H] fp32 buffer to add the share to instead (returned)."""
        T, H = x.shape
        if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != T:
            raise ValueError(f"GpuExpertCache.forward: x {tuple(x.shape)}, ids "
                             f"{tuple(ids.shape)}, weights {tuple(weights.shape)}; expected "
                             f"[T, H], [T, K], [T, K]")
        y = out if out is not None else torch.zeros(T, H, device=x.device, dtype=torch.float32)
        if self.store is None or T == 0:
            return y
        if H != self.store.hidden:
            raise ValueError(f"GpuExpertCache.forward: hidden size {H}, cache holds experts "
                             f"with H={self.store.hidden}")
        plan = plan_tiles(self._slot_dev, ids, weights, self.store.slots, block_m_for(T))
        self._run(x.contiguous(), plan, self.store, y)
        return y

    def swap(self, out_expert: int, in_expert: int, compact_expert: Callable) -> None:
        """Replace cached `out_expert` by `in_expert` in the same slot (online re-placement);
        compact_expert(e, device) -> CompactExpert, the source's."""
        out_expert, in_expert = int(out_expert), int(in_expert)
        if not self.mask[out_expert]:
            raise ValueError(f"GpuExpertCache.swap: expert {out_expert} is not cached")
        if not 0 <= in_expert < self.num_experts or self.mask[in_expert]:
            raise ValueError(f"GpuExpertCache.swap: expert {in_expert} is cached already or "
                             f"outside 0..{self.num_experts - 1}")
        s = int(self._slot[out_expert])
        self.store.write(s, compact_expert(in_expert, self.device),
                         f"GpuExpertCache.swap: expert {in_expert}")
        self.experts[s] = in_expert
        self.mask[out_expert], self.mask[in_expert] = False, True
        self._slot[out_expert], self._slot[in_expert] = -1, s
        self._slot_dev = self._slot.to(self.device)
