"""`hybrid profile [MODEL] --prompts FILE [--out TRACE]`: record which experts a model picks.

Runs every prompt through the model (hybrid.load; MODEL defaults to the embedded demo model),
prefill and `--new-tokens` greedy decode steps, with a TraceRecorder on every MoE layer, and
writes the routing trace (counts and the token sequence) for `hybrid plan`.

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
                   help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--prompts", required=True, help="prompt file (.txt or .jsonl)")
    p.add_argument("--out", default="trace.safetensors", help="trace file to write")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="greedy decode steps recorded after each prompt (64)")
    p.add_argument("--counts-only", action="store_true",
                   help="do not keep the per-token sequence (smaller file; no replay)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip timing the run and comparing it with the cost model's prediction "
                        "for this machine (which measures RAM bandwidth, a few seconds)")
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
    from hybrid.planner.model_spec import load_model_spec

    if args.new_tokens < 0:
        print("error: --new-tokens must be >= 0", file=sys.stderr)
        return 2
    try:
        model = hybrid.load(args.model)
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: no tokenizer found next to the checkpoint")
        prompts = read_prompts(args.prompts, model.tokenizer)
        spec = load_model_spec(str(model.path))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    moe = [layer.mlp for layer in model.net.layers if hasattr(layer.mlp, "trace")]
    layers = [m.layer for m in moe]
    if layers != list(spec.moe_layers):
        print(f"error: the loaded model's MoE layers {layers} differ from its config's "
              f"{list(spec.moe_layers)}", file=sys.stderr)
        return 2
    recorder = traces.TraceRecorder.for_spec(spec, keep_sequence=not args.counts_only,
                                             source=f"recorded: {args.prompts} on {model.path}")
    for m in moe:
        m.trace = recorder.record
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
            m.trace = None
    tr = recorder.to_trace(notes={"prompts": len(prompts), "new_tokens": args.new_tokens,
                                  "clipped_prompts": clipped})
    if not args.no_compare and tr.tokens:
        tr.notes["cost_model_check"] = _compare(model, spec, tr, timing, prompts)
    traces.save(tr, args.out)
    print(f"wrote {args.out}: {tr.describe()}")
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


def _compare(model, spec, trace, timing: dict, prompts) -> dict:
    """This run's measured speed next to the cost model's prediction for this machine, with the
    routing just recorded and nothing cached (the check DESIGN.md asks of the cost model)."""
    import dataclasses

    import numpy as np
    import torch

    from hybrid.planner.cost import CostModel, local_machine

    print("measuring this machine for the cost-model check ...")
    machine = local_machine(measure=True)
    layer = getattr(getattr(model.net.layers[spec.moe_layers[0]].mlp, "routed", None), "layer",
                    None)
    dev_fmt = "fp32" if model.dtype == torch.float32 else "bf16"
    fmt = {"int4": "int4_g32", "int8": "int8_g32", "bf16": "bf16"}.get(
        getattr(layer, "format", None), dev_fmt)
    spec = dataclasses.replace(spec, expert_format=fmt)
    mean_prompt = max(1, int(np.mean([len(p) for p in prompts])))
    cm = CostModel(spec, machine, gpu_expert_format=dev_fmt, device_weight_format=dev_fmt,
                   kv_tokens=mean_prompt, prefill_chunk=mean_prompt)
    freq = trace.frequencies()
    none = np.zeros(freq.shape, dtype=bool)
    out = {"machine": machine.name, "cpu_read_gbps": round(machine.cpu_read_gbps, 2),
           "expert_format": fmt,
           "predicted_decode_tok_s": cm.decode_tok_s(freq, none),
           "predicted_prefill_tok_s": float(cm.prefill(freq, none)["tok_s"])}
    if timing["decode_tokens"]:
        out["measured_decode_tok_s"] = timing["decode_tokens"] / timing["decode_s"]
    if timing["prefill_tokens"]:
        out["measured_prefill_tok_s"] = timing["prefill_tokens"] / timing["prefill_s"]
    for kind in ("decode", "prefill"):
        pred, meas = out[f"predicted_{kind}_tok_s"], out.get(f"measured_{kind}_tok_s")
        if meas:
            print(f"{kind}: measured {meas:.2f} tok/s, cost model predicts {pred:.2f} tok/s "
                  f"(ratio {meas / pred:.2f})")
    meas = out.get("measured_decode_tok_s")
    if meas:
        # What the per-layer host overhead would have to be for the model to match this run.
        gap = 1.0 / meas - 1.0 / out["predicted_decode_tok_s"]
        implied = machine.layer_overhead_us + gap / spec.num_layers * 1e6
        out["implied_layer_overhead_us"] = implied
        print(f"decode matches the cost model with layer_overhead_us = {implied:.0f} "
              f"(assumed {machine.layer_overhead_us:g}); put it in a machine YAML for `hybrid plan`")
    return out
