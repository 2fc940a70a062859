"""hybrid against llama.cpp (llama-cpp-python) on the same weights, prompt and threads, CPU only.

    python bench/vs_llamacpp.py --demo                       # the embedded demo model
    python bench/vs_llamacpp.py --synthetic /tmp/k25-2l-32e  # 2-layer K2.5-width, 32 experts
    python bench/vs_llamacpp.py --model DIR                  # any checkpoint hybrid loads
    python bench/vs_llamacpp.py --gguf FILE.gguf             # both runtimes read the same GGUF file
    python bench/vs_llamacpp.py --llamacpp-convert demo,tiny,synthetic --quant q4_k_m,q4_0
                                # GGUFs made by llama.cpp's own converter and quantiser

With --llamacpp-convert (bench/llamacpp_made.py) each named checkpoint (demo, tiny, tiny-int4, kimi,
synthetic with --experts / --vocab) goes through llama.cpp's convert_hf_to_gguf.py (fetched at
bench time from the installed llama-cpp-python's sdist, never committed) to bf16 (and f32 when
--quant names it), then llama.cpp's quantiser (llama_model_quantize, no imatrix) to each --quant
type; every file is benched as --gguf does. Steps that cannot run (a type that needs an imatrix,
a converter or hybrid refusal) are listed at the end with the reason. The table adds the file's
routed-expert types, how hybrid holds them (native blocks or re-quantised) and the other
matrices' types (llama.cpp falls back to Q4_0/Q5_0/Q8_0/IQ4_NL/F16 on rows too short for 256-value
blocks, so tiny checkpoints exercise those), and, for the demo's English prompt, whether
hybrid's tokenizer (read from the file's metadata) gives llama.cpp's own ids.

With --gguf both runtimes load that one file (hybrid through its GGUF loader: non-expert tensors
dequantised to its device format, routed experts in their blocks where the CPU engine has the
type, else re-packed; the load prints which), so the comparison is on the very same bits.
Otherwise, for each model: the checkpoint is written as GGUF with `hybrid convert` (cached under
--gguf-dir, default $TMPDIR/hybrid-gguf), then each runtime in turn (one at a time: RAM) runs
  prefill  the prompt in one batch, logits for every position (both runtimes compute all)
  decode   --decode steps of one token; the tokens are hybrid's greedy choices, fed to
           llama.cpp too (teacher forcing), so both see the same inputs at every position.
Printed side by side: prefill tok/s, decode tok/s, and logit agreement over the first
--compare prompt positions and all decode steps: top-1 agreement and the max |difference| of
log-softmax.

Weights: INT4 group-32 routed experts go to GGUF Q4_0 by an exact repack (hybrid convert
--expert-type q4_0), so both runtimes read the same expert values and the same expert bytes;
the other matrices are --type (default bf16, what hybrid computes with on CPU). Checkpoints
with float experts are written with experts in --type.

The synthetic model is bench/e2e.py's K2.5-width generator (H 7168, I 2048, dense 18432, MLA
64 heads, INT4 experts) with --experts routed experts instead of 384 (default 32: RAM; the
decode work per token is the same 8 experts at any count), plus a byte-level tokenizer (its
text is never used: the prompt is seeded random ids). The demo model's prompt is English text.

Measured converter check (fp32 hybrid vs f32 GGUF in llama.cpp, max |log-softmax diff|): demo
0.0024; tiny INT4 test checkpoint with experts as f32 0.0017 (YaRN factor 8: 0.0023), with
experts as Q4_0 0.35 (median 0.018) -- the Q4_0 blocks are exact (tests/test_convert_gguf.py);
the difference is llama.cpp quantising activations to Q8_0 for its Q4_0 dot products.

Measured with --gguf on this machine (2 threads, 64-token random-id prompt, 16 decode steps,
demo model written by `hybrid convert`): f32 file with --fp32, top-1 agreement 1.0 prompt and
decode, max |log-softmax diff| 0.0056 / 0.0103 (the loader reads the same values llama.cpp does);
bf16 and q8_0 files in hybrid's bf16 mode: top-1 0.94 / 0.88, max diff 2.0 / 3.2, the same size
as the safetensors --demo run in bf16 (1.3), i.e. bf16 activations, not the file. With the
native Q4_0 / Q8_0 expert kernels (gguf-kernels, in a throwaway merge): Q4_0 experts + f32 rest
with --fp32, top-1 1.0 / 1.0, max diff 0.098 / 0.83 (llama.cpp quantises activations to Q8_0 in
its Q4_0 matmul); an all-Q8_0 file 0.94 / 0.69, 3.5 / 2.4 (the same, in every matmul).

YaRN: llama.cpp's deepseek2 loader ignores the GGUF's beta_fast/beta_slow and uses 32/1, so the
config's values are passed to llama.cpp explicitly.

Threads: --threads for both: hybrid's CPU engine threads (torch gets hybrid.load's own
choice on a CPU-only machine, or --torch-threads; printed), llama.cpp n_threads and
n_threads_batch. On a shared machine both runtimes swing several-fold with other load (llama.cpp's
spinning thread barriers most): compare runs taken back to back, and repeat.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/e2e.py, run as a script


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def synthetic_checkpoint(path: Path, experts: int, vocab: int, seed: int = 0) -> Path:
    """bench/e2e.py's K2.5-width 2-layer checkpoint with `experts` routed experts, plus a tokenizer."""
    import e2e

    if not (path / "config.json").is_file():
        print(f"writing synthetic K2.5-width checkpoint ({experts} experts) to {path} ...", file=sys.stderr)
        e2e.write_synthetic(path, vocab=vocab, seed=seed, experts=experts)
    if not (path / "tokenizer.json").is_file():
        _byte_tokenizer(path)
    return path


