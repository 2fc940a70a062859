"""The device kernels' read rate on a CUDA GPU against its measured memory bandwidth: the
grouped expert kernel (hybrid/experts/grouped_experts_triton.py) at Kimi K2.5 expert size and the
int8 / fp8 weight-only linear (hybrid/ops/quant_linear_triton.py) at K2.5's non-expert shapes.

    python bench/device_kernels.py                         # CUDA, K2.5 sizes, 16 cached experts
    python bench/device_kernels.py --experts 64 --tokens 1 8 --json out.json
    python bench/device_kernels.py --dry-run               # CPU, TRITON_INTERPRET=1, tiny sizes:
                                                           # the plumbing and the numbers' check

Rows (medians of --runs CUDA-event-timed calls after warm-up):
  copy      device-to-device copy of a 2 GiB buffer: bytes read + written per second, the roof
  experts   one layer's cached share, T tokens x K picks, every pick a different cached expert
            (T*K <= C) or spread over all C: GB/s of expert bytes touched (each read once) and
            the fraction of the copy roof
  linear    y = x @ (q * s)^T for each shape, T tokens: GB/s of weight bytes
Each kernel's result is first checked against its torch reference (bf16 tolerance) on the
timed inputs, so a wrong fast kernel is never reported.

Legend: T tokens, K picks, C cached experts, H hidden, I expert width, N x K linear shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

K25 = {"hidden": 7168, "intermediate": 2048, "top_k": 8}
LINEAR_SHAPES = ["1536x7168", "576x7168", "24576x1536", "7168x8192", "18432x7168", "163840x7168"]


def _time(fn, runs: int, cuda: bool) -> float:
    """Median seconds per call."""
    import time

    import torch

    fn()
    out = []
    for _ in range(runs):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _close(y, ref, what: str) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() + 1e-30
    if not err <= 2e-2 * scale:
        raise AssertionError(f"{what}: kernel differs from its torch reference by {err:.3e} "
                             f"(output scale {scale:.3e})")


def bench_experts(device, H, I, C, T, K, runs, fmt="int4"):
    import torch

    from hybrid.experts.device_layout import DeviceExperts
    from hybrid.experts.grouped_experts import block_m_for, grouped_experts_torch, plan_tiles
    from hybrid.experts.grouped_experts_triton import grouped_experts_triton

    g = torch.Generator(device=device).manual_seed(0)
    store = DeviceExperts(fmt, C, H, I, device)
    for t in (store.gate_up_q, store.down_q):
        if fmt == "int4":
            t.copy_(torch.randint(0, 256, t.shape, generator=g, device=device, dtype=torch.uint8))
        else:
            t.copy_(torch.randint(-127, 128, t.shape, generator=g, device=device, dtype=torch.int8))
    lim = 8 if fmt == "int4" else 127
    store.gate_up_s.copy_(torch.rand(store.gate_up_s.shape, generator=g, device=device) / (lim * H**0.5))
    store.down_s.copy_(torch.rand(store.down_s.shape, generator=g, device=device) / (lim * I**0.5))
    x = torch.randn(T, H, generator=g, device=device).bfloat16()
    ids = (torch.arange(T * K, device=device) % C).view(T, K)           # distinct while T*K <= C
    w = torch.rand(T, K, generator=g, device=device)
    slot_of = torch.arange(C, device=device)
    plan = plan_tiles(slot_of, ids, w, C, block_m_for(T))
    y = torch.zeros(T, H, device=device)
    grouped_experts_triton(x, plan, store, y)
    ref = torch.zeros_like(y)
    grouped_experts_torch(x, plan, store, ref)
    _close(y, ref, f"grouped experts T={T}")
    touched = min(C, T * K)
    per = store.nbytes // C

    def run():
        y.zero_()
        grouped_experts_triton(x, plan, store, y)

    s = _time(run, runs, device.type == "cuda")
    return {"kind": "experts", "format": fmt, "tokens": T, "top_k": K, "cached": C,
            "experts_touched": touched, "bytes_per_expert": per, "seconds": s,
            "gbps": touched * per / s / 1e9}


def bench_linear(device, N, Kin, T, runs, wdtype):
    import torch

    from hybrid.ops.linear import Linear
    from hybrid.ops.quant_linear_triton import quant_linear_triton

    g = torch.Generator(device=device).manual_seed(1)
    if wdtype == torch.int8:
        q = torch.randint(-127, 128, (N, Kin), generator=g, device=device, dtype=torch.int8)
    else:
        q = torch.randn(N, Kin, generator=g, device=device).mul_(8).to(wdtype)
    s = torch.rand(N, generator=g, device=device) / (64 * Kin**0.5)
    x = torch.randn(T, Kin, generator=g, device=device).bfloat16()
    _close(quant_linear_triton(x, q, s), Linear(q, None, s)(x), f"linear {N}x{Kin} T={T}")
    sec = _time(lambda: quant_linear_triton(x, q, s), runs, device.type == "cuda")
    return {"kind": "linear", "format": str(wdtype).split(".")[-1], "shape": f"{N}x{Kin}",
            "tokens": T, "seconds": sec, "gbps": N * Kin * q.element_size() / sec / 1e9}


def bench_copy(device, nbytes, runs):
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sec = _time(lambda: b.copy_(a), runs, device.type == "cuda")
    return {"kind": "copy", "bytes": nbytes, "seconds": sec, "gbps": 2 * nbytes / sec / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16, help="cached experts C (16)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64], help="T values (1 8 64)")
    p.add_argument("--shapes", nargs="+", default=LINEAR_SHAPES, help="linear NxK shapes")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU under TRITON_INTERPRET=1 at tiny sizes: checks plumbing and numbers")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    if args.dry_run:
        device, H, I, C = torch.device("cpu"), 64, 64, 4
        tokens, shapes, runs, copy_bytes = [1, 3], ["48x64"], 2, 1 << 20
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
            return 2
        device, H, I, C = torch.device("cuda"), K25["hidden"], K25["intermediate"], args.experts
        tokens, shapes, runs, copy_bytes = args.tokens, args.shapes, args.runs, 2 << 30
    rows = [bench_copy(device, copy_bytes, runs)]
    roof = rows[0]["gbps"]
    for fmt in ("int4", "int8"):
        for T in tokens:
            rows.append(bench_experts(device, H, I, C, T, K25["top_k"] if not args.dry_run else 2,
                                      runs, fmt))
    fp8 = getattr(torch, "float8_e4m3fn", None)
    for shape in shapes:
        N, Kin = (int(v) for v in shape.lower().split("x"))
        for wd in (torch.int8, fp8):
            if wd is None:
                continue
            for T in tokens:
                rows.append(bench_linear(device, N, Kin, T, runs, wd))
    for r in rows:
        r["of_copy_roof"] = r["gbps"] / roof
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; copy roof {roof:.1f} GB/s (read + write)")
    print(f"{'kind':8s} {'format':14s} {'shape / experts':>18s} {'T':>4s} {'us':>10s} {'GB/s':>9s} {'roof':>6s}")
    for r in rows[1:]:
        what = r.get("shape") or f"{r['experts_touched']}/{r['cached']} x {r['bytes_per_expert'] / 1e6:.1f} MB"
        print(f"{r['kind']:8s} {r['format']:14s} {what:>18s} {r['tokens']:4d} {r['seconds'] * 1e6:10.1f} "
              f"{r['gbps']:9.1f} {r['of_copy_roof']:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
