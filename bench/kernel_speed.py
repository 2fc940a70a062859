"""Single-thread speed of each ISA's matmul_a8 kernel on one Kimi K2.5 expert matrix, by token
count: the numbers behind the AMX/VNNI switch (kernels_amx.cpp, kAmxMinTokens) and the token
tile widths. One call covers all row blocks of the matrix on the calling thread.
(Not named kernels.py: bench scripts put bench/ first on sys.path, and transformers imports the
`kernels` package of that name when it finds one.)

    python bench/kernel_speed.py                       # INT4, gate_up shape 4096 x 7168
    python bench/kernel_speed.py --format int8 --tokens 1 8 16 --isa avx512_vnni amx
    python bench/kernel_speed.py --format iq2_xxs --n 512 --tokens 1 11   # a GGUF type, in L2

Columns: Gop/s (2 per multiply-add) and, for T = 1, the GB/s of packed weight read (the
matrix, 16 MB for INT4, is larger than L2, so T = 1 streams it from L3/RAM like decode does;
a small --n, e.g. 512, keeps it in L2 and measures the kernel's compute alone). --format takes
int4, int8 or a GGUF block type (q4_k, iq2_xxs, ...: random valid blocks, repacked as the loader
repacks them). Medians of --runs calls after a warm-up call.

--gemv: the dense bf16 GEMV of the device Linear on CPU (hybrid.native.gemv_bf16, csrc/core/dense.h)
against torch's bf16 F.linear, on the demo model's and Kimi K2.5's non-expert shapes, T = 1 and
4, bf16 out, once on one thread (native threads=False, torch.set_num_threads(1)) and once with
the native pool (threads=True) against torch with its default threads. Columns: microseconds,
GB/s of weight read (N x K x 2 bytes per call), torch's time, and torch / native.

    python bench/kernel_speed.py --gemv                          # active ISA, all shapes
    python bench/kernel_speed.py --gemv --isa avx512 --shapes 256x512 7168x8192 --tokens 1

--gemv-t: the transposed bf16 GEMV (KernelTable::gemv_t_bf16: out [T, N] = x [T, K] . W [K, N],
fp32 x; MLA decode's probabilities . latent cache rows) on one thread, each ISA against the
scalar loop. W is the first N columns of [K, N + 64] (cache rows carry 64 RoPE values after the
512 latent ones: row stride 576 for Kimi K2.5). Columns: microseconds, GB/s of W read
(K x N x 2 bytes per call) and the speed-up over scalar. 4096 x 576 bf16 is 4.7 MB, so repeated
calls read it from L3 on most servers; a long cache (e.g. 131072x512, 150 MB) reads from RAM.

    python bench/kernel_speed.py --gemv-t                        # 4096x512, T = 1 and 4
    python bench/kernel_speed.py --gemv-t --shapes 4096x512 131072x512 --tokens 1 4 8

Legend: N rows, K inputs, T tokens (--gemv-t: W is [K, N], K summed over).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _native():
    try:
        from hybrid import native
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from hybrid import native
    return native.lib()


def _kernels():
    """hybrid._native_testing: the single-kernel entry points (kernel_quantize_row_a8,
    kernel_matmul_a8, kernel_gemv_t_bf16) are test-only, in the sibling of hybrid._native that
    shares its core library; ISA names and reasons come from hybrid._native (_native())."""
    _native()  # hybrid importable (the path set), the extension built (its build hint if not)
    from hybrid import _native_testing

    return _native_testing


def _random_gguf():
    """hybrid.runtime.random_gguf (random valid GGUF blocks), installed or from this checkout."""
    try:
        from hybrid.runtime import random_gguf
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from hybrid.runtime import random_gguf
    return random_gguf


GGUF_FORMATS = _random_gguf().GGUF_FORMATS  # the GGUF block types --format takes


def gguf_packed(fmt: str, n: int, k: int, rng):
    """(qweight, scales, GGUF bytes) of a random [n, k] matrix of GGUF type fmt, repacked as the
    loader repacks a file's blocks."""
    rows = _random_gguf().gguf_rows(rng, fmt, n, k)
    q, s = _native().pack_gguf(rows, fmt, n, k)
    return q, s, rows.nbytes


GEMV_SHAPES = ["256x512", "512x256", "4096x256", "1536x7168", "12288x1536", "7168x8192", "18432x7168"]


