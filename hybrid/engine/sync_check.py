"""HostSyncCheck: lists every op of a step that makes the host wait for the device, and counts
the step's ops. Tests run the device decode step under it (on the CPU, HYBRID_DEVICE_OPS=torch)
and bench/gpu_check.py runs it on a GPU.

    with HostSyncCheck() as check:          # outside the MoE hand-offs (paused there)
        runner.step(ids, positions, slots)
    check.syncs      # [(what, where)]: host-syncing ops, with the hybrid/ source line that called
    check.ops        # aten ops dispatched; check.kernels: those that are not views (what a GPU
                     # launches a kernel for, roughly: the eager launch count)

What counts as a host sync (anywhere on the device side; the hand-offs, where the CPU experts
are handed work and give it back, are the step's intended sync points and are not watched):
  - reading a device value on the host: .item(), int()/float()/bool() of a tensor (aten.
    _local_scalar_dense), .tolist(), .numpy(), .cpu(), and so Python branching on device values;
  - ops whose output shape depends on the data: nonzero, unique*, masked_select, boolean-mask
    indexing, repeat_interleave without output_size;
  - blocking copies from a CUDA tensor to the host.

Legend: none (no tensors of its own).
"""

from __future__ import annotations

import traceback
from contextlib import ExitStack, contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Output shape depends on the data, or the op reads a value on the host.
_SYNC_ATEN = {
    "_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "masked_select", "equal", "is_nonzero",
    "allclose", "item",
}
# Tensor methods that hand a device value to Python.
_SYNC_METHODS = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"}
# Ops that only make a new view: no kernel on a GPU.
_VIEW_ATEN = {
    "view", "_unsafe_view", "reshape", "slice", "select", "expand", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "split", "split_with_sizes",
    "chunk", "narrow", "view_as_real", "view_as_complex", "_reshape_alias", "lift_fresh",
}


def _where() -> str:
    """The innermost hybrid/ source line of the current Python stack."""
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename.replace("\\", "/")
        if "/hybrid/" in f and not f.endswith("/hybrid/engine/sync_check.py"):
            return f"{f[f.rindex('/hybrid/') + 1:]}:{frame.lineno}"
    return "?"


def _is_bool_tensor(a) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == torch.bool


class _Dispatch(TorchDispatchMode):
    def __init__(self, check: "HostSyncCheck"):
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.check
        if not c.paused:
            name = func.overloadpacket.__name__.rstrip("_")
            c.ops += 1
            if name not in _VIEW_ATEN:
                c.kernels += 1
            if name in _SYNC_ATEN:
                c._flag("aten._local_scalar_dense" if name == "item" else f"aten.{name}")
            elif name in ("index", "index_put") and any(_is_bool_tensor(i) for i in (args[1] or ())):
                c._flag(f"aten.{name} with a boolean mask")
            elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                    and kwargs.get("output_size") is None:
                c._flag("aten.repeat_interleave by a tensor, without output_size")
            elif name in ("copy", "_to_copy"):
                c._check_copy(name, args, kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, check: "HostSyncCheck"):
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.check.paused and name in _SYNC_METHODS:
            self.check._flag(f"Tensor.{name}()")
        return func(*args, **(kwargs or {}))


class HostSyncCheck:
    def __init__(self):
        self.syncs: list[tuple[str, str]] = []
        self.ops = 0
        self.kernels = 0
        self.paused = False
        self._stack: ExitStack | None = None

    def _flag(self, what: str) -> None:
        self.syncs.append((what, _where()))

    def _check_copy(self, name: str, args, kwargs) -> None:
        src = args[1] if name == "copy" else args[0]
        dst_cpu = (args[0].device.type == "cpu") if name == "copy" else \
            (torch.device(kwargs["device"]).type == "cpu" if kwargs.get("device") is not None else False)
        blocking = not (args[2] if name == "copy" and len(args) > 2 else kwargs.get("non_blocking", False))
        if isinstance(src, torch.Tensor) and src.device.type == "cuda" and dst_cpu and blocking:
            self._flag(f"aten.{name} device -> host (blocking)")

    @contextmanager
    def pause(self):
        """Not watched within (the hand-offs)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    def _paused_method(self, cls, name):
        original = getattr(cls, name)
        check = self

        def wrapped(*args, **kwargs):
            with check.pause():
                return original(*args, **kwargs)

        setattr(cls, name, wrapped)
        return lambda: setattr(cls, name, original)

    def __enter__(self) -> "HostSyncCheck":
        from hybrid.engine.graphs import SegmentedGraph
        from hybrid.experts.staging import HostStaging, PinnedStaging

        self._stack = ExitStack()
        # The hand-offs are the step's sync points: the host work there is not device work
        # (eagerly the stagings run it; a captured step's replay runs it between segments).
        for cls, name in ((HostStaging, "on_host"), (HostStaging, "from_host"), (PinnedStaging, "on_host"),
                          (PinnedStaging, "from_host"), (SegmentedGraph, "_host")):
            self._stack.callback(self._paused_method(cls, name))
        self._stack.enter_context(_Function(self))
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    def report(self) -> str:
        lines = [f"{self.ops} aten ops ({self.kernels} not views), {len(self.syncs)} host syncs"]
        seen: dict[tuple[str, str], int] = {}
        for s in self.syncs:
            seen[s] = seen.get(s, 0) + 1
        lines += [f"  {n} x {what} at {where}" for (what, where), n in seen.items()]
        return "\n".join(lines)
