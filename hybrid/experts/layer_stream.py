"""Layerwise prefill: each MoE layer's routed experts, all of them, streamed from RAM to the
device for one large prefill chunk, double-buffered, and the whole layer's routed work run there
in one grouped launch (the "stream" executor; hybrid/runtime/layerwise.py picks it per chunk by
the cost model's rule).

    streamer = LayerStreamer(packed_layers, device, dtype)     # one per model, two buffers
    streamer.begin()                      # a chunk starts: layers 0 and 1 start copying
    ex = streamer.executor(j)             # the ExpertExecutor of the j-th MoE layer
    ex.submit(x, ids, w); y = ex.sync()   # waits (on the device) for layer j's copy, computes,
                                          # then starts layer j + 2's copy into the freed buffer

Buffer b = j % 2 holds MoE layer j. Its copy, on the copy stream: the host fills b's staging
(pinned on CUDA) from the mmapped packed layer, after waiting (on the host) for the event that
ends the previous copy out of that staging; the copy stream waits for `done[b]` (the compute
stream finished the layer b held before), copies UNPACK_GROUP experts at a time into a landing
zone and unpacks them into b's device layout (device_layout.py), then records `ready[b]`. The
compute stream waits for `ready[b]` before layer j's kernel and records `done[b]` after it. So
layer j + 1's copy runs while layer j computes, with events only, never a synchronize(). The
host fill of layer j + 2 runs on the calling thread right after layer j's kernel is queued,
while the device works through its queue: three stages (fill, PCIe + unpack, compute) each a
layer apart, the slowest setting the pace, as the cost model counts them (cost.py
layerwise_time). The copy stream's unpack of one group delays the next group's PCIe copy
(one stream); the unpack is a few passes at device memory speed, small beside PCIe.

The streams are an object (CudaStreams, or HostStreams on the CPU where every copy and kernel
runs in order and the events are markers that tests read back), so the buffer logic is the same
code on both. Only packed layers in our own formats stream (int4, int8, bf16); GGUF block types
(PackedLayer.from_gguf) stay on the CPU path in prefill.

Legend: E routed experts, L MoE layers, G experts unpacked at once, T tokens, K picks.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from hybrid.experts.device_layout import DeviceExperts, compact_batch, compact_format, host_bytes
from hybrid.experts.gpu_cache import GpuExpertCache
from hybrid.planner.device_memory import UNPACK_GROUP

STREAMABLE = ("int4", "int8", "bf16")


class CudaStreams:
    """The copy stream beside the current (compute) stream of a CUDA device."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._copy = torch.cuda.Stream(self.device)
        self.pinned = True

    def on_copy(self):
        return torch.cuda.stream(self._copy)

    def record(self, stream: str, tag: str):
        ev = torch.cuda.Event()
        ev.record(self._copy if stream == "copy" else torch.cuda.current_stream(self.device))
        return ev

    def wait(self, stream: str, event) -> None:
        (self._copy if stream == "copy" else torch.cuda.current_stream(self.device)).wait_event(event)

    def host_wait(self, event) -> None:
        event.synchronize()  # this one event (a copy out of host staging), not the device


class HostStreams:
    """The CPU: one stream in program order; events are (stream, tag) markers, and `log` keeps
    every record and wait so tests can check which buffer waited for which layer."""

    def __init__(self):
        self.pinned = False
        self.log: list[tuple[str, str, str]] = []

    def on_copy(self):
        return nullcontext()

    def record(self, stream: str, tag: str):
        self.log.append(("record", stream, tag))
        return (stream, tag)

    def wait(self, stream: str, event) -> None:
        self.log.append(("wait", stream, event[1]))

    def host_wait(self, event) -> None:
        self.log.append(("host_wait", "host", event[1]))


def check_streamable(layers) -> None:
    """ValueError naming the layer when layers (PackedLayer) cannot stream as one model."""
    first = layers[0]
    for j, lay in enumerate(layers):
        fmts = {lay.format, lay.up_format, lay.down_format}
        if len(fmts) != 1 or lay.format not in STREAMABLE:
            raise ValueError(f"layerwise prefill: MoE layer {j} holds experts in "
                             f"{'+'.join(sorted(fmts))}; only {', '.join(STREAMABLE)} layers stream "
                             f"(GGUF block types stay on the CPU path in prefill)")
        if (lay.format, lay.num_experts, lay.hidden, lay.intermediate) != \
                (first.format, first.num_experts, first.hidden, first.intermediate):
            raise ValueError(f"layerwise prefill: MoE layer {j} differs from layer 0 in format or "
                             f"shape; both buffers must hold any layer")