def _median_time(fn, runs: int) -> float:
    """Median seconds per call of `runs` timed batches after a warm-up call; a batch repeats the
    call enough times to last ~2 ms so small shapes are not all timer overhead."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(2e-3 / once))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def gemv_bench(shapes: list[str], tokens: list[int], isa: str | None, runs: int) -> None:
    import torch
    import torch.nn.functional as F

    from hybrid import native

    N = native.lib()
    isa = isa or N.active_isa()
    default_threads = torch.get_num_threads()
    print(f"dense bf16 GEMV, isa {isa}, native pool {N.num_threads()} workers (+ the caller), "
          f"torch {default_threads} threads; median of {runs}; us, GB/s of weight read")
    head = (f"{'N x K':>12} {'T':>2} | {'native 1t':>17} {'torch 1t':>9} {'ratio':>6} | "
            f"{'native pool':>17} {'torch':>9} {'ratio':>6}")
    print(head)
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.empty(n, k, dtype=torch.bfloat16).uniform_(-1, 1)  # [N, K]; speed is value-blind
        gb = n * k * 2 / 1e9
        for t in tokens:
            x = torch.empty(t, k, dtype=torch.bfloat16).uniform_(-1, 1)  # [T, K]
            out = torch.empty(t, n, dtype=torch.bfloat16)  # [T, N]
            cells = []
            for threads in (False, True):
                torch.set_num_threads(default_threads if threads else 1)
                dn = _median_time(lambda: native.gemv_bf16(w, x, out, isa=isa, threads=threads), runs)
                dt = _median_time(lambda: F.linear(x, w), runs)
                cells.append(f"{dn * 1e6:9.1f} {gb / dn:5.1f}GB/s {dt * 1e6:9.1f} {dt / dn:6.1f}")
            torch.set_num_threads(default_threads)
            print(f"{shape:>12} {t:>2} | {cells[0]} | {cells[1]}", flush=True)
        del w


def gemv_t_bench(shapes: list[str], tokens: list[int], isas: list[str] | None, runs: int) -> None:
    import numpy as np

    N, K = _native(), _kernels()
    isas = isas or [i for i in N.available_isas() if i in ("scalar", "avx2", "avx512")]
    if "scalar" not in isas:
        isas = ["scalar"] + isas
    rng = np.random.default_rng(0)
    print(f"transposed bf16 GEMV (gemv_t_bf16), 1 thread, median of {runs}; us, GB/s of W read, x scalar")
    print(f"{'K x N (ldw)':>20} {'T':>2} | " + " | ".join(f"{i:>26}" for i in isas))
    for shape in shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        ldw = n + 64
        # Random bf16 bits of normal values (exponent bits set: no subnormal slow paths).
        rows = (rng.standard_normal((k, ldw), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        w = rows[:, :n]  # [K, N], row stride ldw
        gb = k * n * 2 / 1e9
        for t in tokens:
            x = rng.random((t, k), dtype=np.float32)  # [T, K], probabilities-like
            out = np.empty((t, n), np.float32)  # [T, N]
            cells, base = [], None
            for isa in isas:
                dt = _median_time(lambda: K.kernel_gemv_t_bf16(isa, w, x, 0, n, False, out), runs)
                base = base or dt
                cells.append(f"{dt * 1e6:9.1f} {gb / dt:5.1f}GB/s {base / dt:5.1f}x")
            print(f"{shape + f' ({ldw})':>20} {t:>2} | " + " | ".join(cells), flush=True)
        del rows, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=["int4", "int8", *GGUF_FORMATS], default="int4")
    p.add_argument("--n", type=int, default=4096, help="rows N (multiple of 16, default 4096)")
    p.add_argument("--k", type=int, default=7168, help="inputs K (multiple of 32, default 7168)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default 1 2 4 8 11 16 32 64; --gemv: 1 4)")
    p.add_argument("--isa", nargs="+", default=None, help="ISAs (default: all this machine runs)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--gemv", action="store_true", help="the dense bf16 GEMV vs torch F.linear instead")
    p.add_argument("--gemv-t", action="store_true",
                   help="the transposed bf16 GEMV (gemv_t_bf16) of each ISA vs scalar instead")
    p.add_argument("--shapes", nargs="+", default=None,
                   help="--gemv: N x K shapes (e.g. 256x512); --gemv-t: K x N (default 4096x512)")
    a = p.parse_args(argv)
    a.tokens_given = a.tokens is not None
    a.tokens = a.tokens or [1, 2, 4, 8, 11, 16, 32, 64]
    if a.gemv and a.gemv_t:
        p.error("--gemv and --gemv-t are separate runs")
    if a.gemv_t:
        a.shapes = a.shapes or ["4096x512"]
        if any(len(s.lower().split("x")) != 2 or not all(v.isdigit() and int(v) > 0 for v in s.lower().split("x"))
               for s in a.shapes):
            p.error(f"--shapes must be KxN with positive integers, got {a.shapes}")
        if a.runs < 1 or min(a.tokens) < 1:
            p.error("--runs and every --tokens value must be >= 1")
        for isa in a.isa or []:
            reason = _native().isa_unavailable_reason(isa)
            if reason:
                p.error(f"--isa {isa}: {reason}")
        gemv_t_bench(a.shapes, a.tokens if a.tokens_given else [1, 4], a.isa, a.runs)
        return 0
    if a.gemv:
        a.shapes = a.shapes or GEMV_SHAPES
        if any(len(s.lower().split("x")) != 2 or not all(v.isdigit() and int(v) > 0 for v in s.lower().split("x"))
               for s in a.shapes):
            p.error(f"--shapes must be NxK with positive integers, got {a.shapes}")
        if a.runs < 1 or min(a.tokens) < 1:
            p.error("--runs and every --tokens value must be >= 1")
        isa = a.isa[0] if a.isa else None
        if isa:
            reason = _native().isa_unavailable_reason(isa)
            if reason:
                p.error(f"--isa {isa}: {reason}")
        gemv_bench(a.shapes, a.tokens if a.tokens_given else [1, 4], isa, a.runs)
        return 0
    if a.n <= 0 or a.n % 16 or a.k <= 0 or a.k % 32:
        p.error(f"--n must be a positive multiple of 16 and --k of 32, got {a.n}, {a.k}")
    block = _random_gguf().GGUF_BLOCK[a.format][0] if a.format in GGUF_FORMATS else 32
    if a.k % block:
        p.error(f"--format {a.format} needs --k a multiple of {block}, got {a.k}")
    if a.runs < 1 or min(a.tokens) < 1:
        p.error("--runs and every --tokens value must be >= 1")

    import numpy as np

    N, K = _native(), _kernels()
    isas = a.isa or [i for i in N.available_isas() if i != "scalar"]
    for isa in isas:
        reason = N.isa_unavailable_reason(isa)
        if reason:
            p.error(f"--isa {isa}: {reason}")
    rng = np.random.default_rng(0)
    if a.format in GGUF_FORMATS:
        q, s, file_bytes = gguf_packed(a.format, a.n, a.k, rng)
        nbytes = q.nbytes + s.nbytes
        print(f"{a.format}: {nbytes / 1e6:.1f} MB packed ({file_bytes / 1e6:.1f} MB in the GGUF)")
    else:
        # Random packed bytes and bf16 scales: the kernels' speed does not depend on the values.
        qbytes = a.n * a.k // (2 if a.format == "int4" else 1)
        q = rng.integers(0, 256, qbytes, dtype=np.uint8)
        s = np.full(a.n * a.k // 32, 0x3C00, np.uint16)  # bf16 0.0078125
        nbytes = qbytes + s.nbytes
    x = rng.standard_normal((max(a.tokens), a.k)).astype(np.float32)
    xq, xs, xg = K.kernel_quantize_row_a8("scalar", x)

    print(f"matmul_a8 {a.format} N={a.n} K={a.k}, 1 thread, Gop/s (median of {a.runs})")
    print("T".rjust(4) + "".join(i.rjust(16) for i in isas))
    for t in a.tokens:
        cells = []
        for isa in isas:
            args = (isa, a.format, q, s, a.n, a.k, xq[:t], xs[:t], xg[:t])
            K.kernel_matmul_a8(*args)
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                K.kernel_matmul_a8(*args)
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            cell = f"{2.0 * a.n * a.k * t / dt / 1e9:.0f}"
            if t == 1:
                cell += f" ({nbytes / dt / 1e9:.1f}GB/s)"
            cells.append(cell)
        print(str(t).rjust(4) + "".join(c.rjust(16) for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
