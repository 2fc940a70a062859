"""One MoE layer at Kimi K2.5 size on hybrid's CPU kernels, beside the machine's limits and a
plain torch bf16 baseline, all measured in the same process with the same threads.

    python bench/moe_layer.py                      # full size: 384 experts, ~9.5 GB of INT4
    python bench/moe_layer.py --experts 64         # smaller layer, routing still over 64
    python bench/moe_layer.py --threads 1 --isa avx512_vnni --json
    python bench/moe_layer.py --format q4_k --down-format q6_k --experts 16   # GGUF blocks (Q4_K_M's pair)
    python bench/moe_layer.py --processes 5        # 5 fresh processes: medians, min/max, decode of each
    python bench/moe_layer.py --format q4_k --peers ggml     # ggml's own MoE kernel on the same blocks
    python bench/moe_layer.py --formats all --peers all      # every type, each in a fresh process, one table

What it measures (medians of --runs runs after one warm-up run each):
  bandwidth_gbps  RAM read bandwidth: the extension's probe (same thread pool, same page policy
                  as packed layers: 2 MiB aligned, MADV_HUGEPAGE, first touch by the readers),
                  one probe before each decode run, median; bandwidth_simd_gbps: the same with
                  64-byte loads (bench/peak_probe.cpp), since the extension's probe is baseline
                  x86-64 code; the "of bw" fractions use the higher of the two
  decode          B = 1 token, 8 random experts per run (new ones each run, so they come from
                  RAM): decode_gbps = packed bytes of the 8 experts / time, compared with
                  bandwidth_gbps (decode is a stream of weights). Then, per run, the same
                  experts read by the pool with no compute (Layer.read_bandwidth:
                  decode_pages_gbps) and decoded again (decode_warm_gbps), each after a probe;
                  decode_frac_pages = median of warm decode / that read: the kernel's own
                  efficiency, apart from the memory its pages landed on and how long they sat
                  idle (on a VM guest, pages idle for seconds read several times slower)
  prefill         B = --tokens tokens (default 512), random top-8 routing over all experts:
                  prefill_tok_s, prefill_gflops (2 x 3 x H x I x 8 flops per token), compared
                  with peak_gops, and prefill_gbps (packed bytes of the experts it ran / time),
                  compared with bandwidth_gbps: at ~11 tokens per expert both limits matter
  peak_gops       int8 ops/s of a register-only loop of the instruction the GEMM path is built
                  on (tdpbssd for amx, vpdpbusd for avx512_vnni/avx512_bf16, vpmaddubsw for
                  avx512/avx2; compiled from bench/peak_probe.cpp), on the same thread count
  torch baseline  bf16 weights, F.linear per selected expert (SiLU(gate) * up, down, weighted
                  sum), torch threads = --threads. Decode: 8 experts, B = 1. Prefill: the 8
                  experts each get round(B x 8 / E) tokens (the layer's tokens per expert), so
                  its tok/s compares per token; a 384-expert bf16 copy (34 GB) would not fit.

Weights are random: INT4 nibbles and bf16 scales are made directly (a bank of a few random
experts in compressed-tensors packing, repacked into every expert slot), never quantised
from floats. --format q4_0|q8_0|q4_k|q5_k|q6_k|q3_k|q2_k|iq4_xs|iq2_xxs|iq2_xs|iq3_xxs|iq1_s|iq1_m
(and --down-format) instead
makes random valid GGUF blocks of that type (random bits, fp16 fields of weight size) and packs
them with Layer.pack_expert_gguf, as a GGUF file's experts load; decode_gbps then counts the
packed bytes (gguf_expert_mb gives the file's bytes per expert: the packed K tiles are 0-4% larger).
Tensors are random; the numbers say nothing about model quality.

--processes N runs the whole measurement in N fresh processes, one after another (each this script
with --json), and reports per figure the median across them and the spread (min, max), plus every
process's decode GB/s: a process that lands in a slow mode (page placement, thread placement)
shows as one low value rather than vanishing in a median of runs inside one process. --json then
prints {"processes": N, "median": {...}, "min": {...}, "max": {...}, "per_process": [...]}, where
median, min and max have the keys of one process's object.

--peers ggml,kt-kernel (or all) runs peer engines (bench/peers/) on the very same layer after
hybrid, in the same process and threads: one LayerSpec carries the bank of experts, the decode
tokens and experts of every run, the prefill batch and routing, and a check batch. Each peer's
row gives its decode and prefill figures, `check` (max |y - y_hybrid| / max |y_hybrid| on the
check batch: the activation rounding, unless the peer requantised the weights, which its weights
column says) and `x` = hybrid / peer speed; peers that cannot run say why. ggml's barriers spin
(OpenMP): on a loaded machine set OMP_WAIT_POLICY=passive (bench/peers/ggml_moe.py).

Legend: E experts, K picked per token (8), H hidden (7168), I expert width (2048), B tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _import_hybrid_native():
    """hybrid.native, from the installed package or else from this checkout."""
    try:
        from hybrid import native
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        from hybrid import native
    return native


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the extension's default)")
    p.add_argument("--isa", default="", help="kernel path (scalar, avx2, avx512, avx512_vnni, "
                   "avx512_bf16, amx); default: the best this machine runs")
    p.add_argument("--format", default="int4", choices=("int4",) + GGUF_FORMATS,
                   help="expert weight format: int4 (compressed-tensors) or a GGUF block type (default int4)")
    p.add_argument("--down-format", default="", choices=("",) + GGUF_FORMATS,
                   help="down's GGUF type when it differs from --format's (default: the same)")
    p.add_argument("--tokens", type=int, default=512, help="prefill batch B (default 512)")
    p.add_argument("--experts", type=int, default=384, help="routed experts E (default 384)")
    p.add_argument("--hidden", type=int, default=7168, help="H (default 7168)")
    p.add_argument("--intermediate", type=int, default=2048, help="I (default 2048)")
    p.add_argument("--topk", type=int, default=8, help="experts per token K (default 8)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (default 5, >= 1)")
    p.add_argument("--bank", type=int, default=4, help="distinct random experts repacked into "
                   "the E slots (default 4; memory per slot is separate either way)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch bf16 baseline")
    p.add_argument("--peers", default="", help="peer engines to run beside hybrid on the same layer, "
                   "comma-separated (ggml, kt-kernel) or all; skipped ones say why")
    p.add_argument("--formats", default="", help="sweep: run each of these formats (comma-separated, "
                   "or all) in a fresh process and print one table; overrides --format")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=1, help="run everything in N fresh processes, one "
                   "after another, and report medians and min/max across them (default 1: this process)")
    a = p.parse_args(argv)
    for name in ("tokens", "experts", "hidden", "intermediate", "topk", "runs", "bank", "processes"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.threads < 0:
        p.error(f"--threads must be >= 0, got {a.threads}")
    if a.topk > a.experts:
        p.error(f"--topk ({a.topk}) must not exceed --experts ({a.experts})")
    if a.hidden % 32 or a.intermediate % 32:
        p.error(f"--hidden ({a.hidden}) and --intermediate ({a.intermediate}) must be multiples of 32")
    if a.down_format and a.format == "int4":
        p.error("--down-format goes with a GGUF --format")
    try:
        a.peers = parse_peers(a.peers, _import_peers().PEERS) if a.peers else []
    except ValueError as exc:
        p.error(f"--peers: {exc}")
    if a.formats:
        known = ("int4",) + GGUF_FORMATS
        a.formats = list(known) if a.formats == "all" else [f.strip() for f in a.formats.split(",") if f.strip()]
        bad = [f for f in a.formats if f not in known]
        if bad:
            p.error(f"--formats: unknown {', '.join(bad)}; known: {', '.join(known)} (or all)")
        if a.down_format:
            p.error("--down-format does not go with --formats (each type runs with its own down)")
    a.down_format = a.down_format or a.format
    for fmt, k, name in ((a.format, a.hidden, "--hidden"), (a.down_format, a.intermediate, "--intermediate")):
        if fmt in GGUF_FORMATS and k % GGUF_BLOCK[fmt][0]:
            p.error(f"{name} ({k}) must be a multiple of {GGUF_BLOCK[fmt][0]} for {fmt}")
    return a


def log(args: argparse.Namespace, msg: str) -> None:
    """Progress goes to stderr so --json output stays one clean object on stdout."""
    print(msg, file=sys.stderr, flush=True)


def timed(fn, runs: int) -> list[float]:
    """Seconds of `runs` calls of fn() after one untimed warm-up call."""
    fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- peak int8 throughput ---------------------------------------------------------------------

PROBE_FOR_ISA = {  # ISA -> (probe symbol, instruction name)
    "amx": ("peak_tdpbssd", "tdpbssd"),
    "avx512_bf16": ("peak_vpdpbusd", "vpdpbusd zmm"),
    "avx512_vnni": ("peak_vpdpbusd", "vpdpbusd zmm"),
    "avx512": ("peak_vpmaddubsw512", "vpmaddubsw+vpmaddwd zmm"),
    "avx2": ("peak_vpmaddubsw256", "vpmaddubsw+vpmaddwd ymm"),
}


def build_probe(workdir: Path) -> ctypes.CDLL | None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        return None
    so = workdir / "peak_probe.so"
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", str(HERE / "peak_probe.cpp"), "-o", str(so)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building bench/peak_probe.cpp failed ({' '.join(cmd)}):\n{r.stderr}")
    lib = ctypes.CDLL(str(so))
    for name, _ in PROBE_FOR_ISA.values():
        getattr(lib, name).restype = ctypes.c_double
        getattr(lib, name).argtypes = [ctypes.c_int64]
    lib.read_bandwidth_simd.restype = ctypes.c_double
    lib.read_bandwidth_simd.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return lib


def peak_gops(lib: ctypes.CDLL, symbol: str, threads: int, seconds: float = 0.3) -> float | None:
    """Int8 Gop/s of `symbol` on `threads` threads at once (ctypes drops the GIL)."""
    fn = getattr(lib, symbol)
    iters = 1000
    while True:  # size the loop to ~`seconds` on one thread
        t0 = time.perf_counter()
        if fn(iters) < 0:
            return None  # AMX permission refused
        dt = time.perf_counter() - t0
        if dt > seconds / 4:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(3):
            t0 = time.perf_counter()
            ops = sum(ex.map(fn, [iters] * threads))
            best = max(best, ops / (time.perf_counter() - t0) / 1e9)
    return best


# ---- the packed layer -------------------------------------------------------------------------

# Random valid GGUF blocks (hybrid/runtime/random_gguf.py, which the doctor's probe uses too), from
# the installed package or else from this checkout.
try:
    from hybrid.runtime import random_gguf as _random_gguf
except ImportError:
    sys.path.insert(0, str(HERE.parent))
    from hybrid.runtime import random_gguf as _random_gguf
GGUF_BLOCK, GGUF_FORMATS = _random_gguf.GGUF_BLOCK, _random_gguf.GGUF_FORMATS
gguf_row_bytes, gguf_rows = _random_gguf.gguf_row_bytes, _random_gguf.gguf_rows


def make_bank(args, rng) -> list:
    """min(--bank, E) distinct random experts, each (gate, up, down) as LayerSpec.bank holds them."""
    import numpy as np

    H, I = args.hidden, args.intermediate
    if args.format != "int4":
        return [(gguf_rows(rng, args.format, I, H), gguf_rows(rng, args.format, I, H),
                 gguf_rows(rng, args.down_format, H, I)) for _ in range(min(args.bank, args.experts))]

    def ct(n, k):  # compressed-tensors pack-quantized: int32 [n, k/8] nibbles, scales [n, k/32]
        q = rng.integers(-(2**31), 2**31, size=(n, k // 8), dtype=np.int64).astype(np.int32)
        s = rng.uniform(0.002, 0.02, size=(n, k // 32)).astype(np.float32)
        s = (s.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bf16-exact, as shipped
        return q, s

    return [(ct(I, H), ct(I, H), ct(H, I)) for _ in range(min(args.bank, args.experts))]


def make_layer(args, native, bank):
    """The packed layer of E slots, slot e holding bank[e % len(bank)] in its own memory."""
    E, H, I = args.experts, args.hidden, args.intermediate
    if args.format != "int4":
        layer = native.Layer.create(args.format, E, H, I, args.down_format)
        pack = layer.pack_expert_gguf
    else:
        layer = native.Layer.create("int4", E, H, I)

        def pack(e, gate, up, down):  # each (qweight, scale)
            layer.pack_expert_ct(e, *gate, *up, *down)
    layer.place()  # first touch by the pool threads that will read each part
    t0 = time.perf_counter()
    for e in range(E):
        pack(e, *bank[e % len(bank)])
        if (e + 1) % 32 == 0 or e + 1 == E:
            log(args, f"  packed {e + 1}/{E} experts ({layer.expert_nbytes * (e + 1) / 1e9:.1f} GB, "
                      f"{time.perf_counter() - t0:.0f} s)")
    return layer


def random_routing(rng, b: int, e: int, k: int):
    """ids [B, K] int32, K distinct experts per token; weights [B, K] fp32 summing to 1."""
    import numpy as np

    ids = np.argpartition(rng.random((b, e)), k - 1, axis=1)[:, :k].astype(np.int32)
    w = rng.random((b, k)).astype(np.float32)
    return np.ascontiguousarray(ids), w / w.sum(axis=1, keepdims=True)


CHECK_TOKENS = 16  # C: tokens of the output check every engine runs (spec.check_x)


def make_spec(args, bank, rng):
    """The LayerSpec every engine of this run sees: the bank, and the tokens and routing of each
    figure. Decode run r (run 0 is the warm-up) picks K experts none of which run r - 1 used (when
    E >= 2K), so each run reads its experts from RAM, not from the cache the last run left."""
    import numpy as np

    peers = _import_peers()
    E, H, K, B = args.experts, args.hidden, args.topk, args.tokens
    decode_x, decode_ids, prev = [], [], np.zeros(0, np.int64)
    for _ in range(args.runs + 1):
        pool = np.setdiff1d(np.arange(E), prev) if E - len(prev) >= K else np.arange(E)
        prev = rng.choice(pool, size=K, replace=False)
        decode_x.append(rng.standard_normal((1, H), dtype=np.float32))
        decode_ids.append(prev.astype(np.int32).reshape(1, K))
    prefill_ids, prefill_w = random_routing(rng, B, E, K)
    check_ids, check_w = random_routing(rng, CHECK_TOKENS, E, K)
    return peers.LayerSpec(
        fmt=args.format, down_fmt=args.down_format, experts=E, hidden=H, intermediate=args.intermediate,
        topk=K, tokens=B, threads=args.threads, runs=args.runs, bank=bank,
        decode_x=decode_x, decode_ids=decode_ids,
        prefill_x=rng.standard_normal((B, H), dtype=np.float32), prefill_ids=prefill_ids, prefill_w=prefill_w,
        check_x=rng.standard_normal((CHECK_TOKENS, H), dtype=np.float32), check_ids=check_ids, check_w=check_w)


BW_PROBE_BYTES = 1 << 30  # well beyond any last-level cache


def bench_native(args, native, layer, isa: str, spec, probe) -> tuple[dict, object]:
    """hybrid's figures with spec's tokens and routing, and its output for spec.check_x."""
    import numpy as np

    E, H, K, B = args.experts, args.hidden, args.topk, args.tokens
    moe = native.MoE(layer, "fast", args.threads, isa)
    y1 = np.zeros((1, H), np.float32)
    w1 = np.full((1, K), 1.0 / K, np.float32)

    def decode(r):
        moe.submit(spec.decode_x[r], spec.decode_ids[r], w1, None, y1)
        moe.sync()

    # Decode runs alternate with bandwidth probes so that both see the same machine: on a shared
    # host the bandwidth left to us drifts by 2x within a minute.
    log(args, f"  decode: B = 1, {K} random experts per run, alternating with the read-bandwidth probe")
    decode(0)  # warm-up
    decs, bws, sbws, pages, warm = [], [], [], [], []
    for r in range(1, args.runs + 1):
        bws.append(native.read_bandwidth(BW_PROBE_BYTES, 1)["gbps"])
        if probe is not None:
            sbws.append(probe.read_bandwidth_simd(BW_PROBE_BYTES, args.threads, 1))
        t0 = time.perf_counter()
        decode(r)  # experts untouched since packing, as every peer's run finds its own
        decs.append(time.perf_counter() - t0)
        # Then the same experts, now recently touched, read with no compute and decoded again,
        # each after a probe that evicts them from the caches: the kernel's efficiency on pages in
        # the same state. Pages idle for seconds read several times slower on a VM guest whose
        # host reclaims or remaps idle memory (measured here: 6.5 GB/s since packing, 24 GB/s just
        # read), which the first figure includes and this pair does not.
        ids = [int(e) for e in spec.decode_ids[r].ravel()]
        native.read_bandwidth(BW_PROBE_BYTES, 1)
        pages.append(layer.read_bandwidth(ids, 1)["gbps"])
        native.read_bandwidth(BW_PROBE_BYTES, 1)
        t0 = time.perf_counter()
        decode(r)
        warm.append(time.perf_counter() - t0)
    dec = statistics.median(decs)

    ids = spec.prefill_ids
    yb = np.zeros((B, H), np.float32)

    def prefill():
        moe.submit(spec.prefill_x, ids, spec.prefill_w, None, yb)
        moe.sync()

    log(args, f"  prefill: B = {B}, top-{K} over {E} experts ({B * K / E:.1f} tokens per expert)")
    pre = statistics.median(timed(prefill, args.runs))
    check_y = np.zeros(spec.check_x.shape, np.float32)
    moe.submit(spec.check_x, spec.check_ids, spec.check_w, None, check_y)
    moe.sync()
    flops_per_token = 2.0 * 3 * H * args.intermediate * K
    return {
        "isa": moe.isa,
        "bandwidth_gbps": statistics.median(bws),
        "bandwidth_simd_gbps": statistics.median(sbws) if sbws and min(sbws) > 0 else None,
        "decode_ms": dec * 1e3,
        "decode_gbps": K * layer.expert_nbytes / dec / 1e9,
        "decode_pages_gbps": statistics.median(pages),
        "decode_warm_gbps": K * layer.expert_nbytes / statistics.median(warm) / 1e9,
        # The warm decode of each run against the plain read of its own experts just before: the
        # kernel's efficiency, whatever memory those pages landed on (median of per-run ratios).
        "decode_frac_pages": statistics.median(K * layer.expert_nbytes / t / 1e9 / g for t, g in zip(warm, pages)),
        "prefill_tokens": B,
        "prefill_s": pre,
        "prefill_tok_s": B / pre,
        "prefill_gflops": B * flops_per_token / pre / 1e9,
        # Weight bytes the pass reads (every expert with at least one token) per second: with
        # ~11 tokens per expert prefill is as much a weight stream as a GEMM.
        "prefill_gbps": len(np.unique(ids)) * layer.expert_nbytes / pre / 1e9,
    }, check_y


def _import_peers():
    """bench.peers, with this checkout on the path (the script runs from bench/)."""
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    from bench import peers
    return peers


def parse_peers(arg: str, known) -> list[str]:
    """--peers 'ggml,kt-kernel' or 'all' -> names, in the given order; unknown names are an error."""
    names = list(known) if arg.strip() == "all" else [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown peer {', '.join(bad)}; known: {', '.join(known)} (or all)")
    return names


def rel_diff(y, ref) -> float:
    """max |y - ref| / max |ref|: a peer's check output against hybrid's."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(y, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_peers(args, names: list[str], spec, hybrid: dict, hybrid_check_y) -> tuple[list[dict], dict]:
    """(one row per peer result, {skipped peer: reason}). A row has the peer's figures, its check
    difference from hybrid and the ratios hybrid / peer of decode and prefill speed."""
    peers = _import_peers()
    rows, skipped = [], {}
    for name in names:
        log(args, f"peer {name} ({args.threads} threads)")
        try:
            results = peers.measure(name, spec)
        except peers.PeerSkipped as exc:
            skipped[name] = str(exc)
            log(args, f"  skipped: {exc}")
            continue
        for r in results:
            row = {"peer": name, **{k: r[k] for k in peers.RESULT_KEYS if k != "check_y"}}
            row["check_rel_diff"] = rel_diff(r["check_y"], hybrid_check_y)
            row["decode_x"] = (r["decode_ms"] / hybrid["decode_ms"]) if r["decode_ms"] else None
            # The peer decodes the copy of the weights it has just written (warm pages), hybrid's
            # first decode reads pages untouched since packing; its warm decode is the like for like
            # (on this kind of VM idle pages read up to 4x slower).
            warm, cold = hybrid.get("decode_warm_gbps"), hybrid.get("decode_gbps")
            row["decode_x_warm"] = (row["decode_x"] * warm / cold) if row["decode_x"] and warm and cold else None
            row["prefill_x"] = (hybrid["prefill_tok_s"] / r["prefill_tok_s"]) if r["prefill_tok_s"] else None
            row["prefill_gflops"] = (r["prefill_tok_s"] * 2.0 * 3 * spec.hidden * spec.intermediate * spec.topk
                                     / 1e9) if r["prefill_tok_s"] else None
            rows.append(row)
    return rows, skipped


