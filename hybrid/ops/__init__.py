"""Device ops: what a model's math calls for norms, linears and attention, in a torch form (what
a CUDA device runs) and a native CPU form, chosen once at load by device and dtype.

    ops = select_ops(device, dtype)            # TorchOps or NativeCpuOps (op_sets.py)
    ops.rms_norm(x, w, eps); ops.add_rms_norm(h, a, w, eps); ops.linear(weight, bias, scale)
    ops.mla_attention(layer, shape, kv_norm, kv_b); ops.paged_kv() (a paged cache's gather/scatter)

HYBRID_DEVICE_OPS=torch (or hybrid.load(device_ops="torch")) forces the torch forms on the CPU:
the exact path a CUDA device runs, so tests exercise it here.
"""

from __future__ import annotations

import os

import torch

OPS_ENV = "HYBRID_DEVICE_OPS"
CHOICES = ("auto", "torch", "native")


def select_ops(device: torch.device, dtype: torch.dtype, choice: str | None = None):
    """The op set for this device and dtype. choice: "auto" (default; the HYBRID_DEVICE_OPS
    environment variable when set), "torch", or "native" (ValueError where it cannot run)."""
    from hybrid import native
    from hybrid.ops.op_sets import NativeCpuOps, TorchOps

    choice = choice or os.environ.get(OPS_ENV) or "auto"
    if choice not in CHOICES:
        raise ValueError(f"device ops must be one of {', '.join(CHOICES)} (option device_ops or "
                         f"{OPS_ENV}), got {choice!r}")
    device = torch.device(device)
    lib = native.lib_or_none()
    native_ok = device.type == "cpu" and dtype == torch.bfloat16 and lib is not None
    if choice == "native" and not native_ok:
        raise ValueError(f"device ops 'native' need a bf16 CPU device and the built extension "
                         f"(device {device}, dtype {dtype}, extension {'built' if lib else 'missing'})")
    if choice == "torch" or not native_ok:
        return TorchOps(device, dtype)
    return NativeCpuOps(device, dtype, lib)
