"""`hybrid run [MODEL] --prompt TEXT -n N`: print a model's continuation as it is generated.

The continuation goes to stdout (nothing else does, so it can be piped); loading progress and
the closing speed line go to stderr. --chat wraps the prompt in the model's chat template as
one user message. With no MODEL, the embedded demo model.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="generate a continuation of a prompt",
        description="Stream a model's continuation of --prompt to stdout (status goes to stderr).",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--prompt", "-p", default=None,
                   help="prompt text; '-' or omitted with piped input reads stdin")
    p.add_argument("-n", "--max-tokens", type=int, default=128, dest="max_tokens",
                   help="most tokens to generate (default 128)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="with --chat: thinking or instant mode (default: the template's default)")
    p.add_argument("--temperature", "-t", type=float, default=0.6,
                   help="sampling temperature, 0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL-style repetition penalty (default 1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible output")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-text tokens (for measuring speed)")
    p.add_argument("--context-length", type=int, default=None,
                   help="KV cache length in tokens (default: the model's, at most 4096)")
    # --device, --dtype, --experts, --profile, --device-weights, --threads, --online: the
    # same load flags as chat and serve.
    from hybrid.chat.loading import add_load_arguments

    add_load_arguments(p)
    p.set_defaults(func=main)


def _fail(message: str, code: int = 2) -> int:
    print(f"hybrid run: {message}", file=sys.stderr)
    return code


def _read_prompt(args) -> str | None:
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt == "-" or not sys.stdin.isatty():
        return sys.stdin.read()
    return None


def _prompt_ids(tokenizer, args, text: str) -> list[int]:
    if not args.chat:
        return tokenizer.encode_prompt(text)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         thinking=args.thinking, tokenize=True)


def main(args: argparse.Namespace) -> int:
    from hybrid.engine.sampling import SamplingParams

    if args.max_tokens < 1:
        return _fail(f"-n/--max-tokens must be >= 1, got {args.max_tokens}")
    if args.context_length is not None and args.context_length < 2:
        return _fail(f"--context-length must be >= 2, got {args.context_length}")
    if (args.system or args.thinking is not None) and not args.chat:
        return _fail("--system and --thinking only apply with --chat")
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, ignore_eos=args.ignore_eos)
        from hybrid.engine.stops import StopStrings

        StopStrings(args.stop)
    except ValueError as e:
        return _fail(str(e))
    text = _read_prompt(args)
    if not text:
        return _fail("no prompt: pass --prompt TEXT (or pipe text on stdin)")

    from hybrid.chat.loading import load_model_or_explain, load_options

    model = load_model_or_explain(args.model, "hybrid run", **load_options(args, args.context_length))
    if model is None:
        return 1

    from hybrid.chat_template import ChatTemplateError
    from hybrid.engine.engine import Engine
    from hybrid.engine.request import GenerationError

    try:
        ids = _prompt_ids(model.tokenizer, args, text)
    except ChatTemplateError as e:
        return _fail(str(e))
    engine = Engine(model, tokenizer=model.tokenizer, max_seqs=1, decode_runner=model.decode_runner)
    try:
        try:
            handle = engine.submit(ids, params, stop=args.stop, max_tokens=args.max_tokens)
        except ValueError as e:
            return _fail(f"{e} (lower -n or raise --context-length)")
        start, first, final = time.monotonic(), None, None
        try:
            for ev in handle:
                if first is None:
                    first = time.monotonic()
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                final = ev
        except KeyboardInterrupt:
            handle.cancel()
            print("\nhybrid run: interrupted", file=sys.stderr)
            return 130
        except GenerationError as e:
            print(file=sys.stdout)
            return _fail(f"generation failed: {e}", 1)
        end = time.monotonic()
        sys.stdout.write("\n")
        sys.stdout.flush()
        n = final.usage.completion_tokens
        decode = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        print(f"hybrid run: {len(ids)} prompt tokens, {n} generated ({final.finish_reason}); "
              f"first token {first - start:.2f} s, then {decode:.1f} tok/s", file=sys.stderr)
        online = model.online_stats()
        if online is not None:
            rate = "-" if online["hit_rate"] is None else f"{online['hit_rate']:.1%}"
            print(f"hybrid run: online re-placement: {online['swaps']} swaps, GPU cache hit rate "
                  f"{rate}", file=sys.stderr)
        return 0
    finally:
        engine.close()
