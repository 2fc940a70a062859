"""One MoE layer: router on the device, routed experts on a backend, shared expert meanwhile.

Step order (DESIGN.md, "One decode step"):
  1. router on the device -> ids [T, K], weights [T, K];
  2. x, ids, weights copied to the host (pinned buffers when the device is CUDA, so the copies
     are real DMA and do not stall) and the backend task submitted; submit returns at once;
  3. the shared expert (and experts cached on the device, if a GPU cache is set) run on the
     device while the CPU works;
  4. sync: the routed result comes back to the device and the parts are summed.
With no CUDA the "device" is the same CPU cores as the engine: the router runs natively
(csrc/router.h) on bf16 input, the shared expert runs before the submit instead of beside it,
and the CPU engine's job is a caller job (CpuMoE caller=): its workers start at submit, experts
cached "on the device" (a profile on a CPU device) run on this thread meanwhile, and this thread
computes its own share at sync (hybrid/api.py _split_threads has the numbers).

Router (DeepSeek-V3 "noaux_tc"): sigmoid scores; e_score_correction_bias is added for choosing
only; with n_group > 1 only the topk_group groups with the best sum-of-top-2 biased scores are
eligible; weights are the unbiased scores of the picked experts, renormalised when
norm_topk_prob, times routed_scaling_factor.

Legend: T tokens, E experts, G groups, K picked, H hidden.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from hybrid import native
from hybrid.config import ModelConfig


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] fp32, bias [E] fp32 -> (ids [T, K] int64, weights [T, K] fp32,
    biased scores [T, E] fp32 (for near-tie diagnostics))."""
    T = x.shape[0]
    E, G, K = config.n_routed_experts, config.n_group, config.num_experts_per_tok
    scores = F.linear(x.float(), weight.float()).sigmoid()  # [T, E]
    choice = scores + bias if bias is not None else scores  # [T, E]
    if G > 1:
        group_score = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(-1)  # [T, G]
        group_idx = group_score.topk(config.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_ok = group_ok[:, :, None].expand(T, G, E // G).reshape(T, E)
        choice = choice.masked_fill(~expert_ok, float("-inf"))
    ids = choice.topk(K, dim=-1, sorted=False)[1]  # [T, K]
    w = scores.gather(1, ids)  # [T, K]
    if config.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * config.routed_scaling_factor, choice


class StepTimer:
    """Accumulates seconds per phase (router, experts, wait, shared) when enabled; bench/e2e.py
    reads it. Off by default: timing needs device syncs that would slow a normal run."""

    def __init__(self):
        self.enabled = False
        self.totals: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds


class MoELayer:
    def __init__(self, config: ModelConfig, layer: int, gate_weight: torch.Tensor,
                 bias: torch.Tensor | None, routed, shared=None, timer: StepTimer | None = None):
        self.config, self.layer = config, layer
        self.gate_weight = gate_weight  # [E, H] fp32 on device
        self.bias = bias  # [E] fp32 on device (e_score_correction_bias) or None
        self.routed = routed  # backend with submit(x, ids, w) / sync() -> [T, H] fp32
        self.shared = shared  # callable [T, H] -> [T, H] on device, or None
        self.timer = timer or StepTimer()
        self.trace = None  # optional callable(layer, ids [T, K]) for routing traces (planner)
        # Optional callable(layer, ids [T, K]) for online re-placement (planner/online.py's
        # LiveReplacement.observe); separate from `trace` so `hybrid profile` keeps its hook.
        self.observe = None
        # Optional hybrid.experts.gpu_cache.GpuExpertCache: experts held on the device; its
        # mask makes the CPU skip them, so each (token, expert) pair runs exactly once.
        self.gpu_cache = None
        self._pinned: dict[str, torch.Tensor] = {}
        # Route in one native call when x is bf16 on the CPU (csrc/router.h): the ~12 torch ops
        # of route() cost more than the arithmetic in a decode step there. Tests switch it off.
        self._native = native.lib_or_none()
        self.native_route = self._native is not None

    def _to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t
        buf = self._pinned.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._pinned[name] = buf
        buf.copy_(t, non_blocking=True)
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        timing = self.timer.enabled
        sync_dev = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter() if timing else 0.0
        if self.native_route and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
            c = self.config  # ids int32 [T, K], w fp32 [T, K], on the host already (csrc/router.h)
            K = c.num_experts_per_tok
            ids = torch.empty(x.shape[0], K, dtype=torch.int32)
            w = torch.empty(x.shape[0], K, dtype=torch.float32)
            self._native.route(x, self.gate_weight, self.bias, c.n_group, c.topk_group, K,
                               c.norm_topk_prob, c.routed_scaling_factor, ids, w)
        else:
            ids, w, _ = route(x, self.gate_weight, self.bias, self.config)
        if self.trace is not None:
            self.trace(self.layer, ids)
        xh = self._to_host("x", x)
        idsh = self._to_host("ids", ids.to(torch.int32))
        wh = self._to_host("w", w)
        if x.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # host buffers complete before the CPU reads
        if self.observe is not None:
            self.observe(self.layer, idsh)  # the host copy: no device sync of its own
        if timing:
            sync_dev()
            t1 = time.perf_counter()
            self.timer.add("router", t1 - t0)
        on_gpu = x.device.type == "cuda"
        shared = None
        if not on_gpu:
            # No GPU: the "device" is these same CPU cores, so overlapping would only make the
            # shared expert and the engine fight for them. Run the shared expert first, then
            # the engine with every core. (The cached experts below run on this thread while the
            # engine's workers start; this thread's own share waits for sync.)
            t1 = time.perf_counter() if timing else 0.0
            shared = self.shared(x) if self.shared is not None else None
            if timing:
                t2 = time.perf_counter()
                self.timer.add("shared", t2 - t1)
                t1 = t2
        skip = self.gpu_cache.mask if self.gpu_cache is not None else None
        # No GPU, nothing cached: the engine adds its result straight into the shared expert's
        # bf16 output (one rounding of shared + routed, and no fp32 -> bf16 copy and add after).
        into_shared = (not on_gpu and shared is not None and self.gpu_cache is None
                       and getattr(self.routed, "caller", False) and shared.dtype == torch.bfloat16
                       and shared.is_contiguous())
        if into_shared:
            self.routed.submit(xh, idsh, wh, skip, out=shared, accumulate=True)
        else:
            self.routed.submit(xh, idsh, wh, skip)
        if timing:
            t2 = time.perf_counter()
            self.timer.add("experts_submit", t2 - t1)
        if on_gpu:  # the CPU works meanwhile
            shared = self.shared(x) if self.shared is not None else None
        cached = self.gpu_cache.forward(x, ids, w) if self.gpu_cache is not None else None
        if timing:
            sync_dev()
            t3 = time.perf_counter()
            self.timer.add("shared", t3 - t2)
        y = self.routed.sync().to(x.device, non_blocking=True)  # [T, H] fp32 (into_shared: shared)
        if timing:
            sync_dev()
            self.timer.add("experts_wait", time.perf_counter() - t3)
        if into_shared:
            return y  # shared + routed, bf16
        if cached is not None:
            y = y + cached
        y = y.to(x.dtype)
        return y if shared is None else y + shared
