"""`hybrid` command line: one subcommand per module in hybrid/commands/.

Each command module defines `register(subparsers)` which adds its parser and sets
`func=main` via `set_defaults`. Modules are imported only to build the parser; heavy imports
belong inside each command's `main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in `hybrid --help`.
COMMANDS = ["chat", "serve", "run", "doctor", "profile", "plan", "convert"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid",
        description="CPU/GPU hybrid inference for giant MoE models (Kimi K2.5, DeepSeek-V3).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hybrid.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from hybrid import __version__

        print(f"hybrid {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