class LayerStreamer:
    def __init__(self, layers, device, dtype=torch.bfloat16, streams=None, group: int = UNPACK_GROUP,
                 backend: str | None = None):
        """layers: the MoE layers' PackedLayer (cpu_moe.py), in forward order; dtype: the
        activations' dtype (also the storage of bf16 experts)."""
        layers = list(layers)
        if not layers:
            raise ValueError("layerwise prefill: the model has no MoE layers")
        check_streamable(layers)
        self.layers, self.device = layers, torch.device(device)
        self.streams = streams or (CudaStreams(device) if self.device.type == "cuda" else HostStreams())
        first = layers[0]
        self.fmt, E, H, I = first.format, first.num_experts, first.hidden, first.intermediate
        self.num_experts, self.group = E, max(1, min(group, E))
        fmt = compact_format(self.fmt)
        # Two layer buffers, each with a cache over all E experts (slot e = expert e).
        self.caches = [GpuExpertCache(range(E), E, DeviceExperts(fmt, E, H, I, device, dtype), backend)
                       for _ in range(2)]
        sizes = [0 if a is None else a.nbytes for a in first.expert_arrays(0)]
        self._sizes = sizes
        self._staging = None          # [2][4] host [E, bytes], pinned on CUDA: made on first use
        self._landing = [torch.empty(self.group, n, dtype=torch.uint8, device=device) if n else None
                         for n in sizes]                                     # [4] device [G, bytes]
        self.held = [None, None]      # MoE layer (position) each buffer holds or is receiving
        self._ready = [None, None]    # copy stream: buffer b holds its layer
        self._done = [None, None]     # compute stream: buffer b's layer has been computed
        self._copied = [None, None]   # copy stream: staging b has been read

    @property
    def nbytes(self) -> int:
        """Device bytes of the two buffers (what device_memory.layerwise_bytes counts, less the
        landing zone and temporaries)."""
        return sum(c.nbytes for c in self.caches)

    # ---- the chunk ---------------------------------------------------------------------------
    def begin(self) -> None:
        """A layerwise chunk starts: the first two MoE layers start copying. The host staging
        (two layers of packed bytes, pinned on CUDA) is made on the first one, so a process
        that never prefills a long prompt never pins it."""
        if self._staging is None:
            pin, E = self.streams.pinned, self.num_experts
            self._staging = [[torch.empty(E, n, dtype=torch.uint8, pin_memory=pin) if n else None
                              for n in self._sizes] for _ in range(2)]
        self.held = [None, None]
        for j in range(min(2, len(self.layers))):
            self._prefetch(j)

    def executor(self, j: int) -> "StreamedLayer":
        return StreamedLayer(self, j)

    def acquire(self, j: int) -> GpuExpertCache:
        """Buffer j % 2, holding MoE layer j, for the compute stream (which waits for its copy)."""
        b = j % 2
        if self.held[b] != j:
            raise RuntimeError(f"layerwise prefill: MoE layer {j} was asked for, buffer {b} holds "
                               f"{self.held[b]} (layers must run in order after begin())")
        self.streams.wait("compute", self._ready[b])
        return self.caches[b]

    def release(self, j: int) -> None:
        """Layer j's kernel is queued: its buffer is free once the compute stream passes here;
        layer j + 2 starts copying into it."""
        b = j % 2
        self._done[b] = self.streams.record("compute", f"done {j}")
        if j + 2 < len(self.layers):
            self._prefetch(j + 2)

    def _prefetch(self, j: int) -> None:
        b, streams = j % 2, self.streams
        staging = self._staging[b]
        if self._copied[b] is not None:
            streams.host_wait(self._copied[b])    # the previous copy out of staging b is done
        lay = self.layers[j]
        for e in range(self.num_experts):         # the host fill: mmap -> (pinned) staging
            for dst, a in zip(staging, lay.expert_arrays(e)):
                if dst is not None:
                    dst[e].copy_(host_bytes(a))
        store = self.caches[b].store
        with streams.on_copy():
            if self._done[b] is not None:
                streams.wait("copy", self._done[b])   # the layer buffer b held has been computed
            E, G = self.num_experts, self.group
            for a in range(0, E, G):
                n = min(G, E - a)
                land = [None if t is None else t[:n] for t in self._landing]
                for dst, src in zip(land, staging):
                    if dst is not None:
                        dst.copy_(src[a:a + n], non_blocking=True)
                scales = [None if t is None else t.view(torch.int16) for t in land]
                gate, up, down = compact_batch(self.fmt, land[0], scales[1], land[2], scales[3],
                                               lay.hidden, lay.intermediate)
                store.write_batch(a, gate, up, down)
            self._copied[b] = self._ready[b] = streams.record("copy", f"ready {j}")
        self.held[b] = j


class StreamedLayer:
    """The ExpertExecutor of one MoE layer in a layerwise chunk: every routed expert, on the
    device (hybrid/experts/executor.py)."""

    def __init__(self, streamer: LayerStreamer, j: int):
        self.streamer, self.j = streamer, j
        self.num_experts = streamer.num_experts
        self._result = None

    def capabilities(self):
        return self.streamer.caches[0].capabilities()

    def held_mask(self) -> torch.Tensor:
        return torch.ones(self.num_experts, dtype=torch.bool)

    def submit(self, x, ids, weights, skip=None, out=None, accumulate: bool = False) -> None:
        cache = self.streamer.acquire(self.j)
        cache.submit(x, ids, weights, out=out, accumulate=accumulate)
        self._result = cache.sync()
        self.streamer.release(self.j)

    def sync(self) -> torch.Tensor:
        y, self._result = self._result, None
        if y is None:
            raise RuntimeError("StreamedLayer.sync() without a submit()")
        return y


@contextmanager
def streaming(moe_layers, streamer: LayerStreamer):
    """Within: every MoE layer (in forward order) runs its routed work on its streamed layer."""
    streamer.begin()
    for j, moe in enumerate(moe_layers):
        moe.set_whole_layer(streamer.executor(j))
    try:
        yield
    finally:
        for moe in moe_layers:
            moe.set_whole_layer(None)
