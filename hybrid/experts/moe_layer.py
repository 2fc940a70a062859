"""One MoE layer: route -> split the picks by placement -> submit the host share -> run the
device share and the shared expert -> sync -> combine (DESIGN.md, "Expert executors").

    layer = MoELayer(layer_idx, router, host, shared=mlp, staging=staging_for(device))
    layer.set_device_experts(cache)            # experts a placement holds in VRAM (or None)
    layer.add_observer(on_routing=f, on_phase=g)
    layer.set_deferral(k, twin, previous)      # expert deferral (below), or k=0: off
    layer.set_whole_layer(executor)            # a chunk's routed work all on one executor, or None
    y = layer(x)                               # [T, H] -> [T, H]

The router runs where the op set put it (hybrid/experts/routers/); the host executor (the CPU
engine, or the torch reference) gets host copies of x, ids and weights (staging.py) and skips
the experts the device executor holds, so each (token, expert) pair runs exactly once. What may
overlap what is read from the executors' declared capabilities, never from the device:
  - a host executor that overlaps its caller (the CPU engine beside a GPU) is submitted first,
    and the shared expert and the device experts run meanwhile;
  - one that does not (the engine on the same cores as the "device", or the torch reference)
    runs after the shared expert, and when nothing is cached on the device and it accumulates,
    adds its result straight into the shared expert's bf16 output (one rounding, no extra add).

Expert deferral (optional, off unless asked; KTransformers reports up to 1.45x decode): the k
lowest-weight picks of each token in this layer go to a second job on the host executor's twin
(same weights, a second job in flight; those of them the device holds still run there, now);
its result is added to the *next* MoE layer's output instead of this one's, so the CPU computes
it while the device runs the next layer's attention. It changes the model's math (the next layer's attention does not see those k
experts): bench/deferral.py measures the cost. The last MoE layer never defers.

Whole layer (layerwise prefill, hybrid/experts/layer_stream.py): while an executor is set with
set_whole_layer, every pick runs on it (the device holds all the layer's experts for the chunk)
and the host executor, the cache and deferral sit out: route -> that executor and the shared
expert -> combine, the same sum. The runtime sets it for the chunks the cost model streams.

Observers: on_routing(layer, ids [T, K] int32, host) for traces and online placement;
on_phase(layer, phase, seconds) for timing (router, shared, experts_submit, experts_wait).
Timing waits for the device at each phase edge, so it is on only while a phase observer is set.

Legend: T tokens, E experts, K picked, H hidden.
"""

from __future__ import annotations

import time

import torch

from hybrid.experts.staging import HostStaging


