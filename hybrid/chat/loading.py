"""Load a model for a frontend: visible progress, and a clear message instead of a traceback.

Shared by `hybrid chat` and `hybrid serve`. Loading a real checkpoint takes seconds to minutes;
hybrid.load draws a per-layer progress bar on stderr, and this adds what is being loaded, how
long it took, and one line saying why when it fails.
"""

from __future__ import annotations

import argparse
import sys
import time


def describe(path: str | None) -> str:
    return path if path else "the embedded demo model"


def load_model_or_explain(path: str | None, prog: str, **options):
    """hybrid.load(path, **options); on failure print why on stderr and return None."""
    import os

    what = describe(path)
    gguf = path is not None and str(path).endswith(".gguf") and os.path.isfile(path)
    if path is not None and not os.path.isdir(path) and not gguf:
        # Said before importing torch and the model code, which takes seconds.
        why = "not a directory" if os.path.exists(path) else "no such directory"
        print(f"{prog}: cannot load {path}: {why} (a checkpoint is a directory with config.json, "
              "or a .gguf file)", file=sys.stderr)
        return None
    import hybrid

    start = time.monotonic()
    print(f"{prog}: loading {what}...", file=sys.stderr, flush=True)
    try:
        model = hybrid.load(path, **options)
    except KeyboardInterrupt:
        print(f"{prog}: loading interrupted", file=sys.stderr)
        return None
    except (OSError, ValueError, TypeError, RuntimeError, MemoryError, KeyError, ImportError) as e:
        print(f"{prog}: cannot load {what}: {e}", file=sys.stderr)
        return None
    if model.tokenizer is None:
        print(f"{prog}: {what} has no tokenizer (tiktoken.model or tokenizer.json); a chat needs one",
              file=sys.stderr)
        return None
    formats = set((model.stats().get("device_weights") or {}).values())
    how = " (non-expert weights in the file's own blocks)" if formats == {"blocks"} else ""
    print(f"{prog}: loaded {what} in {time.monotonic() - start:.1f} s{how}", file=sys.stderr, flush=True)
    source = getattr(model.vision, "source", None)
    if source is not None:
        print(f"{prog}: images: the vision tower of {source}", file=sys.stderr, flush=True)
    return model


def add_load_arguments(parser) -> None:
    """The hybrid.load options a frontend exposes (same flags as `hybrid run`)."""
    parser.add_argument("--device", default=None, help="torch device for the dense part (default: cuda if present)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="device compute dtype (default bfloat16; float32 is the reference path)")
    parser.add_argument("--experts", choices=("cpu", "torch"), default=None,
                        help="routed experts on the C++ engine (default when built) or in torch (reference)")
    parser.add_argument("--profile", default=None, metavar="YAML",
                        help="placement profile from `hybrid plan` (profiles/*.yaml): experts cached on the GPU")
    parser.add_argument("--device-weights", choices=("bf16", "fp32", "int8", "fp8", "blocks"), default=None,
                        help="format of the weights on the device (default: the dtype; int8/fp8 to fit 24 GB; "
                             "blocks: a GGUF file's own blocks, run by the native kernels, CPU device only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU expert engine threads (default: physical cores)")
    parser.add_argument("--no-images", action="store_true",
                        help="do not load a checkpoint's vision tower (saves its memory; images are refused)")
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="a GGUF model's vision tower: llama.cpp's mmproj GGUF for Kimi K2.5 (default: "
                             "the one mmproj*.gguf beside the model file, if there is exactly one)")
    parser.add_argument("--online", action=argparse.BooleanOptionalAction, default=None,
                        help="with --profile: swap experts into the GPU cache as routing drifts, a few "
                             "per layer per step when the cost model says a swap pays (default: the "
                             "profile's online.enabled, normally off)")


def load_options(args, context_length: int | None = None) -> dict:
    """hybrid.load keyword arguments from add_load_arguments' flags (torch imported only if needed)."""
    options = {}
    if context_length:
        options["max_len"] = context_length
    if args.device:
        options["device"] = args.device
    if args.dtype:
        import torch

        options["dtype"] = getattr(torch, args.dtype)
    if args.experts:
        options["experts_backend"] = args.experts
    if args.profile:
        options["profile"] = args.profile
    if args.device_weights:
        options["device_weights"] = args.device_weights
    if args.threads is not None:
        options["threads"] = args.threads
    if getattr(args, "no_images", False):
        options["images_enabled"] = False
    if getattr(args, "mmproj", None):
        options["mmproj"] = args.mmproj
    online = getattr(args, "online", None)
    if online is not None:  # without --profile hybrid.load says why (load_model_or_explain)
        options["online"] = online
    return options
