"""`hybrid chat [MODEL]`: streaming terminal chat (the embedded demo model when MODEL is omitted)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Streaming terminal chat. Instant and thinking modes, /help for commands, "
                    "Ctrl-C stops an answer, Ctrl-D quits.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--mode", choices=("instant", "thinking"), default=None,
                   help="start in this mode (default: the model's own, as its chat template says; "
                        "the demo model's is thinking; /mode switches)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy; default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest answer in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible answers")
    p.add_argument("--context-length", type=int, default=None,
                   help="conversation limit in tokens (default: the model's, at most 4096)")
    p.add_argument("--no-markdown", action="store_true", help="leave answers as streamed (no Markdown rendering)")
    p.add_argument("--history-file", type=Path, default=None,
                   help="input history file (default: $XDG_STATE_HOME/hybrid/chat_history)")
    from hybrid.chat.loading import add_load_arguments

    add_load_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from hybrid.chat.session import Settings

    problems = []
    if args.max_tokens < 1:
        problems.append(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not args.temperature >= 0:  # also catches nan
        problems.append(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if problems:
        for p in problems:
            print(f"hybrid chat: {p}", file=sys.stderr)
        return 2
    settings = Settings(mode=args.mode or "instant", system=args.system, temperature=args.temperature,
                        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)

    from hybrid.chat.loading import load_model_or_explain, load_options

    if args.context_length is not None and args.context_length < 2:
        print(f"hybrid chat: --context-length must be >= 2, got {args.context_length}", file=sys.stderr)
        return 2
    model = load_model_or_explain(args.model, "hybrid chat", **load_options(args, args.context_length))
    if model is None:
        return 1
    if args.mode is None:  # the model's own default, the one `hybrid serve` starts in too
        settings.mode = "thinking" if model.tokenizer.default_thinking else "instant"

    from rich.console import Console

    from hybrid.chat.prompt import LineReader, default_history_path
    from hybrid.chat.repl import ChatApp
    from hybrid.chat.session import ChatSession
    from hybrid.engine.engine import Engine

    try:
        engine = Engine(model, tokenizer=model.tokenizer, max_seqs=1, max_context=args.context_length,
                        decode_runner=model.decode_runner)
    except (ValueError, MemoryError) as e:  # e.g. a KV cache for the context that does not fit
        print(f"hybrid chat: {e}", file=sys.stderr)
        return 2
    try:
        session = ChatSession(engine, model.tokenizer, settings, model=model)
        reader = LineReader(args.history_file or default_history_path())
        app = ChatApp(session, Console(highlight=False), reader, markdown=not args.no_markdown)
        return app.run()
    finally:
        engine.close()
