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
    try:
        with Progress() as bar:
            task = bar.add_task("profiling", total=len(prompts))
            for ids in prompts:
                if len(ids) > room:
                    ids, clipped = ids[-room:], clipped + 1
                model.generate(ids, args.new_tokens)
                bar.advance(task)
    finally:
        for m in moe:
            m.trace = None
    tr = recorder.to_trace(notes={"prompts": len(prompts), "new_tokens": args.new_tokens,
                                  "clipped_prompts": clipped})
    traces.save(tr, args.out)
    print(f"wrote {args.out}: {tr.describe()}")
    if clipped:
        print(f"note: {clipped} prompt(s) kept only their last {room} tokens (max_len "
              f"{model.max_len})")
    return 0
