"""Single-thread speed of each ISA's matmul_a8 kernel on one Kimi K2.5 expert matrix, by token
count: the numbers behind the AMX/VNNI switch (kernels_amx.cpp, kAmxMinTokens) and the token
tile widths. One call covers all row blocks of the matrix on the calling thread.

    python bench/kernels.py                       # INT4, gate_up shape 4096 x 7168
    python bench/kernels.py --format int8 --tokens 1 8 16 --isa avx512_vnni amx

Columns: Gop/s (2 per multiply-add) and, for T = 1, the GB/s of packed weight read (the
matrix, 16 MB for INT4, is larger than L2, so T = 1 streams it from L3/RAM like decode does).
Medians of --runs calls after a warm-up call.

Legend: N rows, K inputs, T tokens.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=["int4", "int8"], default="int4")
    p.add_argument("--n", type=int, default=4096, help="rows N (multiple of 16, default 4096)")
    p.add_argument("--k", type=int, default=7168, help="inputs K (multiple of 32, default 7168)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 11, 16, 32, 64])
    p.add_argument("--isa", nargs="+", default=None, help="ISAs (default: all this machine runs)")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    if a.n <= 0 or a.n % 16 or a.k <= 0 or a.k % 32:
        p.error(f"--n must be a positive multiple of 16 and --k of 32, got {a.n}, {a.k}")
    if a.runs < 1 or min(a.tokens) < 1:
        p.error("--runs and every --tokens value must be >= 1")

    import numpy as np

    N = _native()
    isas = a.isa or [i for i in N.available_isas() if i != "scalar"]
    for isa in isas:
        reason = N.isa_unavailable_reason(isa)
        if reason:
            p.error(f"--isa {isa}: {reason}")
    rng = np.random.default_rng(0)
    # Random packed bytes and bf16 scales: the kernels' speed does not depend on the values.
    qbytes = a.n * a.k // (2 if a.format == "int4" else 1)
    q = rng.integers(0, 256, qbytes, dtype=np.uint8)
    s = np.full(a.n * a.k // 32, 0x3C00, np.uint16)  # bf16 0.0078125
    x = rng.standard_normal((max(a.tokens), a.k)).astype(np.float32)
    xq, xs, xg = N.kernel_quantize_row_a8("scalar", x)
    nbytes = qbytes + s.nbytes

    print(f"matmul_a8 {a.format} N={a.n} K={a.k}, 1 thread, Gop/s (median of {a.runs})")
    print("T".rjust(4) + "".join(i.rjust(16) for i in isas))
    for t in a.tokens:
        cells = []
        for isa in isas:
            args = (isa, a.format, q, s, a.n, a.k, xq[:t], xs[:t], xg[:t])
            N.kernel_matmul_a8(*args)
            times = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                N.kernel_matmul_a8(*args)
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