def _byte_tokenizer(path: Path) -> None:
    """A byte-level BPE over the 256 byte symbols, <s>/</s> (ids 0, 1) and a few merges (llama.cpp
    needs at least one): enough for both runtimes to load; config.json's vocab_size pads the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=262, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the theme of the thesis"] * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    # tokenizer_class: transformers' AutoTokenizer (llama.cpp's converter uses it) then needs no
    # config.json model_type it knows (the synthetic one is kimi_k2, a remote-code type)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "tokenizer_class": "PreTrainedTokenizerFast"}))


def gguf_for(ckpt: Path, out_type: str, gguf_dir: Path | None, expert_type: str = "auto") -> Path:
    from hybrid.models import config_from_dir
    from hybrid.convert.gguf_export import convert_to_gguf

    cfg = config_from_dir(ckpt)
    q = cfg.quant
    if expert_type == "auto":
        int4 = q is not None and q.method == "compressed-tensors" and q.group_size == 32
        expert_type = "q4_0" if int4 else "same"
    where = gguf_dir or Path(tempfile.gettempdir()) / "hybrid-gguf"
    where.mkdir(parents=True, exist_ok=True)
    out = where / f"{ckpt.name}-{out_type}-experts_{expert_type}.gguf"
    if not out.is_file():
        print(f"converting {ckpt} -> {out} (--type {out_type} --expert-type {expert_type}) ...", file=sys.stderr)
        convert_to_gguf(ckpt, out, out_type, expert_type=expert_type)
    return out


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def run_hybrid(ckpt: Path, prompt: list[int], decode: int, threads: int, n_cmp: int, fp32: bool = False,
               torch_threads: int | None = None, device_weights: str = "bf16") -> dict:
    import torch

    import hybrid

    kw = {"device_weights": device_weights}  # explicit: hybrid.load's own default on a CPU is blocks for a GGUF
    model = hybrid.load(ckpt, threads=threads, max_len=len(prompt) + decode + 16,
                        dtype=torch.float32 if fp32 else None, **kw)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    net = model.network
    P = len(prompt)
    ids = torch.tensor(prompt)
    warm = model.make_cache(1, 16)
    net.forward(ids[:8], torch.arange(8), torch.zeros(8, dtype=torch.long), warm)  # warm-up
    cache = model.make_cache(1, P + decode + 16)
    pos = torch.arange(P)
    t0 = time.perf_counter()
    logits = net.forward(ids, pos, torch.zeros_like(pos), cache)  # [P, V]
    prefill_s = time.perf_counter() - t0
    prompt_logits = logits[:n_cmp].float().clone()
    tok = int(logits[-1].argmax())
    fed, step_logits, step_s = [], [], []
    for i in range(decode):
        fed.append(tok)
        t0 = time.perf_counter()
        out = net.forward(torch.tensor([tok]), torch.tensor([P + i]), torch.tensor([0]), cache)
        step_s.append(time.perf_counter() - t0)
        step_logits.append(out[0].float().clone())
        tok = int(out[0].argmax())
    res = {"prefill_s": prefill_s, "decode_s": sum(step_s), "fed": fed, "prompt_logits": prompt_logits,
           "decode_logits": torch.stack(step_logits), "torch_threads": torch.get_num_threads(),
           "engine_threads": threads, "dtype": str(net.dtype)}
    model.close()
    del model, net, cache
    gc.collect()
    return res


def run_llamacpp(path: Path, cfg, prompt: list[int], fed: list[int], threads: int, n_cmp: int,
                 text: str | None = None) -> dict:
    """llama.cpp on `prompt` then `fed`; with `text`, also llama.cpp's own ids for it."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    P = len(prompt)
    kw = {}
    if cfg.rope.rope_type == "yarn":
        kw.update(yarn_beta_fast=float(cfg.rope.beta_fast if cfg.rope.beta_fast is not None else 32.0),
                  yarn_beta_slow=float(cfg.rope.beta_slow if cfg.rope.beta_slow is not None else 1.0))
    llm = Llama(model_path=str(path), n_gpu_layers=0, n_ctx=P + len(fed) + 16, n_batch=max(P, 8),
                n_ubatch=max(P, 8), n_threads=threads, n_threads_batch=threads, logits_all=True,
                verbose=False, **kw)
    own_ids = llm.tokenize(text.encode(), add_bos=False, special=False) if text is not None else None
    llm.eval(prompt[:8])  # warm-up (touches the weights it needs, like hybrid's)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    prompt_logits = torch.from_numpy(np.array(llm.scores[:n_cmp], dtype=np.float32))
    step_logits, step_s = [], []
    for i, tok in enumerate(fed):
        t0 = time.perf_counter()
        llm.eval([tok])
        step_s.append(time.perf_counter() - t0)
        step_logits.append(torch.from_numpy(np.array(llm.scores[P + i], dtype=np.float32)))
    res = {"prefill_s": prefill_s, "decode_s": sum(step_s), "prompt_logits": prompt_logits,
           "decode_logits": torch.stack(step_logits) if step_logits else None, "own_ids": own_ids}
    llm.close()
    del llm
    gc.collect()
    return res


