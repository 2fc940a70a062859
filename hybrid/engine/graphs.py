"""A decode step captured as CUDA graph segments with host work between them.

Why segments and not one graph with host callbacks (cudaLaunchHostFunc): the CPU experts of a
MoE layer need x and the routing on the host before they start, and their result on the device
before the layer's combine; both are true data dependencies, so the step waits for the host at
two points per MoE layer whichever way it is launched. A host callback inside the graph would
save the ~2 graph launches per layer (~2-4 us each, queued while the GPU still runs the previous
segment) but would run the CPU-expert submission on the CUDA driver's single callback thread,
where no CUDA call is allowed, a worker error cannot be raised, and Python (routing observers,
traces, online placement) cannot run without taking the GIL from a thread the driver blocks.
Segments keep every hand-off a plain Python call on the engine thread.

A step of a model with M MoE layers becomes 2M + 1 segments:

    segment 0      embedding rows in .. attention and router of the first MoE layer, the D2H
                   copies of its x / ids / weights (side stream, joined)
    host           wait for segment 0 (an event), routing observers, CPU experts submit
    segment 1      shared expert + the GPU-cached experts of that layer (runs while the CPU works)
    host           CPU experts sync (their result lands in a pinned buffer)
    segment 2      copy of that result to the device, combine, next layers .. the next hand-off
    ...
    segment 2M     .. final norm, LM head: the logits buffer

so a decode step costs 2M + 1 graph launches and M event waits (K2.5: M = 60, 121 launches per
token), against ~150 kernel launches per layer eager (~9,000 per token).

    rec = StepRecorder(pool)
    with rec.capturing(stream):            # captures segment 0 and begins segment 1 at each cut
        out = step()                       # stagings call rec.cut(fn, args, wait_device) at hand-offs
    graph = rec.graph                      # SegmentedGraph: graph.replay() runs the whole step
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class SegmentedGraph:
    """graphs[i] then actions[i] (host work), for every i; one more graph than actions."""

    def __init__(self, graphs: list, actions: list):
        self.graphs, self.actions = graphs, actions
        self._done = torch.cuda.Event()

    @property
    def launches(self) -> int:
        """Graph launches per replay (one per segment)."""
        return len(self.graphs)

    def replay(self) -> None:
        for i, g in enumerate(self.graphs):
            g.replay()
            if i < len(self.actions):
                fn, args, wait_device = self.actions[i]
                if wait_device:  # the host reads what this segment copied out
                    self._done.record()
                    self._done.synchronize()
                self._host(fn, args)

    def _host(self, fn, args) -> None:
        """The host work at a hand-off (one place, so HostSyncCheck can leave it unwatched)."""
        fn(*args)


class StepRecorder:
    """Captures a step into segments; the stagings (hybrid/experts/staging.py) cut it at each
    hand-off with the host work to run there."""

    def __init__(self, pool=None):
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self._graphs: list = []
        self._actions: list = []
        self._open = None
        self.graph: SegmentedGraph | None = None

    def _begin(self) -> None:
        self._open = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (a server's) does not void the capture
        self._open.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def _end(self) -> None:
        self._open.capture_end()
        self._graphs.append(self._open)
        self._open = None

    def cut(self, fn, args: tuple, wait_device: bool) -> None:
        """End the open segment here; at replay, run fn(*args) after it (after waiting for it
        when wait_device), then the next segment."""
        self._end()
        self._actions.append((fn, tuple(args), wait_device))
        self._begin()

    @contextmanager
    def capturing(self, stream):
        with torch.cuda.stream(stream):
            self._begin()
            try:
                yield self
            except BaseException:
                if self._open is not None:
                    try:
                        self._open.capture_end()
                    except RuntimeError:
                        pass  # the capture was invalidated by the error itself
                raise
            self._end()
        self.graph = SegmentedGraph(self._graphs, self._actions)
