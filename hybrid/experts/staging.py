"""How the MoE layer hands work to a host executor and takes its result back: the only points
where a decode step on a device waits for the host, chosen once at load (staging_for).

    xh, idsh, wh = staging.to_host(x, ids, w)      # device -> host copies (asynchronous)
    staging.on_host(submit, xh, idsh, wh, out)      # host work once the copies are complete
    ...                                             # device work meanwhile (shared, cached experts)
    y = staging.from_host(sync, like=x)             # host result (waited for) -> on the device

HostStaging: the device is the CPU (or the executor's tensors live on the device): nothing to
copy, host work runs at once.
PinnedStaging: a CUDA device. x, ids and weights are copied into pinned host buffers on a side
stream and an event is recorded after them; on_host waits for that event only (not for the
stream), so kernels queued meanwhile keep the GPU busy. The CPU result is written into a pinned
buffer (host_out) and copied back on the compute stream. A batch of a power-of-two number of
rows up to STATIC_ROWS has buffers of its own, allocated once, so a decode step from static
buffers (hybrid/engine/step_runner.py, whose batch buckets are those sizes) hands the same
addresses every time; other sizes (prefill chunks) share one growing buffer per tensor.

While a step is captured into CUDA graphs (recording), each hand-off ends the current graph
segment and records the host work to run between segments at replay (StepRecorder in
hybrid/engine/graphs.py): the step becomes segment, host, segment, host, ... with the host work
at exactly these points.

Legend: T tokens, H hidden, K picked.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

STATIC_ROWS = 64  # largest batch (a power of two) with buffers of its own


def static_rows(rows: int) -> bool:
    """Whether a batch of `rows` gets buffers of its own (a decode step's batch bucket)."""
    return 0 < rows <= STATIC_ROWS and rows & (rows - 1) == 0


class HostStaging:
    def to_host(self, x, ids, w):
        return x, ids, w

    def host_out(self, rows: int, hidden: int, name: str = "y"):
        """A buffer for a host executor's [T, H] fp32 result (`name`: which one), or None: the
        executor makes it."""
        return None

    def on_host(self, fn, *args):
        return fn(*args)

    def from_host(self, fn, like: torch.Tensor) -> torch.Tensor:
        return fn()

    @contextmanager
    def recording(self, recorder):
        raise RuntimeError("HostStaging: a step whose device is the host is never captured")
        yield  # pragma: no cover


class PinnedStaging:
    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._side = None      # the copy stream (made on first use, on the current device)
        self._copied = None    # event recorded on it after the latest to_host
        self._recorder = None  # StepRecorder while a step is captured

    def _buffer(self, name: str, shape, dtype, device=None) -> torch.Tensor:
        """A [rows, ...] buffer: pinned host memory, or on `device`."""
        rows, rest = shape[0], tuple(shape[1:])
        key = (name, rows if static_rows(rows) else "grow", rest, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            if device is None:
                buf = torch.empty((rows, *rest), dtype=dtype, pin_memory=True)
            else:
                buf = torch.empty((rows, *rest), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:rows]

    def to_host(self, x, ids, w):
        main = torch.cuda.current_stream()
        if self._side is None:
            self._side, self._copied = torch.cuda.Stream(), torch.cuda.Event()
        out = (self._buffer("x", x.shape, x.dtype), self._buffer("ids", ids.shape, ids.dtype),
               self._buffer("w", w.shape, w.dtype))
        self._side.wait_stream(main)  # the copies start once x, ids and w are computed
        with torch.cuda.stream(self._side):
            for dst, src in zip(out, (x, ids, w)):
                dst.copy_(src, non_blocking=True)
            self._copied.record()
        return out

    def host_out(self, rows: int, hidden: int, name: str = "y"):
        return self._buffer(name, (rows, hidden), torch.float32)

    def on_host(self, fn, *args):
        if self._recorder is not None:
            # Join the copy stream back into the capture and end the segment there. Nothing has
            # run on the device yet, so fn is only recorded: at each replay the recorder waits
            # for the segment, then runs it.
            torch.cuda.current_stream().wait_event(self._copied)
            self._recorder.cut(fn, args, wait_device=True)
            return None
        self._copied.synchronize()  # the copies only, not the stream
        return fn(*args)

    def from_host(self, fn, like: torch.Tensor) -> torch.Tensor:
        if self._recorder is not None:
            # The device work queued since on_host (shared, cached experts) is this segment; at
            # replay fn (the CPU sync, which fills host_out's buffer) runs while it does, and the
            # copy back opens the next segment.
            self._recorder.cut(fn, (), wait_device=False)
            y = self.host_out(like.shape[0], like.shape[1])
        else:
            y = fn()  # [T, H] host: host_out's pinned buffer
        dev = self._buffer("y_dev", y.shape, y.dtype, like.device)
        dev.copy_(y, non_blocking=True)
        return dev

    @contextmanager
    def recording(self, recorder):
        """Within: hand-offs cut the step into graph segments recorded by `recorder`."""
        self._recorder = recorder
        try:
            yield
        finally:
            self._recorder = None


def staging_for(device: torch.device, host_device: str = "cpu"):
    """PinnedStaging for a CUDA device whose experts run on the host, HostStaging otherwise."""
    return PinnedStaging() if torch.device(device).type == "cuda" and host_device == "cpu" else HostStaging()