class MoELayer:
    def __init__(self, layer: int, router, host, shared=None, staging=None):
        self.layer = layer
        self.router = router      # Router: x [T, H] -> ids [T, K] int32, weights [T, K] fp32
        self.host = host          # ExpertExecutor over host memory
        self.shared = shared      # callable [T, H] -> [T, H] on the device, or None
        self.staging = staging or HostStaging()
        self._device = None       # ExpertExecutor holding some experts on the device, or None
        self._on_routing: list = []
        self._on_phase: list = []
        self._defer = 0           # picks per token deferred to the next MoE layer
        self._twin = None         # the host executor's twin that runs them
        self._previous = None     # the MoE layer whose deferred share this one adds
        self._whole = None        # executor running all the routed work (layerwise), or None

    # ---- attach points (the runtime's builder and tools call these) -----------------------------
    def set_device_experts(self, executor) -> None:
        """Experts held on the device (a GpuExpertCache), or None to hold none."""
        self._device = executor

    def device_experts(self):
        return self._device

    def host_experts(self):
        return self.host

    def set_deferral(self, k: int, twin=None, previous: "MoELayer | None" = None) -> None:
        """Defer this layer's k lowest-weight host picks to the next MoE layer (run by `twin`,
        hybrid.experts.executor's twin()); `previous`: the MoE layer whose deferred share this
        layer adds to its output (None for the first)."""
        top_k = self.router.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < top_k:
            raise ValueError(f"layer {self.layer}: deferred experts must be an integer in 0..{top_k - 1}, got {k!r}")
        if k and twin is None:
            raise ValueError(f"layer {self.layer}: deferring experts needs the host executor's twin")
        self._defer, self._twin, self._previous = k, (twin if k else None), previous

    def set_whole_layer(self, executor) -> None:
        """Run every routed pick on `executor` (one holding all the layer's experts on the
        device: a layerwise prefill chunk), or None: the placement's split again."""
        self._whole = executor

    def add_observer(self, on_routing=None, on_phase=None) -> None:
        if on_routing is not None:
            self._on_routing.append(on_routing)
        if on_phase is not None:
            self._on_phase.append(on_phase)

    def remove_observer(self, fn) -> None:
        for lst in (self._on_routing, self._on_phase):
            if fn in lst:
                lst.remove(fn)

    # ---- the layer ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        if self._whole is not None:
            return self._whole_layer(x)
        clock = _Clock(self, x) if self._on_phase else None
        ids, w = self.router(x)
        xh, idsh, wh = self.staging.to_host(x, ids, w)  # asynchronous on a device
        if clock:
            clock.mark("router")
        dev = self._device
        caps = self.host.capabilities()
        shared = None
        if not caps.overlaps_caller:
            # The host executor shares this thread's cores: overlapping would only make the
            # shared expert and the engine fight for them. Shared expert first, then the engine.
            shared = self.shared(x) if self.shared is not None else None
            if clock:
                clock.mark("shared")
        into_shared = (dev is None and shared is not None and caps.accumulates and shared.dtype == torch.bfloat16
                       and shared.is_contiguous() and shared.device.type == caps.device)
        out = shared if into_shared else self.staging.host_out(x.shape[0], x.shape[1])
        # The hand-off: the host copies are complete from here on (the one wait of the layer).
        self.staging.on_host(self._submit_host, xh, idsh, wh, out, into_shared)
        if clock:
            clock.mark("experts_submit")
        if caps.overlaps_caller and self.shared is not None:  # the host works meanwhile
            shared = self.shared(x)
        cached = None
        if dev is not None:
            dev.submit(x, ids.to(x.device), w.to(x.device))
            cached = dev.sync()
        if clock:
            clock.mark("shared")
        y = self.staging.from_host(self._sync_host, x)  # [T, H] fp32 on x's device
        if clock:
            clock.mark("experts_wait")
        if into_shared:
            return y  # shared + routed, bf16
        if cached is not None:
            y = y + cached
        y = y.to(x.dtype)
        return y if shared is None else y + shared

    def _whole_layer(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        ids, w = self.router(x)
        if self._on_routing:
            idsh = ids.cpu()  # observers read host ids (a sync; only while one is set)
            for fn in self._on_routing:
                fn(self.layer, idsh)
        self._whole.submit(x, ids.to(x.device), w.to(x.device))
        shared = self.shared(x) if self.shared is not None else None
        y = self._whole.sync().to(x.dtype)
        return y if shared is None else y + shared

    def _submit_host(self, xh, idsh, wh, out, accumulate: bool) -> None:
        """Host side of the hand-off: observers see the host ids, the host executor starts."""
        for fn in self._on_routing:
            fn(self.layer, idsh)
        dev = self._device
        skip = dev.held_mask() if dev is not None else None
        if self._defer:
            # Picks by falling weight (host tensors): the last k of each token go to the twin.
            wh, order = wh.sort(dim=1, descending=True)  # [T, K]
            idsh = idsh.gather(1, order)
            keep = idsh.shape[1] - self._defer
            self._twin.submit(xh, idsh[:, keep:].contiguous(), wh[:, keep:].contiguous(), skip,
                              out=self.staging.host_out(xh.shape[0], xh.shape[1], "deferred"))
            idsh, wh = idsh[:, :keep].contiguous(), wh[:, :keep].contiguous()
        self.host.submit(xh, idsh, wh, skip, out=out, accumulate=accumulate)

    def _sync_host(self):
        """Host side of the return: this layer's host share, plus the previous layer's deferred
        share when it defers (a host add: [T, H] fp32)."""
        y = self.host.sync()
        if self._previous is not None:
            y += self._previous.deferred_sync()
        return y

    def deferred_sync(self) -> torch.Tensor:
        """This layer's deferred share [T, H] fp32 (host), waited for (the next MoE layer asks)."""
        return self._twin.sync()


class _Clock:
    """Seconds per phase edge, after waiting for the device (only while timing is observed)."""

    def __init__(self, layer: MoELayer, x: torch.Tensor):
        self.layer = layer
        self.wait = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        self.wait()
        now = time.perf_counter()
        for fn in self.layer._on_phase:
            fn(self.layer.layer, phase, now - self.t)
        self.t = now