def bench_torch(args, rng_seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(rng_seed)
    H, I, K = args.hidden, args.intermediate, args.topk
    E_b = K  # the baseline's experts: exactly the top-k of one token
    experts = [tuple((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                     for shape in ((I, H), (I, H), (H, I))) for _ in range(E_b)]
    nbytes = sum(t.numel() * t.element_size() for ex in experts for t in ex)

    def run(x, weights):  # x [T, H] bf16, every token through every expert, weights [T, K]
        y = torch.zeros_like(x, dtype=torch.float32)
        for j, (gw, uw, dw) in enumerate(experts):
            h = F.silu(F.linear(x, gw)) * F.linear(x, uw)     # [T, I]
            y += weights[:, j:j + 1] * F.linear(h, dw).float()  # [T, H]
        return y

    with torch.inference_mode():
        x1 = torch.randn(1, H, generator=g).to(torch.bfloat16)
        w1 = torch.full((1, K), 1.0 / K)
        dec = statistics.median(timed(lambda: run(x1, w1), args.runs))
        tpe = max(1, round(args.tokens * K / args.experts))  # tokens per expert of the layer run
        xt = torch.randn(tpe, H, generator=g).to(torch.bfloat16)
        wt = torch.full((tpe, K), 1.0 / K)
        pre = statistics.median(timed(lambda: run(xt, wt), args.runs))
    return {
        "torch_decode_ms": dec * 1e3,
        "torch_decode_gbps": nbytes / dec / 1e9,
        "torch_prefill_tokens": tpe,
        "torch_prefill_tok_s": tpe / pre,
        "torch_prefill_gflops": tpe * 2.0 * 3 * H * I * K / pre / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.formats:
        return sweep(list(sys.argv[1:] if argv is None else argv), args)
    if args.processes > 1:
        return run_processes(args, sys.argv[1:] if argv is None else list(argv))
    import numpy as np

    hn = _import_hybrid_native()
    native = hn.lib()
    if args.threads:
        hn.set_num_threads(args.threads)
    args.threads = hn.num_threads()
    isa = args.isa or native.active_isa()
    reason = native.isa_unavailable_reason(isa)
    if reason:
        print(f"--isa {isa}: {reason}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    res: dict = {"isa": isa, "threads": args.threads, "experts": args.experts, "hidden": args.hidden,
                 "intermediate": args.intermediate, "topk": args.topk, "runs": args.runs,
                 "format": args.format, "down_format": args.down_format}

    log(args, f"read bandwidth probe ({args.threads} threads)")
    bw = native.read_bandwidth(BW_PROBE_BYTES, 1)
    res["hugepages"] = bool(bw["hugepage_advised"])

    symbol, instr = PROBE_FOR_ISA.get(isa, (None, None))
    res["peak_instruction"] = instr
    res["peak_gops"] = None
    tmp = tempfile.TemporaryDirectory()
    probe = build_probe(Path(tmp.name))
    if probe is None:
        log(args, "no C++ compiler found: no peak probe, no SIMD bandwidth probe")
    elif symbol:
        log(args, f"peak probe: {instr} on {args.threads} threads")
        res["peak_gops"] = peak_gops(probe, symbol, args.threads)

    log(args, f"packing a random {format_label(res)} layer: E = {args.experts}, H = {args.hidden}, "
              f"I = {args.intermediate}")
    bank = make_bank(args, rng)
    spec = make_spec(args, bank, rng)
    layer = make_layer(args, native, bank)
    res["layer_gb"] = layer.nbytes / 1e9
    res["expert_mb"] = layer.expert_nbytes / 1e6
    if args.format != "int4":
        res["gguf_expert_mb"] = (2 * args.intermediate * gguf_row_bytes(args.format, args.hidden)
                                 + args.hidden * gguf_row_bytes(args.down_format, args.intermediate)) / 1e6
    log(args, f"hybrid kernels ({isa})")
    hybrid, hybrid_check_y = bench_native(args, native, layer, isa, spec, probe)
    res.update(hybrid)
    del layer  # the peers build their own copies of the layer

    if args.peers:
        res["peers"], res["peers_skipped"] = run_peers(args, args.peers, spec, hybrid, hybrid_check_y)
    del spec, bank

    if not args.no_torch:
        log(args, f"torch bf16 baseline ({args.threads} threads)")
        res.update(bench_torch(args, args.seed + 1))

    # Fractions are taken against the higher of the two probes (the stricter comparison).
    bw_ref = max(res["bandwidth_gbps"], res["bandwidth_simd_gbps"] or 0.0)
    res["decode_frac_bandwidth"] = res["decode_gbps"] / bw_ref
    res["prefill_frac_bandwidth"] = res["prefill_gbps"] / bw_ref
    if res["peak_gops"]:
        res["prefill_frac_peak"] = res["prefill_gflops"] / res["peak_gops"]
    for row in res.get("peers", []):
        row["decode_frac_bandwidth"] = row["decode_gbps"] / bw_ref if row["decode_gbps"] else None

    tmp.cleanup()
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


# ---- several fresh processes ------------------------------------------------------------------

SPREAD_KEYS = ("bandwidth_gbps", "bandwidth_simd_gbps", "decode_ms", "decode_gbps", "decode_frac_bandwidth",
               "decode_pages_gbps", "decode_warm_gbps", "decode_frac_pages",
               "prefill_tok_s", "prefill_gflops", "prefill_gbps", "prefill_frac_bandwidth", "torch_decode_gbps",
               "torch_prefill_tok_s")


def run_processes(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this script N times in fresh processes (argv + --processes 1 --json; argparse keeps the
    last value of a repeated flag) and report the aggregate."""
    results = []
    for i in range(args.processes):
        log(args, f"process {i + 1}/{args.processes}")
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--processes", "1", "--json"],
                           stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            print(f"process {i + 1}/{args.processes} exited with {r.returncode}", file=sys.stderr)
            return r.returncode
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        log(args, f"process {i + 1} result: {json.dumps(results[-1])}")  # kept should the table fail
    agg = aggregate(results)
    if args.json:
        print(json.dumps(agg))
    else:
        print_spread(agg)
    return 0


def _spread(values: list):
    """(median, min, max) of the numbers among values (None: absent in a process), or None."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (statistics.median(nums), min(nums), max(nums)) if nums else None


def aggregate(results: list[dict]) -> dict:
    """{"processes", "median", "min", "max", "per_process"}: median / min / max hold the keys of one
    process's object: numbers become that statistic across processes (dicts recursively), other
    values stay when every process agrees and become the list of them when not."""
    def fold(values: list, pick: int):
        if all(isinstance(v, dict) for v in values):
            keys = list(dict.fromkeys(k for v in values for k in v))
            return {k: fold([v.get(k) for v in values], pick) for k in keys}
        if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1 \
                and all(isinstance(x, dict) for v in values for x in v):  # peers' rows, row by row
            return [fold([v[i] for v in values], pick) for i in range(len(values[0]))]
        if all(v == values[0] for v in values):  # settings (experts, isa, ...) and equal figures
            return values[0]
        stat = _spread(values)
        if stat is not None and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in values):
            return stat[pick]
        return values

    return {"processes": len(results), "median": fold(results, 0), "min": fold(results, 1),
            "max": fold(results, 2), "per_process": results}


def print_spread(agg: dict) -> None:
    n, med, lo, hi = agg["processes"], agg["median"], agg["min"], agg["max"]
    print(f"{n} fresh processes; the table holds the median across them of each figure "
          f"(each figure itself the median of {med['runs']} runs in its process)")
    print_table(med)
    print(f"spread across the {n} processes: median [min .. max]")
    for k in SPREAD_KEYS:
        if isinstance(med.get(k), (int, float)):
            spec = ".0%" if "_frac_" in k else ".2f" if k.endswith("_ms") else ".1f"
            print(f"  {k:24} {med[k]:{spec}} [{lo[k]:{spec}} .. {hi[k]:{spec}}]")
    per = agg["per_process"]
    print("  decode GB/s per process:   " + "  ".join(f"{r['decode_gbps']:.1f} ({r['decode_frac_bandwidth']:.0%})"
                                                    for r in per) + "   (of bw in brackets)")


def format_label(r: dict) -> str:
    fmt, down = r["format"].upper(), r["down_format"].upper()
    return fmt if fmt == down else f"{fmt} (down {down})"


def print_table(r: dict) -> None:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    gguf = f", GGUF {r['gguf_expert_mb']:.1f} MB" if "gguf_expert_mb" in r else ""
    print(f"MoE layer: E={r['experts']} H={r['hidden']} I={r['intermediate']} top-{r['topk']} {format_label(r)} "
          f"({r['layer_gb']:.2f} GB, {r['expert_mb']:.1f} MB per expert{gguf}), isa={r['isa']}, "
          f"threads={r['threads']}, median of {r['runs']}")
    print(f"limits: read bandwidth {r['bandwidth_gbps']:.1f} GB/s extension probe, "
          f"{f(r['bandwidth_simd_gbps'], '.1f')} GB/s SIMD-load probe "
          f"(huge pages {'advised' if r['hugepages'] else 'refused'}; 'of bw' uses the higher), "
          f"peak {f(r['peak_gops'], '.0f')} Gop/s int8 ({r['peak_instruction'] or 'no probe'})")
    rows = [("", "decode ms", "decode GB/s", "of bw", "prefill tok/s", "prefill GFLOP/s", "of peak",
             "prefill GB/s", "of bw")]
    peak = r["peak_gops"]
    rows.append(("hybrid " + r["isa"], f(r["decode_ms"], ".2f"), f(r["decode_gbps"], ".1f"),
                 f(r["decode_frac_bandwidth"], ".0%"), f(r["prefill_tok_s"], ".0f"),
                 f(r["prefill_gflops"], ".0f"), f(r.get("prefill_frac_peak"), ".0%"),
                 f(r["prefill_gbps"], ".1f"), f(r["prefill_frac_bandwidth"], ".0%")))
    if "torch_decode_ms" in r:
        rows.append(("torch bf16", f(r["torch_decode_ms"], ".2f"), f(r["torch_decode_gbps"], ".1f"),
                     f(r["torch_decode_gbps"] / max(r["bandwidth_gbps"], r["bandwidth_simd_gbps"] or 0), ".0%"),
                     f(r["torch_prefill_tok_s"], ".0f"), f(r["torch_prefill_gflops"], ".0f"),
                     f(r["torch_prefill_gflops"] / peak if peak else None, ".0%"), "-", "-"))
    for p in r.get("peers", []):
        rows.append((p["engine"], f(p["decode_ms"], ".2f"), f(p["decode_gbps"], ".1f"),
                     f(p["decode_frac_bandwidth"], ".0%"), f(p["prefill_tok_s"], ".0f"),
                     f(p["prefill_gflops"], ".0f"),
                     f(p["prefill_gflops"] / peak if peak and p["prefill_gflops"] else None, ".0%"), "-", "-"))
    print_rows(rows)
    if r.get("decode_pages_gbps"):
        print(f"decode, the same experts again once touched: read with no compute {r['decode_pages_gbps']:.1f} GB/s, "
              f"hybrid's decode {r['decode_warm_gbps']:.1f} GB/s ({r['decode_frac_pages']:.0%} of that read)")
    print(f"prefill: hybrid{' and peers' if r.get('peers') else ''} B={r['prefill_tokens']} over "
          f"{r['experts']} experts; torch {r.get('torch_prefill_tokens', '-')} tokens through {r['topk']} "
          f"experts (same tokens per expert).")
    if "peers" not in r:
        print("Peers on this class of machine (issue): llama.cpp Q4_K 261 tok/s, torch bf16 234, "
              "KTransformers 167-195 (--peers all measures them here).")
        return
    print(f"peers (same layer, tokens, routing, threads; x = hybrid / peer speed; check = max |y - y_hybrid| "
          f"/ max |y_hybrid| on {CHECK_TOKENS} tokens):")
    for p in r["peers"]:
        print(f"  {p['engine']}: decode {f(p['decode_x'], '.2f')}x ({f(p.get('decode_x_warm'), '.2f')}x with "
              f"hybrid's pages warm, as the peer's are), prefill {f(p['prefill_x'], '.2f')}x, "
              f"check {p['check_rel_diff']:.2%}; weights: {p['weights']}")
    for name, why in r["peers_skipped"].items():
        print(f"  {name}: skipped: {why}")


def print_rows(rows: list[tuple], left=(0,)) -> None:
    """A header row and rows of strings; the columns in `left` left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i in left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def sweep(argv: list[str], args) -> int:
    """--formats: each format in a fresh process (its layer's RAM is given back in between), the
    same other arguments, then one table of every type's engines."""
    child, skip = [], False
    for a in argv:  # argv less --formats and its value
        if skip:
            skip = False
        elif a == "--formats":
            skip = True
        elif not a.startswith("--formats="):
            child.append(a)
    results = {}
    for fmt in args.formats:
        log(args, f"=== {fmt} ===")
        cmd = [sys.executable, str(Path(__file__).resolve()), *child, "--format", fmt, "--json"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            print(f"{fmt}: {' '.join(cmd)} exited with {r.returncode}", file=sys.stderr)
            return r.returncode
        results[fmt] = json.loads(r.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps({"formats": results}))
    else:
        print_sweep(results)
    return 0


def print_sweep(results: dict) -> None:
    """One table: per type, hybrid's row and each peer's, decode against that run's bandwidth."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    r0 = next(iter(results.values()))
    print(f"MoE layer per type: E={r0['experts']} H={r0['hidden']} I={r0['intermediate']} top-{r0['topk']}, "
          f"threads={r0['threads']}, prefill B={r0['prefill_tokens']}, median of {r0['runs']}, each type "
          f"in its own process; x = hybrid / peer speed; check = max |y - y_hybrid| / max |y_hybrid|")
    rows = [("type", "engine", "bw GB/s", "decode ms", "decode GB/s", "of bw", "of pages", "prefill tok/s",
             "x decode (warm)", "x prefill", "check", "weights")]
    for fmt, r in results.items():
        bw = max(r["bandwidth_gbps"], r["bandwidth_simd_gbps"] or 0.0)
        rows.append((format_label(r), "hybrid " + r["isa"], f"{bw:.1f}", f(r["decode_ms"], ".2f"),
                     f(r["decode_gbps"], ".1f"), f(r["decode_frac_bandwidth"], ".0%"),
                     f(r.get("decode_frac_pages"), ".0%"), f(r["prefill_tok_s"], ".0f"), "", "", "", ""))
        for p in r.get("peers", []):
            rows.append(("", p["engine"], "", f(p["decode_ms"], ".2f"), f(p["decode_gbps"], ".1f"),
                         f(p["decode_frac_bandwidth"], ".0%"), "", f(p["prefill_tok_s"], ".0f"),
                         f"{f(p['decode_x'], '.2f')} ({f(p.get('decode_x_warm'), '.2f')})", f(p["prefill_x"], ".2f"),
                         f"{p['check_rel_diff']:.2%}",
                         p["weights"]))
        for name, why in r.get("peers_skipped", {}).items():
            rows.append(("", f"{name}: skipped", "", "", "", "", "", "", "", "", "", why))
    print_rows(rows, left=(0, 1, 11))
    print("of pages: hybrid's decode of the same experts once touched over a plain read of their pages "
          "(the kernel's share); x decode (warm): against hybrid's decode of those touched pages, as "
          "a peer decodes the copy it has just written")


if __name__ == "__main__":
    sys.exit(main())
