"""`hybrid doctor [MODEL] [--json]`: what this machine has, what it measures, what to expect.

One screen: CPU, ISA paths (supported and chosen), cores, NUMA, RAM, transparent huge pages,
GPUs and free VRAM, disk space where the model lives; measured RAM read bandwidth and expert
kernel throughput (a few seconds); for MODEL (a checkpoint directory, a GGUF file, or the built-in
"kimi-k2.5"; default kimi-k2.5) whether it fits in RAM and VRAM and the expected decode and
prefill speed with no GPU expert cache and with the best plan for the VRAM found.
"""

from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check this machine and what speed to expect",
                              description=__doc__.split("\n\n", 1)[0])
    p.add_argument("model", nargs="?", default="kimi-k2.5",
                   help="checkpoint directory, a .gguf file (the first of a split set), or built-in "
                        "'kimi-k2.5' (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the bandwidth and kernel measurements (instant)")
    p.add_argument("--trace", default=None, help="routing trace to predict with (default: "
                   "uniform routing, the worst case for the GPU cache)")
    p.add_argument("--context", default="32k", help="context to reserve KV cache for (32k)")
    p.add_argument("--machine", default=None, metavar="YAML",
                   help="expect with these machine parameters, e.g. the ones `hybrid profile "
                        "--calibrate` fitted on this machine, instead of the measured RAM "
                        "bandwidth and assumed rates")
    p.set_defaults(func=main)


def _isa_chosen():
    """hybrid.native.isa() when the extension is built (native-core's API)."""
    try:
        import hybrid.native as native
    except Exception as e:  # not built / import error: report, do not fail doctor
        return None, f"extension not available ({type(e).__name__})"
    try:
        got = native.isa()
    except Exception as e:
        return None, f"hybrid.native.isa() failed: {e}"
    if isinstance(got, dict):  # {"active": name, "available": [...], "forced": ..., ...}
        return str(got.get("active")), None
    return str(got), None


def _main_expert_type(gguf: dict | None) -> str | None:
    """The routed-expert type holding the most bytes of a described GGUF (describe_gguf), when the
    kernels run it in its blocks (its decode rate is its own: the lattice types are
    compute-bound); else None."""
    from hybrid import native

    types = (gguf or {}).get("routed_expert_types") or {}  # largest first
    main = next(iter(types), None)
    return main.lower() if main in native.GGUF_NATIVE else None


def _kernel_gbps(seconds: float, gguf_type: str | None = None):
    """Expert-kernel read throughput (hybrid/runtime/measure.py's probe over the CPU engine), on
    INT4 experts or on blocks of a GGUF's main routed type."""
    from hybrid.runtime.measure import measure_expert_kernel_gbps

    try:
        r = measure_expert_kernel_gbps(seconds, gguf_type=gguf_type)
    except ImportError as e:
        return None, f"engine not built ({e})"
    except Exception as e:  # report, never crash doctor
        return None, f"expert-kernel probe failed: {type(e).__name__}: {e}"
    what = f"{gguf_type.upper()} experts (the file's main routed type)" if gguf_type else "INT4 experts"
    return r["gbps"], f"1 token x {r['experts']} K2.5-sized {what}, {r['isa']} path"


