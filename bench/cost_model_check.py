"""Check the cost model against measured decode runs on this machine.

    python bench/cost_model_check.py --tiny /tmp/cmc-tiny            # tiny INT4 test checkpoint
    python bench/cost_model_check.py --full-width /tmp/cmc-k25 --experts 64
    python bench/cost_model_check.py MODEL_DIR [--machine-out m.yaml] [--json out.json]

1. Record the routing of a fixed token sequence (prompt + teacher-forced decode tokens, so every
   placement sees the same tokens) and time the model's parts (hybrid.planner.calibrate).
2. For each placement (--fractions of every layer's experts cached, most picked first), write
   its profile, and hold its GPU caches (GpuExpertCache.from_packed, what hybrid.load(path,
   profile=...) builds; the largest placement's caches hold the bf16 copies once and the
   smaller ones are views of their first slots). Then decode the sequence --rounds times with
   the placements taking turns STEP BY STEP, each with its own KV cache, so load from other
   work on the machine lands on all of them alike. Measured = median of all its steps.
3. Fit the machine parameters on two placements (none and --fit-on) and predict ALL placements
   with the fitted MachineSpec; the others are the check (target: within 15%).

--tiny builds the test suite's tiny DeepSeek-V3 checkpoint (tests/checkpoints.py, INT4 experts).
--full-width writes bench/e2e.py's synthetic K2.5-width checkpoint (H 7168, I 2048, INT4
group 32, one dense + one MoE layer), with --experts routed experts (K2.5: 384; fewer keep the
bf16 GPU-cache copies within this machine's RAM: each cached expert is 88 MB): per token the
engine reads 8 full-width experts either way, so the routed bytes per token are K2.5's.
Speeds are this machine's, under whatever else runs on it: the check is prediction vs
measurement on the same machine at the same time, not a speed claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
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
        # e2e.write_synthetic reads its shapes from the module's K25 table; only the expert
        # count changes here (it has no parameter for it).
        e2e.K25 = dict(e2e.K25, experts=experts)
        print(f"writing a K2.5-width checkpoint with {experts} experts to {path} ...",
              file=sys.stderr)
        e2e.write_synthetic(path)
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
    ap.add_argument("--reps", type=int, default=30, help="repetitions per micro-timing (30)")
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
    from hybrid.planner.cost import CostModel, local_machine
    from hybrid.planner.model_spec import load_model_spec

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
    fmt = {"int4": "int4_g32", "int8": "int8_g32", "bf16": "bf16"}[
        cal.moe_layers(model)[0].routed.layer.format]
    spec = dataclasses.replace(load_model_spec(str(path)), expert_format=fmt)
    dev_fmt = "fp32" if model.dtype == torch.float32 else "bf16"
    rng = np.random.default_rng(args.seed)
    toks = rng.integers(2, model.config.vocab_size, size=args.prompt + args.decode).tolist()
    prompt, decode = toks[:args.prompt], toks[args.prompt:]
    print(f"model {path} ({label}): {len(spec.moe_layers)} MoE layer(s) x {spec.num_experts} "
          f"experts, top-{spec.top_k}, expert {spec.expert_bytes() / 1e6:.2f} MB ({fmt}); "
          f"torch threads {torch.get_num_threads()}")
    trace = cal.record_routing(model, spec, prompt, decode)
    freq = trace.frequencies()
    print("timing the parts (engine, GPU cache, torch matmul) ...")
    parts = cal.measure_parts(model, reps=args.reps)
    gc.collect()

    base = local_machine(measure=False)
    cost = CostModel(spec, base, gpu_expert_format=dev_fmt, device_weight_format=dev_fmt,
                     kv_tokens=args.prompt + args.decode // 2, prefill_chunk=args.prompt)
    masks = {f: cal.fraction_mask(trace.counts, f) for f in fractions}
    out_dir = Path(args.profiles_dir or tempfile.mkdtemp(prefix="cost_model_check_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in fractions:
        if f > 0:   # the placements as profiles (what `hybrid.load(path, profile=...)` takes)
            cal.write_profile(str(out_dir / f"cached_{int(round(100 * f))}.yaml"), cost, trace,
                              masks[f], f"{f:.0%}", context_tokens=load_opts["max_len"])
    print(f"placement profiles in {out_dir}")
    print("building the GPU caches (the largest placement; smaller ones are its first slots) ...")
    placements = cal.nested_caches(model, trace.counts, fractions)
    for f in fractions:   # the caches hold exactly the profiles' experts
        got = {layer: sorted(c.experts) if c else [] for layer, c in placements[f].items()}
        want = {layer: sorted(np.nonzero(masks[f][i])[0].tolist())
                for i, layer in enumerate(spec.moe_layers)}
        assert got == want, f"placement {f}: caches differ from the profile"
    print(f"timing {len(fractions)} placements, {args.rounds} round(s) x {args.decode} steps, "
          f"taking turns step by step ...")
    steps = cal.time_placements(model, prompt, decode, placements, rounds=args.rounds)
    del placements
    runs = {f: steps[f] for f in fractions}

    def combined(f):
        return cal.RunTiming(label=f"{f:.0%}", mask=masks[f], step_s=runs[f])

    machine, report = cal.fit(cost, parts, freq, combined(0.0), combined(args.fit_on), label)
    fitted = dataclasses.replace(cost, machine=machine)
    before = cost.costs(freq, 1)
    after = fitted.costs(freq, 1)
    rows, worst = [], 0.0
    for f in fractions:
        meas = statistics.median(runs[f])
        pred = after.step_time(masks[f])
        err = pred / meas - 1
        used = f in (0.0, args.fit_on)
        if not used:
            worst = max(worst, abs(err))
        rows.append({"cached_fraction": f, "cached_experts": int(masks[f].sum()),
                     "hit_rate": float((freq * masks[f]).sum() / freq.sum()),
                     "measured_tok_s": 1 / meas, "measured_spread_tok_s":
                         [1 / float(np.percentile(runs[f], 75)),
                          1 / float(np.percentile(runs[f], 25))],
                     "predicted_tok_s": 1 / pred, "error": err, "fit_input": used,
                     "uncalibrated_tok_s": 1 / before.step_time(masks[f])})

    print()
    print(f"fitted machine ({label}):")
    for k in ("cpu_kernel_gbps", "sync_us", "gpu_mem_gbps", "gpu_expert_overhead_us",
              "gpu_cache_layer_us", "layer_overhead_us"):
        print(f"  {k:24s} {getattr(machine, k):10.2f}")
    print("fit details: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in report.items()))
    print()
    print("measured: median step over all rounds [interquartile range]")
    print(f"{'cached':>7} {'experts':>8} {'hit rate':>9} {'measured tok/s':>22} "
          f"{'predicted':>10} {'error':>7}  {'uncalibrated':>12}")
    for row in rows:
        lo, hi = row["measured_spread_tok_s"]
        print(f"{row['cached_fraction']:>7.0%} {row['cached_experts']:>8d} "
              f"{row['hit_rate']:>9.1%} {row['measured_tok_s']:>9.2f} [{lo:6.1f}-{hi:6.1f}] "
              f"{row['predicted_tok_s']:>10.2f} {row['error']:>+7.1%}  "
              f"{row['uncalibrated_tok_s']:>12.2f}" + ("  (fit input)" if row["fit_input"] else ""))
    ok = worst <= 0.15
    checked = [r for r in rows if not r["fit_input"]]
    if checked:
        print(f"\nplacements not used by the fit: worst error {worst:.1%} "
              f"({'within' if ok else 'OUTSIDE'} the 15% target)")
    if args.machine_out:
        import yaml

        with open(args.machine_out, "w") as fh:
            fh.write(f"# machine parameters fitted by bench/cost_model_check.py on {label}\n")
            yaml.safe_dump(machine.to_dict(), fh, sort_keys=False, width=100)
        print(f"wrote {args.machine_out}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": str(path), "label": label, "rounds": args.rounds, "prompt": args.prompt,
             "decode": args.decode, "torch_threads": torch.get_num_threads(),
             "parts": dataclasses.asdict(parts), "fit": report, "machine": machine.to_dict(),
             "rows": rows, "steps_s": {str(f): v for f, v in runs.items()},
             "worst_error_unfitted": worst}, indent=1, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
