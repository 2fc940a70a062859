"""`hybrid profile [MODEL] --prompts FILE [--out TRACE]`: record which experts a model picks.

Runs every prompt through the model (hybrid.load; MODEL defaults to the embedded demo model),
prefill and `--new-tokens` greedy decode steps, with a TraceRecorder on every MoE layer, and
writes the routing trace (counts and the token sequence) for `hybrid plan`. With
`--calibrate MACHINE.yaml` it then fits the cost model's machine parameters on this model
(hybrid.planner.calibrate) and writes them for `hybrid plan --machine MACHINE.yaml`.

Prompt files: .txt (one prompt per line; blank lines skipped) or .jsonl (one object per line
with "prompt" or "text", or "messages" rendered with the model's chat template).
"""

from __future__ import annotations

import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="record a routing trace by running prompts",
                              description=__doc__.split("\n\n", 1)[0])
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    p.add_argument("--out", default="trace.safetensors", help="trace file to write")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="greedy decode steps recorded after each prompt (64)")
    p.add_argument("--counts-only", action="store_true",
                   help="do not keep the per-token sequence (smaller file; no replay)")
    p.add_argument("--summary", metavar="YAML", default=None,
                   help="also write a human-readable summary of the trace (per layer: experts "
                        "used, share of picks of the most picked 10/25/50%%, top experts)")
    p.add_argument("--calibrate", metavar="MACHINE_YAML", default=None,
                   help="after recording, calibrate the cost model on this model and machine "
                        "(time the engine, the GPU cache and decode runs with nothing and with "
                        "some experts cached, fit the machine parameters, check one more "
                        "placement) and write the fitted machine for `hybrid plan --machine`")
    p.add_argument("--calibrate-rounds", type=int, default=2,
                   help="decode runs per placement for --calibrate (2)")
    p.set_defaults(func=main)