def collect(args) -> dict:
    from hybrid import __version__
    from hybrid.planner import hostinfo
    from hybrid.planner import trace as traces
    from hybrid.planner.cost import local_machine
    from hybrid.planner.expect import expectations
    from hybrid.runtime.gguf_experts import model_spec_for
    from hybrid.planner.units import parse_tokens

    measure = not args.no_measure
    model_path = args.model if args.model and os.path.exists(args.model) else None
    info = hostinfo.collect(measure_bandwidth=measure,
                            path=model_path or os.getcwd())
    isa, isa_err = _isa_chosen()
    info["isa_chosen"] = isa
    if isa_err:
        info["isa_chosen_note"] = isa_err
    described: dict = {}  # a GGUF's description, under "gguf" (read once, for the probe and the report)
    try:
        spec, spec_error = model_spec_for(args.model, described), None
    except (ValueError, FileNotFoundError) as e:
        spec, spec_error = None, e
    if measure:
        info["expert_kernel_gbps"], info["expert_kernel_source"] = _kernel_gbps(
            1.0, _main_expert_type(described.get("gguf")))
    machine = local_machine(measure=measure, info=info)
    machine_error = None
    if args.machine:
        from hybrid.planner.cost import MachineSpec

        try:
            machine = MachineSpec.from_yaml(args.machine)
        except (OSError, ValueError) as e:
            machine_error = f"--machine {args.machine}: {e}"
    report = {"hybrid_version": __version__, "machine": info, "machine_model": machine.to_dict(), **described}
    if machine_error:
        report["expect"] = {"error": machine_error}
        report["advice"] = advice(report)
        return report
    try:
        import torch

        report["torch"] = torch.__version__
    except ImportError:
        report["torch"] = None
    try:
        if spec_error is not None:
            raise spec_error
        trace = traces.load(args.trace, with_sequence=False) if args.trace else None
        context = parse_tokens(args.context, "--context")
        report["expect"] = expectations(spec, machine, trace, context)
    except (ValueError, FileNotFoundError) as e:
        report["expect"] = {"error": str(e)}
    report["advice"] = advice(report)
    return report


def _render_gguf(con, g: dict, gpu: bool) -> None:
    from hybrid.planner.units import fmt_bytes

    files = g["files"]
    where = files[0]["path"] + (f" (+{len(files) - 1} more files of its split set)" if len(files) > 1 else "")
    con.print(f"\n[bold]GGUF[/bold] {where}: {g['architecture']} ({g['model_type']})"
              + (f", '{g['name']}'" if g.get("name") else "")
              + f", {g['tensors']} tensors, {fmt_bytes(g['file_bytes'])}")
    for label, key in (("routed experts", "routed_expert_types"), ("everything else", "other_types")):
        parts = ", ".join(f"{t} {fmt_bytes(d['bytes'])} ({d['tensors']})" for t, d in g[key].items())
        con.print(f"  {label}: {parts}")
    held: dict[str, int] = {}
    for x in g["expert_layers"]:
        held[x["held_as"]] = held.get(x["held_as"], 0) + 1
    how = ", ".join(f"{n} layer(s) {'in their own blocks' if h == 'native' else 're-packed as ' + h}"
                    for h, n in held.items())
    where = (f"stay in their own blocks on this CPU-only machine (device matrices "
             f"{fmt_bytes(g['blocks_bytes'])}; device_weights='blocks', the default without a GPU)" if not gpu
             else "are dequantised once to the device format")
    con.print(f"  CPU engine: {how}; routed experts in RAM {fmt_bytes(g['routed_ram_bytes'])}; "
              f"non-expert tensors ({fmt_bytes(g['other_file_bytes'])} in the file) {where}")
    mm = g.get("mmproj") or {}
    if mm.get("params"):
        con.print(f"  images: the vision tower in {mm['path']} ({fmt_bytes(mm['file_bytes'])}; "
                  f"{mm['params'] / 1e6:,.1f} M parameters, {fmt_bytes(2 * mm['params'])} on the device in bf16)")
    elif mm.get("error"):
        con.print(f"  [yellow]images:[/yellow] {mm['error']}")
    else:
        con.print("  images: none (no mmproj*.gguf beside the file; llama.cpp's mmproj GGUF of Kimi K2.5 "
                  "gives image input: --mmproj FILE)")
    if any(h != "native" for h in held):
        con.print("  [yellow]note:[/yellow] types without a native kernel "
                  f"(native: {', '.join(g['native_types']) or 'none yet'}) are dequantised and "
                  "re-quantised at load (lossy except float -> bf16)")


