"""`hybrid convert MODEL --to gguf --out FILE [--type f32|f16|bf16|q8_0] [--expert-type q4_0]`: write a checkpoint
(DeepSeek-V3 / Kimi K2 / K2.5; bf16, FP8 or compressed-tensors INT4 weights, read through
hybrid's own loader) as a GGUF file llama.cpp loads (architecture deepseek2).

See hybrid/convert/gguf_export.py for the tensor names, metadata keys and value transforms. A
Kimi K2.5 checkpoint's vision tower is written beside it as llama.cpp's mmproj GGUF
(hybrid/convert/gguf_mmproj_export.py), where hybrid.load and llama.cpp's --mmproj find it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="write a checkpoint in another runtime's format (GGUF for llama.cpp)",
        description="Convert a checkpoint directory to GGUF (llama.cpp architecture deepseek2). INT4 "
                    "routed experts are dequantised to --type (f16 holds them exactly), or with "
                    "--expert-type q4_0 repacked losslessly into GGUF Q4_0 (same decode rule).",
    )
    p.add_argument("model", help="checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument("--to", choices=("gguf",), required=True, help="output format")
    p.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    p.add_argument("--type", choices=("f32", "f16", "bf16", "q8_0"), default="bf16", dest="out_type",
                   help="storage type of the weight matrices (default bf16; norms and router stay f32)")
    p.add_argument("--expert-type", choices=("same", "q4_0"), default="same", dest="expert_type",
                   help="routed experts: 'same' = --type; 'q4_0' = exact repack of INT4 group-32 experts "
                        "into GGUF Q4_0 (same decode rule, fp16 scales; refused if a scale would round)")
    p.add_argument("--pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: kimi-k2 for tiktoken.model, gpt-2 for a "
                        "plain byte-level tokenizer.json; other tokenizer.json files need it)")
    p.add_argument("--mmproj-out", default=None, dest="mmproj_out",
                   help="a Kimi K2.5 checkpoint's vision tower goes to llama.cpp's mmproj GGUF, by default "
                        "mmproj-<out name>.gguf beside --out (hybrid and llama.cpp find it there)")
    p.add_argument("--no-mmproj", action="store_true", dest="no_mmproj",
                   help="write the text model only, not the vision tower")
    p.set_defaults(func=main)


def main(args) -> int:
    from hybrid.config import ConfigError
    from hybrid.convert.gguf_export import ConvertError, convert_to_gguf
    from hybrid.loaders.safetensors_files import CheckpointError

    from hybrid.convert.gguf_mmproj_export import has_tower, write_mmproj

    try:
        tower = not args.no_mmproj and has_tower(args.model)
        if args.mmproj_out and not tower:
            raise ConvertError(f"--mmproj-out: {args.model} has no vision tower to write"
                               if not args.no_mmproj else "--mmproj-out and --no-mmproj contradict each other")
        path = convert_to_gguf(args.model, args.out, args.out_type, expert_type=args.expert_type, pre=args.pre)
        print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB, {args.out_type})", file=sys.stderr)
        if tower:
            mm = Path(args.mmproj_out) if args.mmproj_out else path.with_name(f"mmproj-{path.name}")
            write_mmproj(args.model, mm, args.out_type)
            print(f"wrote {mm} ({os.path.getsize(mm) / 1e9:.2f} GB, {args.out_type}): the vision tower, "
                  "llama.cpp's mmproj format", file=sys.stderr)
    except (ConvertError, ConfigError, CheckpointError) as e:
        print(f"hybrid convert: {e}", file=sys.stderr)
        return 1
    return 0
