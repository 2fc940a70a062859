"""Check the cost model against measured decode runs on this machine.

    python bench/cost_model_check.py --tiny /tmp/cmc-tiny            # tiny INT4 test checkpoint
    python bench/cost_model_check.py --full-width /tmp/cmc-k25 --experts 64
    python bench/cost_model_check.py MODEL_DIR [--machine-out m.yaml] [--json out.json]

1. Record the routing of a fixed token sequence (prompt + teacher-forced decode tokens, so every
   placement sees the same tokens).
2. For each placement (--fractions of every layer's experts cached, most picked first), write
   its profile, and hold its GPU caches (GpuExpertCache.from_packed, what hybrid.load(path,
   profile=...) builds; the largest placement's caches hold the experts (INT4 as packed) once and the
   smaller ones are views of their first slots). Then decode the sequence --rounds times with
   the placements taking turns STEP BY STEP, each with its own KV cache, and the model's parts
   (engine, GPU cache, torch matmul: hybrid.planner.calibrate.part_probes) timed between the
   steps, so load from other work on the machine lands on all of them alike. Measured = the
   --stat of its steps: by default "paired" (the median ratio of its step to the no-cache step
   of the same token, times the no-cache lower quartile), also each placement's own median
   and lower quartile.
3. Fit the machine parameters on two placements (none and --fit-on) and predict ALL placements
   with the fitted MachineSpec; the others are the check (target: within 15%).

--tiny builds the test suite's tiny DeepSeek-V3 checkpoint (tests/checkpoints.py, INT4 experts).
--full-width writes bench/e2e.py's synthetic K2.5-width checkpoint (H 7168, I 2048, INT4
group 32, one dense + one MoE layer), with --experts routed experts (K2.5: 384; fewer keep the
GPU-cache copies within this machine's RAM: each cached expert is 24.8 MB in INT4): per token the
engine reads 8 full-width experts either way, so the routed bytes per token are K2.5's.
Speeds are this machine's, under whatever else runs on it: the check is prediction vs
measurement on the same machine at the same time, not a speed claim.

Measured 2026-11-29 on the shared 2-core dev box (Xeon, AVX-512/AMX, no GPU; load average 5-8
from other work; engine and torch 1 thread each; paired statistic; fit on 0% and 25%):
  model                            placements checked (cached share: error)         worst
  tiny test checkpoint (H 64)      6.25%: -8.3  12.5%: -6.5  50%: -2.3                8.3%
  demo model (H 256, 4 MoE layers)  6.25%: +5.5  12.5%: +4.4  50%: +2.0                5.5%
  K2.5 width, 64 experts            12.5%: -7.6  50%: +4.2   75%: +2.4                7.6%
  (an uncalibrated local machine predicts 1583, 778 and 12.4 tok/s for the three with nothing
  cached; measured 332, 81 and 2.9)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _tiny_checkpoint(path: Path) -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from checkpoints import build  # the test suite's tiny checkpoint builder

    ckpt = path / "ckpt-int4-0"
    if not (ckpt / "config.json").is_file():
        build(path, variant="int4", shards=1)
    return ckpt


def _full_width_checkpoint(path: Path, experts: int) -> Path:
    sys.path.insert(0, str(HERE))
    import e2e  # bench/e2e.py owns the synthetic K2.5-width writer

    if not (path / "config.json").is_file():
        print(f"writing a K2.5-width checkpoint with {experts} experts to {path} ...",
              file=sys.stderr)
        e2e.write_synthetic(path, experts=experts)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory")
    ap.add_argument("--tiny", metavar="DIR", help="build (if absent) and check the tiny checkpoint")
    ap.add_argument("--full-width", metavar="DIR", help="write (if absent) and check a "
                    "K2.5-width one-MoE-layer checkpoint")
    ap.add_argument("--experts", type=int, default=64, help="--full-width routed experts (64)")
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75",
                    help="cached fraction of each layer's experts, per placement")
    ap.add_argument("--fit-on", type=float, default=0.5,
                    help="the cached fraction the fit uses besides 0 (0.5)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved runs per placement (5)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (32)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per run (32)")
    ap.add_argument("--stat", choices=["median", "q25", "paired"], default="paired",
                    help="how step and part timings are summarised for the fit and the check: "
                         "median; q25 (lower quartile: on a machine busy with other work steps "
                         "are either undisturbed or preempted); paired (default: each "
                         "placement's steps divided by the no-cache step of the same token, "
                         "taken milliseconds apart, median ratio times the no-cache q25)")
    ap.add_argument("--threads", type=int, default=1,
                    help="engine and torch threads (1: on a shared machine, multi-threaded ops "
                         "wait for busy cores and the timings become noise; 0: hybrid.load's "
                         "default)")
    ap.add_argument("--profiles-dir", help="write the placement profiles here (default: a "
                    "temporary folder)")
    ap.add_argument("--machine-out", help="write the fitted machine YAML here")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    given = [x for x in (args.model, args.tiny, args.full_width) if x]
    if len(given) != 1:
        ap.error("give one of MODEL, --tiny DIR, --full-width DIR")
    fractions = sorted({float(f) for f in args.fractions.split(",")})
    if 0.0 not in fractions or args.fit_on not in fractions:
        ap.error(f"--fractions must include 0 and --fit-on ({args.fit_on})")
    if any(not 0 <= f <= 1 for f in fractions):
        ap.error("--fractions must be in [0, 1]")

    import numpy as np
    import torch

    import hybrid
    from hybrid.planner import calibrate as cal
    from hybrid.runtime import calibration

    if args.tiny:
        path = _tiny_checkpoint(Path(args.tiny))
        label = "tiny test checkpoint"
    elif args.full_width:
        path = _full_width_checkpoint(Path(args.full_width), args.experts)
        label = f"K2.5-width synthetic, {args.experts} experts"
    else:
        path, label = Path(args.model), Path(args.model).name
    load_opts = dict(progress=False, packed_cache=True, max_len=args.prompt + args.decode + 8)
    if args.threads:
        load_opts["threads"] = args.threads

    model = hybrid.load(path, **load_opts)
    rng = np.random.default_rng(args.seed)
    toks = rng.integers(2, model.config.vocab_size, size=args.prompt + args.decode).tolist()
    res = calibration.check(model, path, toks[:args.prompt], toks[args.prompt:], fractions,
                    args.fit_on, rounds=args.rounds, label=label,
                    profiles_dir=args.profiles_dir, stat=args.stat)
    machine, report, rows, worst = res["machine"], res["fit"], res["rows"], res["worst_error"]
    print()
    print(f"fitted machine ({label}):")
    for k in ("cpu_kernel_gbps", "sync_us", "gpu_mem_gbps", "gpu_expert_overhead_us",
              "gpu_cache_layer_us", "layer_overhead_us"):
        print(f"  {k:24s} {getattr(machine, k):10.2f}")
    print("fit details: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in report.items()))
    print()
    cal.print_table(rows)
    ok = worst <= 0.15
    checked = [r for r in rows if not r["fit_input"]]
    if checked:
        print(f"\nplacements not used by the fit: worst error {worst:.1%} "
              f"({'within' if ok else 'OUTSIDE'} the 15% target)")
    if args.machine_out:
        cal.save_machine(machine, args.machine_out,
                         f"machine parameters fitted by bench/cost_model_check.py on {label}")
        print(f"wrote {args.machine_out}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": str(path), "label": label, "rounds": args.rounds, "prompt": args.prompt,
             "decode": args.decode, "statistic": args.stat,
             "torch_threads": torch.get_num_threads(),
             "parts": dataclasses.asdict(res["parts"]), "fit": report,
             "machine": machine.to_dict(), "rows": rows,
             "steps_s": {str(f): v for f, v in res["steps_s"].items()},
             "worst_error_unfitted": worst}, indent=1, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