def read_prompts(path: str, tokenizer) -> list:
    """Token-id lists, one per prompt; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    jsonl = path.endswith(".jsonl")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append(tokenizer.encode(line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected an object with prompt, text or messages")
        if isinstance(obj.get("messages"), list):
            out.append(list(tokenizer.apply_chat_template(obj["messages"], tokenize=True)))
        elif isinstance(obj.get("prompt", obj.get("text")), str):
            out.append(tokenizer.encode(obj.get("prompt", obj.get("text"))))
        else:
            raise ValueError(f"{path}:{n}: needs a string 'prompt' or 'text', or 'messages'")
    if not out:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return out


def main(args) -> int:
    import sys

    from rich.progress import Progress

    import hybrid
    from hybrid.planner import trace as traces
    from hybrid.runtime.gguf_experts import model_spec_for

    if args.new_tokens < 0:
        print("error: --new-tokens must be >= 0", file=sys.stderr)
        return 2
    if args.calibrate_rounds < 1:
        print("error: --calibrate-rounds must be >= 1", file=sys.stderr)
        return 2
    try:
        model = hybrid.load(args.model)
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: no tokenizer found next to the checkpoint")
        prompts = read_prompts(args.prompts, model.tokenizer)
        spec = model_spec_for(str(model.path))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    moe = list(model.moe_layers().values())
    layers = [m.layer for m in moe]
    if layers != list(spec.moe_layers):
        print(f"error: the loaded model's MoE layers {layers} differ from its config's "
              f"{list(spec.moe_layers)}", file=sys.stderr)
        return 2
    recorder = traces.TraceRecorder.for_spec(spec, keep_sequence=not args.counts_only,
                                             source=f"recorded: {args.prompts} on "
                                                    f"{args.model or 'the embedded demo model'}")
    for m in moe:
        m.add_observer(on_routing=recorder.record)
    room = model.max_len - args.new_tokens
    clipped = 0
    timing = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}
    try:
        with Progress() as bar:
            task = bar.add_task("profiling", total=len(prompts))
            for ids in prompts:
                if len(ids) > room:
                    ids, clipped = ids[-room:], clipped + 1
                _run_timed(model, ids, args.new_tokens, timing)
                bar.advance(task)
    finally:
        for m in moe:
            m.remove_observer(recorder.record)
    tr = recorder.to_trace(notes={"prompts": len(prompts), "new_tokens": args.new_tokens,
                                  "clipped_prompts": clipped, "prompts_file": args.prompts,
                                  "model": args.model or "the embedded demo model"})
    for kind in ("decode", "prefill"):
        if timing[f"{kind}_tokens"]:
            tr.notes[f"measured_{kind}_tok_s"] = timing[f"{kind}_tokens"] / timing[f"{kind}_s"]
    traces.save(tr, args.out)
    print(f"wrote {args.out}: {tr.describe()}")
    if args.summary:
        _write_summary(tr, args)
    if "measured_decode_tok_s" in tr.notes:
        print(f"measured while recording (trace hook on): decode "
              f"{tr.notes['measured_decode_tok_s']:.2f} tok/s, prefill "
              f"{tr.notes.get('measured_prefill_tok_s', 0.0):.2f} tok/s")
    if args.calibrate:
        return _calibrate(model, prompts, args)
    if clipped:
        print(f"note: {clipped} prompt(s) kept only their last {room} tokens (max_len "
              f"{model.max_len})")
    return 0


def _run_timed(model, ids, new_tokens: int, acc: dict) -> None:
    """Generate greedily; prefill = until the first token, decode = the gaps after it."""
    import time

    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in model.stream(ids, new_tokens):
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            n += 1
        last = now
    if first is not None:
        acc["prefill_s"] += first - t0
        acc["prefill_tokens"] += len(ids)
        acc["decode_s"] += last - first
        acc["decode_tokens"] += n


def _write_summary(trace, args) -> None:
    import yaml

    summary = trace.summary()
    model = f" {args.model}" if args.model else ""    # none: the embedded demo model
    summary["recorded_with"] = (f"hybrid profile{model} --prompts {args.prompts} "
                                f"--new-tokens {args.new_tokens}")
    with open(args.summary, "w") as f:
        f.write("# routing trace summary, made by `hybrid profile --summary`: RECORDED, not "
                "synthetic\n")
        yaml.safe_dump(summary, f, sort_keys=False, width=100)
    print(f"wrote {args.summary}")


def _calibrate(model, prompts, args) -> int:
    """Fit this machine's cost-model parameters on the loaded model (calibrate.check): the
    prompts' own tokens, teacher-forced, as the timed sequence; none and 25% of each layer's
    experts cached for the fit, 12.5% as the check."""
    from hybrid.planner import calibrate as cal
    from hybrid.runtime import calibration

    toks = [t for ids in prompts for t in ids]
    P = min(32, max(1, len(toks) // 3))
    N = min(48, len(toks) - P, model.max_len - P - 2)
    if N < 8:
        import sys

        print(f"error: --calibrate needs at least {P + 8} prompt tokens in all, the prompts "
              f"have {len(toks)}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="calibration_profiles_") as tmp:
        res = calibration.check(model, model.path, toks[:P], toks[P:P + N], [0.0, 0.125, 0.25], 0.25,
                        rounds=args.calibrate_rounds, label=str(model.path), profiles_dir=tmp,
                        stat="paired")
    cal.print_table(res["rows"])
    machine = res["machine"]
    cal.save_machine(machine, args.calibrate,
                     f"this machine's cost-model parameters, calibrated by `hybrid profile "
                     f"--calibrate` on {model.path}")
    print(f"wrote {args.calibrate}; the placement not used by the fit is off by "
          f"{res['worst_error']:.1%}")
    if machine.gpu_present:
        print(f"plan with it: hybrid plan --machine {args.calibrate} ...")
    else:
        print("no GPU here: the \"device\" numbers are torch on this CPU, where caching experts "
              "does not pay; `hybrid plan` needs a machine with a GPU")
    return 0
