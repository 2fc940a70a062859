"""`hybrid plan`: choose the experts to cache in VRAM from a routing trace; write a profile.

  hybrid plan --trace T --vram 24GiB [--context 32k] [--machine reference|local|FILE]
              [--model kimi-k2.5|CHECKPOINT_DIR] [--device-weights bf16|int8|fp8]
              [--gpu-format int4_g32|int8_g32|bf16|fp32] [--online] --out profiles/NAME.yaml [--plot DIR]

Prints the budget, then none / uniform / top-N / plan (/ online) side by side.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="make a placement profile (which experts live in VRAM) from a trace",
        description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--trace", required=True, nargs="+", metavar="TRACE",
                   help="trace file(s) (.safetensors from `hybrid profile` or "
                        "scripts/make_synthetic_traces.py); several are merged")
    p.add_argument("--vram", default=None,
                   help="VRAM budget, e.g. 24GiB (default: the machine's VRAM)")
    p.add_argument("--context", default="32k", help="context length to reserve KV for (32k)")
    p.add_argument("--machine", default="reference",
                   help="'reference' (8-ch DDR5 + 24 GB GPU), 'local' (this machine, measured), "
                        "or a machine YAML file")
    p.add_argument("--model", default="kimi-k2.5",
                   help="checkpoint dir, config.json, or built-in 'kimi-k2.5' (default)")
    p.add_argument("--device-weights", default="bf16", choices=["bf16", "int8", "fp8"],
                   help="format of the non-expert weights on the GPU (bf16)")
    p.add_argument("--gpu-format", default=None, choices=["int4_g32", "int8_g32", "bf16", "fp32"],
                   help="format of cached experts in VRAM (default: the experts' storage format, "
                        "what hybrid's GPU cache holds: int4_g32 for Kimi K2.5)")
    p.add_argument("--batch", type=int, default=1, help="decode batch to optimise for (1)")
    p.add_argument("--decode-at", default="4k",
                   help="context position at which decode speed is predicted (4k)")
    p.add_argument("--online", action="store_true",
                   help="also replay the trace with online re-placement (needs a sequence)")
    p.add_argument("--layerwise-prefill", action="store_true",
                   help="reserve VRAM for layerwise prefill's two layer buffers (left off, with "
                        "the reason in the budget, when they do not fit)")
    p.add_argument("--no-images", action="store_true",
                   help="leave the vision tower out of the budget (for loads with --no-images / "
                        "images_enabled=False: its VRAM goes to experts)")
    p.add_argument("--out", default=None, help="profile YAML to write")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG figures to DIR")
    p.set_defaults(func=main)


def _table(rows, title):
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("strategy", "left"), ("cached", "right"), ("hit rate", "right"),
                      ("decode tok/s", "right"), ("vs none", "right"),
                      ("prefill tok/s", "right"), ("replay tok/s", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        t.add_row(*r)
    return t


def main(args) -> int:
    import dataclasses

    from rich.console import Console

    from hybrid.planner import plan as planner
    from hybrid.planner import profile as profiles
    from hybrid.planner import simulate
    from hybrid.planner import trace as traces
    from hybrid.planner.cost import CostModel, machine_from_arg
    from hybrid.runtime.gguf_experts import model_spec_for
    from hybrid.planner.units import parse_bytes, parse_tokens

    con = Console()
    try:
        model = model_spec_for(args.model)
        if args.no_images:
            model = dataclasses.replace(model, vision_params=0)
        vram = parse_bytes(args.vram, "--vram") if args.vram else None
        context = parse_tokens(args.context, "--context")
        decode_at = parse_tokens(args.decode_at, "--decode-at")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        machine = machine_from_arg(args.machine, vram)
        if not machine.gpu_present:
            raise ValueError(f"--machine {args.machine}: no GPU, so every expert runs on the CPU "
                             f"and there is nothing to place; plan for a GPU with --machine "
                             f"reference or a machine YAML (`hybrid doctor` shows this "
                             f"machine's expected speed)")
        loaded = []
        for path in args.trace:
            with con.status(f"loading {path}"):
                loaded.append(traces.load(path, with_sequence=args.online))
        trace = loaded[0] if len(loaded) == 1 else traces.merge(loaded)
        cost = CostModel(model, machine, gpu_expert_format=args.gpu_format,
                         device_weight_format=args.device_weights, kv_tokens=decode_at,
                         layerwise_prefill=args.layerwise_prefill)
        result = planner.make_plan(cost, trace, context, batch=args.batch)
    except (ValueError, FileNotFoundError) as e:   # TraceError, PlanError are ValueErrors
        con.print(f"[red]error:[/red] {e}")
        return 2

    con.print(f"[bold]model[/bold] {model.model_id} ({model.config_hash}), "
              f"{len(model.moe_layers)} MoE layers x {model.num_experts} experts, top-{model.top_k}")
    con.print(f"[bold]machine[/bold] {machine.name}: RAM read {machine.cpu_read_gbps:g} GB/s x "
              f"{machine.cpu_kernel_efficiency:g}, GPU {machine.gpu_mem_gbps:g} GB/s, PCIe "
              f"{machine.pcie_gbps:g} GB/s")
    con.print(f"[bold]trace[/bold] {trace.describe()}")
    if trace.synthetic:
        con.print("[yellow]synthetic trace: the plan is only as good as its assumptions; record "
                  "a real one with `hybrid profile`[/yellow]")
    for line in result.budget.lines():
        con.print("  " + line)

    preds = result.predictions
    extra = {}
    replays = {}
    if args.online:
        if trace.seq is None:
            con.print("[red]error:[/red] --online needs a trace with a token sequence")
            return 2
        with con.status("replaying the trace (static plan and online policy)"):
            replays["plan"] = simulate.replay(trace, result.masks["plan"], cost)
            pol = simulate.OnlinePolicy()
            on = simulate.replay_online(trace, result.masks["plan"], cost, pol,
                                        prior=trace.frequencies())
        extra["online"] = {"decode_tok_s": on.decode_tok_s, "hit_rate": on.hit_rate,
                           "cached_experts": int(result.masks["plan"].sum()),
                           "swaps": on.swaps, "measured_by": "trace replay"}
        extra["plan_replayed"] = replays["plan"].to_dict()
    base = preds["none"]["decode_tok_s"]
    rows = []
    for name, p in preds.items():
        rp = replays.get(name)
        rows.append((name, str(p["cached_experts"]), f"{p['hit_rate']:.1%}",
                     f"{p['decode_tok_s']:.2f}", f"{p['decode_tok_s'] / base:.3f}x",
                     f"{p['prefill_tok_s']:.0f}", f"{rp.decode_tok_s:.2f}" if rp else "-"))
    if "online" in extra:
        o = extra["online"]
        rows.append(("online", f"{o['cached_experts']} ({o['swaps']} swaps)",
                     f"{o['hit_rate']:.1%}", "-", "-", "-", f"{o['decode_tok_s']:.2f}"))
    con.print(_table(rows, f"predicted speed at {decode_at} tokens of context, batch {args.batch}"))
    if "online" in extra:
        gain = extra["online"]["decode_tok_s"] / replays["plan"].decode_tok_s - 1
        con.print(f"  online is measured by trace replay only: {gain:+.1%} against the static "
                  f"plan replayed on the same tokens")

    if args.out:
        online_cfg = {"enabled": False}
        if args.online:
            online_cfg = {"enabled": False, "evaluated": True,
                          "policy": vars(simulate.OnlinePolicy()),
                          "note": "off by default; enable in the runtime to use it"}
        prof = profiles.build(model, machine, trace, result, cost, strategy="plan",
                              trace_path=",".join(args.trace), online=online_cfg,
                              extra_predictions=extra, command=_command_line(args))
        profiles.save(prof, args.out)
        con.print(f"wrote {args.out}")
    if args.plot:
        budgets, sweep = _sweep(cost, trace, context, args.batch, machine)
        from hybrid.planner import plots

        files = plots.write_all(args.plot, trace, sweep, budgets,
                                f"{model.model_id} on {machine.name} "
                                f"({'synthetic' if trace.synthetic else 'recorded'} trace)",
                                mark_gib=machine.vram_bytes / 2**30)
        con.print("wrote " + ", ".join(files))
    return 0


def _command_line(args) -> str:
    """The `hybrid plan` invocation that reproduces this profile."""
    parts = ["hybrid plan", "--trace", *args.trace]
    for flag, value, default in (("--vram", args.vram, None), ("--context", args.context, "32k"),
                                 ("--machine", args.machine, "reference"),
                                 ("--model", args.model, "kimi-k2.5"),
                                 ("--device-weights", args.device_weights, "bf16"),
                                 ("--gpu-format", args.gpu_format, None),
                                 ("--batch", args.batch, 1), ("--decode-at", args.decode_at, "4k")):
        if value is not None and value != default:
            parts += [flag, str(value)]
    if args.online:
        parts.append("--online")
    if args.no_images:
        parts.append("--no-images")
    return " ".join(parts)


def _sweep(cost, trace, context, batch, machine):
    """Decode tok/s of every strategy over VRAM budgets from 8 GiB to max(96, 2 x VRAM) GiB."""
    import copy

    from hybrid.planner import plan as planner

    top = max(96, int(2 * machine.vram_bytes / 2**30))
    budgets = list(range(8, top + 1, 4))
    sweep = {}
    for gib in budgets:
        c = copy.copy(cost)
        c.machine = copy.copy(machine)
        c.machine.vram_bytes = gib * 2**30
        try:
            r = planner.make_plan(c, trace, context, batch)
            for name, p in r.predictions.items():
                sweep.setdefault(name, []).append(p["decode_tok_s"])
        except planner.PlanError:
            for name in ("none", "uniform", "top-N", "plan"):
                sweep.setdefault(name, []).append(None)
    return budgets, sweep