def agreement(a, b) -> tuple[float, float]:
    """(fraction of rows with the same argmax, max |log_softmax(a) - log_softmax(b)|)."""
    import torch

    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return top1, (la - lb).abs().max().item()


# ---------------------------------------------------------------------------------------------
DEMO_TEXT = ("The json module provides functions to encode Python objects as JSON strings and to "
             "decode JSON text back into Python objects. Use json.dumps to serialise a dictionary, "
             "and json.loads to parse a string. The os.path module handles file names portably.")


def bench_model(name: str, ckpt: Path, args, text: bool = False, fp32: bool = False) -> dict:
    """One model in both runtimes; `text`: the demo model's English prompt instead of random ids;
    `fp32`: hybrid in fp32 (as --fp32 does)."""
    import torch

    from hybrid.models import config_from_dir

    cfg = config_from_dir(ckpt)
    if ckpt.suffix == ".gguf":  # --gguf: hybrid reads the file itself
        path = ckpt
    else:
        path = gguf_for(ckpt, args.type, Path(args.gguf_dir) if args.gguf_dir else None, args.expert_type)
    text_ids = None
    if text or name == "demo":  # a trained model: real text, so top-1 agreement means something
        if ckpt.suffix == ".gguf":  # the tokenizer hybrid reads from the file's metadata
            from hybrid.tokenizer_gguf import gguf_tokenizer as load_tokenizer
        else:
            from hybrid.tokenizer import load_tokenizer

        text_ids = ids = load_tokenizer(ckpt).encode(DEMO_TEXT)
        prompt = (ids * (1 + args.prompt // len(ids)))[: args.prompt]
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(2, cfg.vocab_size, (args.prompt,), generator=g).tolist()
    n_cmp = min(args.compare, args.prompt)
    print(f"[{name}] hybrid ...", file=sys.stderr)
    h_fp32 = args.type == "f32" or args.fp32 or fp32
    # blocks are a GGUF's own and run on bf16 activations: a safetensors run or the fp32 path is bf16 / fp32
    dw = "bf16" if args.device_weights == "blocks" and (ckpt.suffix != ".gguf" or h_fp32) else args.device_weights
    h = run_hybrid(ckpt, prompt, args.decode, args.threads, n_cmp, fp32=h_fp32,
                   torch_threads=args.torch_threads, device_weights=dw)
    print(f"[{name}] llama.cpp ...", file=sys.stderr)
    lc = run_llamacpp(path, cfg, prompt, h["fed"], args.threads, n_cmp, DEMO_TEXT if text or name == "demo" else None)
    p_top1, p_diff = agreement(h["prompt_logits"], lc["prompt_logits"])
    d_top1, d_diff = agreement(h["decode_logits"], lc["decode_logits"]) if args.decode else (math.nan, math.nan)
    return {
        "model": name, "checkpoint": str(ckpt), "gguf": str(path), "gguf_gb": round(path.stat().st_size / 1e9, 3),
        **_gguf_types(path),
        "layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts, "hidden": cfg.hidden_size,
        "threads": args.threads, "hybrid_torch_threads": h["torch_threads"], "hybrid_dtype": h["dtype"],
        "hybrid_device_weights": dw,
        "prompt_tokens": args.prompt, "decode_tokens": args.decode,
        "hybrid_prefill_tok_s": round(args.prompt / h["prefill_s"], 2),
        "llamacpp_prefill_tok_s": round(args.prompt / lc["prefill_s"], 2),
        "hybrid_decode_tok_s": round(args.decode / h["decode_s"], 3) if args.decode else None,
        "llamacpp_decode_tok_s": round(args.decode / lc["decode_s"], 3) if args.decode else None,
        "same_prompt_ids": "-" if lc["own_ids"] is None else lc["own_ids"] == text_ids,
        "prompt_positions_compared": n_cmp, "prompt_top1_agree": round(p_top1, 4),
        "prompt_max_abs_logsoftmax_diff": round(p_diff, 4),
        "decode_top1_agree": round(d_top1, 4), "decode_max_abs_logsoftmax_diff": round(d_diff, 4),
    }


def _gguf_types(path: Path) -> dict:
    """The file's routed-expert types (first MoE layer), the other matrices' types, and how hybrid
    holds the experts (native blocks or re-quantised)."""
    from hybrid.runtime.gguf_experts import describe_gguf

    d = describe_gguf(path)
    first = d["expert_layers"][0] if d["expert_layers"] else {}
    mats = {k: v["tensors"] for k, v in d["other_types"].items() if k != "F32"}
    return {"expert_types": "/".join(first.get("types", {}).values()) or "-",
            "hybrid_experts_as": first.get("held_as", "-"),
            "other_types": ",".join(f"{k}x{n}" for k, n in mats.items())}


def print_table(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k not in ("checkpoint", "gguf")]
    width = max(len(k) for k in keys)
    col = max(18, *(len(str(r[k])) for r in rows for k in keys))
    print(" " * width + "".join(f"  {r['model']:>{col}s}" for r in rows))
    for k in keys[1:]:
        print(f"{k:{width}s}" + "".join(f"  {str(r[k]):>{col}s}" for r in rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true", help="bench the embedded demo model (hybrid.load(None))")
    ap.add_argument("--synthetic", metavar="DIR", help="write (if absent) and bench the 2-layer K2.5-width model")
    ap.add_argument("--model", metavar="DIR", help="bench this checkpoint directory")
    ap.add_argument("--gguf", metavar="FILE", action="append", default=[],
                    help="bench this GGUF file (the first of a split set) in both runtimes (repeatable)")
    ap.add_argument("--llamacpp-convert", metavar="KINDS", default=None,
                    help="comma list of checkpoints (demo, tiny, tiny-int4, kimi, synthetic) to convert with "
                         "llama.cpp's own convert_hf_to_gguf.py (fetched from the llama-cpp-python sdist) and "
                         "quantise with its own quantiser (--quant), then bench each file as --gguf does")
    ap.add_argument("--quant", default="bf16,q4_k_m,q4_0,q8_0,q2_k,iq4_xs",
                    help="with --llamacpp-convert: f32 / bf16 (the converter's output) and llama.cpp quantiser "
                         "types (LLAMA_FTYPE_MOSTLY_<NAME>, quantised from the bf16 file)")
    ap.add_argument("--llamacpp-cache", default=None,
                    help="where the sdist, the converter, checkpoints and files go (default $TMPDIR/llamacpp-made)")
    ap.add_argument("--fp32", action="store_true", help="run hybrid in fp32 (the reference path)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts of the synthetic model (K2.5: 384)")
    ap.add_argument("--vocab", type=int, default=32768, help="synthetic vocabulary")
    ap.add_argument("--type", choices=("f32", "f16", "bf16", "q8_0"), default="bf16",
                    help="GGUF type of the non-expert matrices (default bf16, hybrid's CPU compute dtype; "
                         "f32 also runs hybrid in fp32, the reference path: a converter check)")
    ap.add_argument("--expert-type", choices=("auto", "same", "q4_0"), default="auto",
                    help="GGUF routed experts: auto = exact q4_0 repack for INT4 checkpoints, else --type; "
                         "'same' with --type f32 is the converter check (llama.cpp's Q4_0 matmul quantises "
                         "activations to 8 bits, which alone moves log-softmax by ~0.02 median)")
    ap.add_argument("--gguf-dir", default=None, help="where GGUF files are written (default: $TMPDIR/hybrid-gguf)")
    ap.add_argument("--device-weights", choices=("bf16", "int8", "blocks"), default="blocks",
                    help="hybrid's format for the non-expert matrices (on this CPU-only bench they run on "
                         "the CPU: int8 through the native int8 GEMV, half the bytes of bf16; blocks: a GGUF "
                         "file's own blocks through the expert kernels, the bytes llama.cpp reads: the default, "
                         "as hybrid.load's for a GGUF on a CPU; a safetensors checkpoint is always bf16 here)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--compare", type=int, default=16, help="prompt positions whose logits are compared")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both runtimes")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="hybrid's torch intra-op threads after loading (default: hybrid.load's choice, "
                         "1 when the engine has every core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        ap.error("llama-cpp-python is not installed (pip install -e '.[bench]'; it builds llama.cpp from source)")
    todo, skipped = [], []
    if args.demo:
        from hybrid.api import DEMO_DIR

        todo.append(("demo", DEMO_DIR))
    if args.llamacpp_convert:
        todo += _llamacpp_made(args, skipped)
    if args.synthetic:
        todo.append((f"k25w-2L-{args.experts}e", synthetic_checkpoint(Path(args.synthetic), args.experts, args.vocab)))
    if args.model:
        todo.append((Path(args.model).name, Path(args.model)))
    for f in args.gguf:
        todo.append((Path(f).name.removesuffix(".gguf"), Path(f)))
    if not todo and not skipped:
        ap.error("give --demo, --synthetic DIR, --model DIR, --gguf FILE and/or --llamacpp-convert KINDS")
    rows = []
    for name, path, *how in todo:
        try:
            rows.append(bench_model(name, path, args, *how))
        except Exception as e:  # a file hybrid (or llama.cpp) refuses: say so, bench the others
            if not args.llamacpp_convert:
                raise
            skipped.append((name, f"{type(e).__name__}: {e}"))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    elif rows:
        print_table(rows)
    for what, why in skipped:
        print(f"skipped {what}: {why}")
    return 0


def _llamacpp_made(args, skipped: list) -> list:
    """(name, GGUF path, text prompt) for each --llamacpp-convert checkpoint x --quant type that
    llama.cpp's own tools could make; what they could not goes to `skipped` with the reason."""
    import llamacpp_made as lm

    cache = Path(args.llamacpp_cache or Path(tempfile.gettempdir()) / "llamacpp-made")
    kinds = [k.strip() for k in args.llamacpp_convert.split(",") if k.strip()]
    quants = [q.strip().lower() for q in args.quant.split(",") if q.strip()]
    bad = [k for k in kinds if k not in lm.CHECKPOINTS]
    if bad:
        raise SystemExit(f"--llamacpp-convert: unknown {', '.join(bad)} (known: {', '.join(lm.CHECKPOINTS)})")
    try:
        root = lm.fetch_converter(cache)
    except lm.Skipped as e:
        skipped.append(("--llamacpp-convert", str(e)))
        return []
    out = []
    for kind in kinds:
        tag = f"{kind}-{args.experts}e" if kind == "synthetic" else kind
        try:
            ckpt = lm.checkpoint(kind, cache / "checkpoints", args.experts, args.vocab)
        except lm.Skipped as e:
            skipped.append((kind, str(e)))
            continue
        base = {}
        for outtype in {"f32" if q == "f32" else "bf16" for q in quants}:
            try:
                base[outtype] = lm.convert(root, ckpt, cache / "gguf" / f"{tag}-{outtype}.gguf", outtype)
            except lm.Skipped as e:
                skipped.append((f"{tag} convert --outtype {outtype}", str(e)))
        for q in quants:
            src = base.get("f32" if q == "f32" else "bf16")
            if src is None:
                continue
            try:
                path = src if q == "f32" else lm.quantize(src, q, args.threads)
                out.append((f"{tag}-{q}", path, kind == "demo", q == "f32"))
            except lm.Skipped as e:
                skipped.append((f"{tag}-{q}", str(e)))
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
