"""The one importer of the C++ extension hybrid._native (built from csrc/ by `pip install -e .`).
Its test-only sibling hybrid._native_testing (kernel probes, pool test jobs, fault injection) is
imported by tests alone, never from hybrid/.

Everything here is lazy: importing this module does nothing; the extension is imported, the CPU
inspected and the thread pool started on first use.

Threads. The extension runs one persistent pool of pinned worker threads, by default one per
physical core the process may use (HYBRID_NUM_THREADS or set_num_threads() change it). Torch has
its own intra-op pool; if both run at once on the same cores they oversubscribe them and both
slow down. Callers should therefore:
  * with a GPU: keep torch's CPU threads small (torch.set_num_threads(1 or 2)) since the GPU does
    torch's work and the CPU MoE runs concurrently with it (submit / sync);
  * without a GPU (torch on the CPU): CPU MoE and torch ops alternate (forward(), or sync() before
    the next torch op), so each may use all cores; avoid running torch compute between submit()
    and sync(), or give torch and the pool disjoint thread budgets (hybrid/runtime/threads.py
    sets both).

Data. Arrays cross the boundary without copies: torch CPU tensors become numpy views
(`as_numpy`); bf16 travels as uint16 bit patterns since numpy has no bf16.
"""

from __future__ import annotations

import functools
import os
from typing import Any

_BUILD_HINT = "the C++ extension hybrid._native is not built: run `pip install -e .` in the repository"


# GGUF block types the native kernels run in their own bits (csrc/core/kernels.h's formats), by
# ggml's type name; the packed format of each is the name in lower case (pack_gguf). Routed
# experts (hybrid.experts.cpu_moe) and device weights kept in blocks (device_weights="blocks",
# hybrid.loaders.gguf_source) both ask here.
GGUF_NATIVE = ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS",
               "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ1_M")


@functools.lru_cache(maxsize=None)
def lib():
    """The extension module; ImportError with the build command when it is missing."""
    try:
        from hybrid import _native  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"{_BUILD_HINT} ({e})") from e
    return _native


@functools.lru_cache(maxsize=None)
def lib_or_none():
    """The extension module, or None when it is not built: the model code then keeps its torch
    paths (decode-time native calls, the native GEMV and router are optional speed-ups)."""
    try:
        return lib()
    except ImportError:
        return None


def available() -> bool:
    """True when the extension is built and importable."""
    try:
        lib()
        return True
    except ImportError:
        return False


def isa() -> dict[str, Any]:
    """Which kernel path runs and what the CPU has:
    {"active": "amx", "available": ["scalar", ...], "forced": "HYBRID_ISA value or None",
     "cpu": {"brand", "flags", "os_avx", "os_avx512", "os_amx", "amx_permitted", "amx_refusal"}}.
    Raises ValueError when HYBRID_ISA names a path this CPU/OS/build cannot run."""
    n = lib()
    return {
        "active": n.active_isa(),
        "available": list(n.available_isas()),
        "forced": os.environ.get("HYBRID_ISA") or None,
        "cpu": dict(n.cpu_info()),
    }


def available_isas() -> list[str]:
    return list(lib().available_isas())


def num_threads() -> int:
    return int(lib().num_threads())


def set_num_threads(threads: int | None) -> None:
    """Replace the pool (None or 0: default). Queued jobs finish first."""
    lib().set_num_threads(int(threads or 0))


def as_numpy(t, name: str, *, writable: bool = False):
    """numpy view of a CPU torch tensor or a numpy array, no copy; bf16 -> uint16 bit patterns.
    TypeError naming `name` for anything else (GPU tensors included)."""
    import numpy as np  # noqa: PLC0415

    if isinstance(t, np.ndarray):
        return t
    try:
        import torch  # noqa: PLC0415
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor, got one on {t.device}")
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"{name}: torch dtype {t.dtype} is not supported here ({e})") from e
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(t).__name__}")


def gemv_bf16(weight, x, out=None, *, isa: str | None = None, threads: bool = True):
    """y [T, N] = x [T, K] @ weight [N, K]^T with the native bf16 GEMV (csrc/dense.h): the device
    Linear's path on CPU for a few tokens, where torch's bf16 F.linear pays a fixed ~30 us and
    reorders the weight on every call.

    weight: torch.bfloat16 CPU [N, K]; x: torch.bfloat16 CPU [T, K]; both with unit inner stride,
    rows may be strided (a column slice is fine, nothing is copied). Accumulation is fp32 (the
    bf16 products are exact; only the summation order differs from a plain loop). out: None (a
    new bf16 [T, N] tensor, rounded to nearest even) or a CPU [T, N] tensor of dtype bf16 or
    float32 with unit inner stride, written in place; returns it. isa: a path name from
    available_isas() (tests, benchmarks), None = the active one. threads=False: always on the
    calling thread; otherwise matrices of 4 MiB and more are split over the native pool
    (the calling thread and hybrid._native.sync_threads() - 1 workers).
    Autograd is bypassed (inference only).
    TypeError for a wrong type, dtype or device; ValueError for a wrong shape, stride, empty
    operand or an out that overlaps an input, naming the argument.

    Per-call overhead (a [1, 32] x [16, 32] call, compute negligible; timeit, best of 5 series on
    a 2-vCPU Sapphire Rapids KVM guest): 2.1 us with out given, 3.6 us with out=None (torch.empty
    is 1.3 us of it). The binding reads dtype / device / shape / strides / data_ptr off each tensor
    through the C API, ~0.55 us per tensor; as_numpy's view would cost ~4 us per tensor.
    """
    return lib().dense_gemv_torch(weight, x, out, isa or "", threads)


def gemv_i8(weight, scale, x, out=None, *, isa: str | None = None, threads: bool = True):
    """y [T, N] = (x [T, K] @ weight [N, K]^T) * scale [N] with the native int8 GEMV (csrc/dense.h):
    the device Linear's path on CPU for a few tokens when device weights are int8; it reads the
    int8 bytes as they are (torch would need a bf16 copy of the weight per call).

    weight: torch.int8 CPU [N, K] with unit inner stride (rows may be strided); scale:
    torch.float32 CPU [N], contiguous; x: torch.bfloat16 CPU [T, K]. Each int8 x bf16 product is
    exact in fp32; the sums are fp32, then times scale in fp32, then (bf16 out) one rounding.
    out, isa, threads, errors: as gemv_bf16 (weights of 4 MiB and more are split over the pool).
    """
    return lib().dense_gemv_i8_torch(weight, scale, x, out, isa or "", threads)


def packed_linear(qweight, scales, fmt: str, n: int, k: int, x, out=None, *, isa: str | None = None,
                  threads: bool = True):
    """y [T, N] = x [T, K] @ W^T for a weight held packed (csrc/core/dense.h's dense_packed): the
    device Linear's path on a CPU device for a GGUF tensor kept in its own blocks
    (device_weights="blocks"). x's rows are quantised to int8 per 32 inputs (the expert engine's
    activation rounding), then the format's matmul_a8 kernel runs.

    qweight: torch.uint8 CPU [bytes] and scales: torch.int16 CPU [count] (the bits pack_gguf /
    pack return, viewed as torch tensors) or None for formats without scales; fmt: "int4",
    "int8" or a GGUF type name ("q4_k", "iq2_xxs", ...); x: torch.bfloat16 CPU [T, K] with unit
    inner stride. out, isa, threads: as gemv_bf16 (packed weights of 4 MiB and more are split
    over the pool). TypeError / ValueError name the argument.
    """
    return lib().packed_linear_torch(qweight, scales, fmt, n, k, x, out, isa or "", threads)
