"""Runs one MoE layer on kt-kernel; started by bench/peers/kt_kernel_moe.py under kt-kernel's own
venv (its python has kt_kernel, torch and numpy, never hybrid), in a fresh process:

    $HYBRID_KT_VENV/bin/python bench/peers/kt_kernel_runner.py DIR

DIR holds meta.json (E, H, I, K, threads, runs) and arrays.npz (the layer's weight bank in Kimi's
compressed-tensors INT4 g32 packing, the decode, prefill and check inputs; see kt_kernel_moe.py);
the runner writes DIR/result.json (what ran, seconds of every timed call) and DIR/check_y.npy.
Nothing goes to stdout but kt-kernel's own chatter (its C++ printf()s), so results travel by file.

The layer is built the way kt-kernel's NativeMoEWrapper builds a RAWINT4 layer (method "RAWINT4":
compressed-tensors INT4, bf16 scales, group 32, no zero point): a MOEConfig with one pointer per
expert, kt-kernel's own RAWINT4 backend choice (kt_kernel.utils.amx._select_rawint4_backend, which
honours KT_RAWINT4_BACKEND=amx|avx2|...), load_weights_task, then forward_task on its CPUInfer
queue, submit + sync, exactly as its wrapper's forward does. The wrapper itself reads a
safetensors checkpoint with one tensor per expert; going one level down lets expert e point at
bank[e % len(bank)] (kt-kernel copies every expert into its own buffers at load), so no
E-expert file is written.

Legend: E experts, K picked per token, H hidden, I expert width, B tokens, C check tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

IN_PLACE_BACKENDS = {"AVX2RawInt4_MOE"}  # kt-kernel 0.7.2: weights used where they lie ("scale-only")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: kt_kernel_runner.py DIR", file=sys.stderr)
        return 2
    d = Path(argv[0])
    meta = json.loads((d / "meta.json").read_text())
    E, H, I, K, threads, runs = (meta[k] for k in ("experts", "hidden", "intermediate", "topk", "threads", "runs"))

    try:  # kt-kernel picks its build (amx, avx512_*, avx2) from /proc/cpuinfo as it is imported
        import numpy as np
        import torch

        import kt_kernel
        from kt_kernel import kt_kernel_ext
        from kt_kernel.utils.amx import _select_rawint4_backend
        from kt_kernel_ext.moe import MOEConfig
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"SKIP: importing kt_kernel failed here: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    torch.set_num_threads(threads)  # torch only converts inputs here; kt-kernel has its own pool

    a = np.load(d / "arrays.npz")
    nbank = int(meta["bank"])

    def bf16(x):  # fp32 holding bf16-exact values -> torch bf16, exact
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).contiguous()

    def nibbles(q):  # int32 [N, Kin/8] -> uint8 [N, Kin/2]: the same bytes, as kt-kernel reads them
        return torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).contiguous()

    group = H // a["gate_s0"].shape[1]
    try:
        backend = _select_rawint4_backend(group)
    except RuntimeError as exc:  # a KT_RAWINT4_BACKEND this CPU or build cannot run
        print(f"SKIP: {exc}", file=sys.stderr)
        return 3
    if backend is None:
        print(f"SKIP: kt-kernel {kt_kernel.__version__} ({kt_kernel.__cpu_variant__} build) has no RAWINT4 "
              f"backend for group {group} on this CPU", file=sys.stderr)
        return 3
    # Most backends copy every expert into their own buffers at load, so expert e may point at
    # bank[e % len(bank)]; these read the nibbles in place (kt-kernel serves them from the
    # checkpoint's mmap), so each expert gets its own copy, or decode would read a few experts
    # from cache.
    in_place = backend.__name__ in IN_PLACE_BACKENDS
    keep = []  # the tensors live as long as the layer (the in-place backends read them)
    ptrs = {p: [] for p in ("gate", "up", "down")}
    sptrs = {p: [] for p in ("gate", "up", "down")}
    bank = [{p: (nibbles(a[f"{p}_q{b}"]), bf16(a[f"{p}_s{b}"])) for p in ptrs} for b in range(nbank)]
    for e in range(E):
        for p in ptrs:
            q, s = bank[e % nbank][p]
            if in_place and e >= nbank:
                q = q.clone()
            keep += [q, s]
            ptrs[p].append(q.data_ptr())
            sptrs[p].append(s.data_ptr())

    pool_cfg = kt_kernel_ext.WorkerPoolConfig()
    pool_cfg.subpool_count = 1
    pool_cfg.subpool_numa_map = [0]
    pool_cfg.subpool_thread_count = [threads]
    cpu_infer = kt_kernel_ext.CPUInfer(pool_cfg)

    B = a["prefill_x"].shape[0]
    C = a["check_x"].shape[0]
    gpu_mask = torch.zeros(E, dtype=torch.bool)  # every expert on the CPU
    cfg = MOEConfig(E, K, H, I, gpu_mask.data_ptr())
    cfg.layer_idx = 0
    cfg.pool = cpu_infer.backend_
    cfg.max_len = max(B, C, 1)  # kt-kernel sizes its buffers by this; a longer call would overrun them
    cfg.gate_projs, cfg.up_projs, cfg.down_projs = ([ptrs[p]] for p in ("gate", "up", "down"))
    cfg.gate_scales, cfg.up_scales, cfg.down_scales = ([sptrs[p]] for p in ("gate", "up", "down"))
    cfg.quant_config.bits = 4
    cfg.quant_config.group_size = group
    cfg.quant_config.zero_point = False
    moe = backend(cfg)
    t0 = time.perf_counter()
    identity = torch.arange(E, dtype=torch.int64)  # physical expert e holds logical expert e
    cpu_infer.submit(moe.load_weights_task(identity.data_ptr()))
    cpu_infer.sync()
    load_s = time.perf_counter() - t0

    def call(x, ids, w):
        """One forward as kt-kernel's wrapper runs it: bf16 in and out, int64 ids, fp32 weights."""
        n = x.shape[0]
        xt = bf16(x)
        it = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        yt = torch.zeros((n, H), dtype=torch.bfloat16)
        bsz = torch.full((1,), n, dtype=torch.int32)
        task = moe.forward_task(bsz.data_ptr(), K, it.data_ptr(), wt.data_ptr(), xt.data_ptr(), yt.data_ptr(), False)
        t0 = time.perf_counter()
        cpu_infer.submit(task)
        cpu_infer.sync()
        dt = time.perf_counter() - t0
        return dt, yt

    decode_w = np.full((1, K), 1.0 / K, np.float32)  # hybrid's decode weights: uniform
    decode_s = [call(a["decode_x"][r], a["decode_ids"][r], decode_w)[0] for r in range(runs + 1)][1:]
    pre = (a["prefill_x"], a["prefill_ids"], a["prefill_w"])
    prefill_s = [call(*pre)[0] for _ in range(runs + 1)][1:]
    _, y = call(a["check_x"], a["check_ids"], a["check_w"])
    np.save(d / "check_y.npy", y.float().numpy())
    (d / "result.json").write_text(json.dumps({
        "version": kt_kernel.__version__,
        "cpu_variant": kt_kernel.__cpu_variant__,
        "backend": backend.__name__,
        "group_size": group,
        "load_s": load_s,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "env_backend": os.environ.get("KT_RAWINT4_BACKEND", ""),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