def advice(r: dict) -> list:
    """Concrete things a person can do, from the facts collected."""
    from hybrid.planner.units import fmt_bytes

    out = []
    m = r["machine"]
    if m.get("thp") == "never":
        out.append("Transparent huge pages are off: `echo madvise | sudo tee "
                   "/sys/kernel/mm/transparent_hugepage/enabled` cuts TLB misses on expert reads.")
    if m.get("numa_nodes", 1) > 1:
        out.append(f"{m['numa_nodes']} NUMA nodes: keep the default NUMA-aware thread pool; "
                   "do not pin the process to one node.")
    if not m.get("gpus"):
        out.append("No CUDA GPU: everything runs on the CPU (works, slower; no expert cache).")
    if "amx" in m.get("isa_supported", []) and m.get("isa_chosen") not in (None, "amx"):
        out.append("The CPU has AMX but the engine chose another path: check the kernel allows "
                   "AMX (arch_prctl XCOMP_PERM; Linux >= 5.16).")
    if m.get("isa_chosen") is None:
        out.append("The C++ engine is not built: `pip install -e .` builds it.")
    e = r.get("expect", {})
    if "ram" in e and not e["ram"]["fits"]:
        out.append(f"{e['model']['id']} needs {fmt_bytes(e['ram']['needed_bytes'])} of RAM, this "
                   f"machine has {fmt_bytes(e['ram']['available_bytes'])}: it will not run here "
                   f"at useful speed (experts would page from disk).")
    dw = e.get("device_weights", {})
    if m.get("gpus") and dw and not dw.get("bf16", {}).get("vram_fits", True):
        if dw.get("int8", {}).get("vram_fits"):
            out.append("bf16 device weights do not fit the GPU with the KV cache: load with "
                       "device_weights='int8' (hybrid plan --device-weights int8).")
        else:
            out.append("Even int8 device weights do not fit the GPU: use a shorter context.")
    if e.get("profiles"):
        best = e["profiles"][0]
        out.append(f"Shipped placement profile for this GPU: {best['path']} (predicted "
                   f"{best['decode_tok_s']:.1f} tok/s on its reference machine; make your own "
                   f"with `hybrid profile` + `hybrid plan --machine local`).")
    if "disk" in m and m["disk"]["free_bytes"] < 50 * 2**30:
        out.append(f"Only {fmt_bytes(m['disk']['free_bytes'])} free on {m['disk']['path']}: "
                   f"packed expert caches need room next to the checkpoint.")
    return out


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from hybrid.planner.units import fmt_bytes

    con = Console()
    m = r["machine"]
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("hybrid", f"{r['hybrid_version']}  (torch {r.get('torch')})")
    t.add_row("CPU", f"{m['cpu_model']}: {m['physical_cores']} cores / {m['logical_cores']} "
              f"threads, {m['numa_nodes']} NUMA node(s)")
    chosen = m.get("isa_chosen") or f"- ({m.get('isa_chosen_note', 'unknown')})"
    t.add_row("ISA", f"supported: {', '.join(m['isa_supported'])}; engine uses: {chosen}")
    t.add_row("RAM", f"{fmt_bytes(m['ram_total_bytes'])} total, "
              f"{fmt_bytes(m['ram_available_bytes'])} available; huge pages: {m['thp']}")
    if m.get("gpus"):
        for g in m["gpus"]:
            t.add_row(f"GPU {g['index']}", f"{g['name']}: {fmt_bytes(g['free_bytes'])} free of "
                      f"{fmt_bytes(g['total_bytes'])}")
    else:
        t.add_row("GPU", "none (CUDA not available): CPU-only mode")
    if "disk" in m:
        t.add_row("disk", f"{fmt_bytes(m['disk']['free_bytes'])} free at {m['disk']['path']}")
    if "ram_read_gbps" in m:
        t.add_row("RAM read", f"{m['ram_read_gbps']:.1f} GB/s measured ({m['ram_read_source']})")
        k = m.get("expert_kernel_gbps")
        if k:
            t.add_row("expert kernel", f"{k:.1f} GB/s = {k / m['ram_read_gbps']:.0%} of RAM read "
                      f"({m['expert_kernel_source']})")
        else:
            t.add_row("expert kernel", f"- ({m.get('expert_kernel_source')})")
    else:
        t.add_row("measured", "skipped (--no-measure)")
    con.print(t)

    if r.get("gguf"):
        _render_gguf(con, r["gguf"], bool(m.get("gpus")))
    e = r.get("expect", {})
    if "error" in e:
        con.print(f"[red]model:[/red] {e['error']}")
    elif e:
        con.print(f"\n[bold]{e['model']['id']}[/bold] ({e['model']['moe_layers']} MoE layers x "
                  f"{e['model']['experts']} experts, top-{e['model']['top_k']}); routing: "
                  f"{e['routing']}")
        ram = e["ram"]
        mark = "[green]fits[/green]" if ram["fits"] else "[red]does not fit[/red]"
        con.print(f"  RAM: needs {fmt_bytes(ram['needed_bytes'])} "
                  f"(experts {fmt_bytes(ram['parts']['routed_experts'])}), has "
                  f"{fmt_bytes(ram['available_bytes'])}: {mark}")
        if e["model"].get("vision_params"):
            vp = e["model"]["vision_params"]
            con.print(f"  images: a vision tower of {vp / 1e6:.0f}M weights, {fmt_bytes(2 * vp)} in bf16 beside "
                      "the device weights, counted here (a load with --no-images leaves it out)")
        tt = Table(title=f"expected speed ({e['context_tokens']} tokens of KV reserved)")
        for col in ("device weights", "VRAM", "decode tok/s, no cache", "prefill tok/s",
                    "decode tok/s, best plan", "cached experts"):
            tt.add_column(col, justify="right")
        for fmt, d in e["device_weights"].items():
            if "best_plan" in d:
                vram, bp = "fits", d["best_plan"]
                best = f"{bp['decode_tok_s']:.2f}"
                n = (f"{bp['cached_experts']} x {fmt_bytes(bp['bytes_per_expert'])} "
                     f"({bp['expert_format']})")
            elif "vram_problem" in d:
                vram = f"needs {fmt_bytes(d['vram_needed_bytes'])}"
                best, n = "-", "-"
            else:
                vram, best, n = "no GPU", "-", "-"
            tt.add_row(f"{fmt} ({fmt_bytes(d['device_weights_bytes'])})", vram,
                       f"{d['no_cache']['decode_tok_s']:.2f}",
                       f"{d['no_cache']['prefill_tok_s']:.0f}", best, n)
        con.print(tt)
        lw = e.get("layerwise_prefill")
        if lw:
            con.print(f"  {_layerwise_line(lw, fmt_bytes)}")
    if r["advice"]:
        con.print("\n[bold]what to do[/bold]")
        for a in r["advice"]:
            con.print(f"  - {a}")


def _layerwise_line(lw: dict, fmt_bytes) -> str:
    """One line on layerwise prefill (hybrid/runtime/layerwise.py): its VRAM and threshold."""
    act = lw.get("chunk_activation_bytes", 0)
    head = (f"layerwise prefill: two layer buffers {fmt_bytes(lw['device_bytes'])}"
            + (f" + a chunk's activations {fmt_bytes(act)}" if act else "")
            + f" of VRAM (+ {fmt_bytes(lw['pinned_host_bytes'])} pinned RAM): ")
    if not lw["fits"]:
        return head + f"off ({lw['note']})"
    t = lw.get("threshold_tokens")
    if t is None:
        return head + "fits, but no chunk size streams faster than the CPU here"
    p = lw["at_twice_threshold"]
    return head + (f"on for chunks of >= {t} tokens (at {2 * t}: {p['tok_s_layerwise']:.0f} tok/s "
                   f"streamed vs {p['tok_s_cpu']:.0f} on the CPU)")


def main(args) -> int:
    import json

    r = collect(args)
    if args.json:
        print(json.dumps(r, indent=2, default=float))
    else:
        render(r)
    return 0
