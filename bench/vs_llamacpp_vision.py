"""Kimi K2.5's vision tower in hybrid and in llama.cpp (libmtmd, through llama-cpp-python) on the
same mmproj GGUF, CPU only, same threads: image embeddings side by side and the time to encode.

    python bench/vs_llamacpp_vision.py                       # K2.5-size tower, random weights, f16 file
    python bench/vs_llamacpp_vision.py --sizes 448x448,896x896 --type f32 --threads 2
    python bench/vs_llamacpp_vision.py --mmproj mmproj-Kimi-K2.5-f16.gguf --text Kimi-K2.5-Q4_K_M-00001-of-00013.gguf

Without --mmproj the tower is the real K2.5 shape (27 blocks, 1152 wide, 16 heads, MLP 4304,
patch 14, a 64 x 64 position table, 2 x 2 merge, projector to 7168) with random weights (N(0,
1/fan_in), norms near 1), written by hybrid's mmproj writer (hybrid/convert/gguf_mmproj_export.py,
which writes what llama.cpp's own converter does: tests/test_gguf_mmproj.py), plus a small
7168-wide deepseek2 text GGUF, which libmtmd needs beside the mmproj (its width must be the
projector's). `--shape tiny` makes a 2-block, 64-wide tower instead (the smoke test's). Files are
cached under --dir.

Per image size (width x height, multiples of 28 so that neither runtime pads or resizes: the
release pads to 28 with zeros, llama.cpp rescales to a multiple of 28 instead, so other sizes
would compare two different inputs): the pixels (a smooth random picture), hybrid's tower
(Vision.encode, torch on the CPU, bf16 and fp32) and llama.cpp's (mtmd_encode_chunk, its CPU
backend) each --runs times after one warm-up; median seconds, and per hybrid dtype the agreement
with llama.cpp's embeddings: max |a - b| / max |b| and the cosine of the flattened outputs.
llama.cpp computes the tower in the file's type and its CPU flash attention holds K and V in f16,
so neither side is the reference; hybrid's fp32 tower is the tightest comparison.

Measured on this machine (2-vCPU Zen 4 guest, 2 threads, median of 3; llama-cpp-python 0.3.36;
random K2.5-size tower), seconds per image, hybrid / llama.cpp:
  f16 file  448x448 (256 tokens):  bf16 3.29 / 6.29 (1.91x), fp32 5.46 / 6.29 (1.15x)
            896x896 (1024 tokens): bf16 25.4 / 44.3 (1.75x), fp32 33.4 / 44.3 (1.33x)
  f32 file  448x448:               bf16 3.27 / 7.44 (2.28x), fp32 5.49 / 7.44 (1.36x)
  agreement with llama.cpp's embeddings: fp32 max |d| / max 5e-4 to 6e-4, cosine 1.000000;
  bf16 1.5e-2, cosine 0.99991 (bf16 rounding).

Threads: --threads for both (torch.set_num_threads, mtmd n_threads).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {  # the random tower's shape: K2.5's, or a tiny one (tests/test_bench_vision.py)
    "k25": dict(hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304, patch_size=14,
                pos_emb_height=64, pos_emb_width=64, merge=(2, 2), text_hidden_size=7168),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=96, patch_size=14,
                 pos_emb_height=8, pos_emb_width=8, merge=(2, 2), text_hidden_size=64),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmproj", type=Path, help="an existing mmproj GGUF (default: a random K2.5-size tower)")
    p.add_argument("--text", type=Path, help="with --mmproj: the text GGUF libmtmd needs beside it")
    p.add_argument("--shape", default="k25", choices=sorted(SHAPES), help="the random tower's shape (default k25)")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="storage of the random tower's matrices (default f16, what mmproj files are shared in)")
    p.add_argument("--sizes", default="448x448,896x896", help="image sizes WxH, multiples of 28")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtypes", default="bf16,fp32", help="hybrid's tower dtypes")
    p.add_argument("--dir", type=Path, default=Path("/tmp/hybrid-vision-bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------
def random_tower(vc, seed: int):
    """(release name, fp32 tensor) of a random tower in the release's layout."""
    import torch

    from hybrid.models.moonvit import RELEASE

    g = torch.Generator().manual_seed(seed)
    D, I, P, k, H = vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.merge_area, vc.text_hidden_size

    def mat(n, m, *extra):
        return torch.randn(n, m, *extra, generator=g) / math.sqrt(m * math.prod(extra))

    def norm(name, n):
        yield f"{name}.weight", 1 + 0.1 * torch.randn(n, generator=g)
        yield f"{name}.bias", 0.1 * torch.randn(n, generator=g)

    def lin(name, n, m):
        yield f"{name}.weight", mat(n, m)
        yield f"{name}.bias", 0.1 * torch.randn(n, generator=g)

    yield f"{RELEASE['patch']}.weight", mat(D, 3, P, P)
    yield f"{RELEASE['patch']}.bias", 0.1 * torch.randn(D, generator=g)
    yield RELEASE["pos"], 0.5 * torch.randn(vc.pos_emb_height, vc.pos_emb_width, D, generator=g)
    for i in range(vc.num_layers):
        b = RELEASE["block"].format(i=i)
        yield from norm(f"{b}.{RELEASE['norm1']}", D)
        yield from lin(f"{b}.wqkv", 3 * D, D)
        yield from lin(f"{b}.{RELEASE['out']}", D, D)
        yield from norm(f"{b}.{RELEASE['norm2']}", D)
        yield from lin(f"{b}.{RELEASE['fc1']}", I, D)
        yield from lin(f"{b}.{RELEASE['fc2']}", D, I)
    yield from norm(RELEASE["final"], D)
    yield from norm(RELEASE["pre_norm"], D)
    yield from lin(RELEASE["proj_in"], k * D, k * D)
    yield from lin(RELEASE["proj_out"], H, k * D)


def make_mmproj(args) -> Path:
    from hybrid.convert.gguf_mmproj_export import write_mmproj_file
    from hybrid.models.moonvit_config import VisionConfig
    from hybrid.models.moonvit_images import DEFAULTS, ImageRule

    out = args.dir / f"mmproj-{args.shape}-random-{args.seed}-{args.type}.gguf"
    if out.is_file():
        return out
    c = SHAPES[args.shape]
    raw = {"vision_config": {"vt_hidden_size": c["hidden_size"], "vt_num_hidden_layers": c["num_layers"],
                             "vt_num_attention_heads": c["num_heads"], "vt_intermediate_size": c["intermediate_size"],
                             "patch_size": c["patch_size"], "init_pos_emb_height": c["pos_emb_height"],
                             "init_pos_emb_width": c["pos_emb_width"], "merge_kernel_size": list(c["merge"])},
           "media_placeholder_token_id": 5}
    vc = VisionConfig.from_dict(raw, c["text_hidden_size"])
    rule = ImageRule.from_dict(dict(DEFAULTS))
    log(f"writing a random {args.shape} tower ({args.type}) to {out} ...")
    return write_mmproj_file(out, vc, rule, random_tower(vc, args.seed), args.type, f"{args.shape}-random-tower",
                             progress=False)


def make_text(args) -> Path:
    """A small deepseek2 text GGUF as wide as the projector's output (libmtmd checks the two
    widths), written by hybrid convert from a random transformers DeepseekV3."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from hybrid.convert.gguf_export import convert_to_gguf

    H = SHAPES[args.shape]["text_hidden_size"]
    out = args.dir / f"text-{H}-f16.gguf"
    if out.is_file():
        return out
    ckpt = args.dir / f"text-{H}"
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg = DeepseekV3Config(vocab_size=320, hidden_size=H, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=2, num_key_value_heads=2,
                           q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                           v_head_dim=16, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                           rope_interleave=True)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(ckpt)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_llamacpp import _byte_tokenizer

    _byte_tokenizer(ckpt)
    log(f"writing the {H}-wide text GGUF libmtmd needs to {out} ...")
    return convert_to_gguf(ckpt, out, "f16", progress=False)


# ---------------------------------------------------------------------------------------------
# The two runtimes
# ---------------------------------------------------------------------------------------------
def picture(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [127 + 120 * np.sin(xx / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 40))
             for _ in range(3)]
    return Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))


def run_hybrid(mmproj: Path, text_hidden: int, images, dtype, threads: int, runs: int) -> list[dict]:
    import torch

    from hybrid.models.moonvit_gguf import MmprojFile
    from hybrid.models.vision import Vision

    torch.set_num_threads(threads)
    mm = MmprojFile(mmproj)
    try:
        vc = mm.vision_config(text_hidden, 0)
        t0 = time.perf_counter()
        vision = Vision.from_mmproj(mm, vc, "cpu", dtype)
        load_s = time.perf_counter() - t0
    finally:
        mm.close()
    out = []
    for img in images:
        prep = vision.prepare([img])[0]
        vision.encode(prep)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            y = vision.encode(prep)
            times.append(time.perf_counter() - t0)
        out.append({"grid": prep.grid, "tokens": prep.tokens, "seconds": statistics.median(times),
                    "load_s": load_s, "y": y.float().numpy()})
    return out


def run_llamacpp(mmproj: Path, text: Path, images, threads: int, runs: int, verbose: bool = False) -> list[dict]:
    """libmtmd's embeddings and encode times; its logs (a few hundred lines) are dropped unless verbose."""
    import os

    if verbose:
        return _run_llamacpp(mmproj, text, images, threads, runs)
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        return _run_llamacpp(mmproj, text, images, threads, runs)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _run_llamacpp(mmproj: Path, text: Path, images, threads: int, runs: int) -> list[dict]:
    from llama_cpp import llama_cpp as L
    from llama_cpp import mtmd_cpp as M

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(text).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {text}")
    cp = M.mtmd_context_params_default()
    cp.use_gpu = False
    cp.n_threads = threads
    cp.print_timings = False
    t0 = time.perf_counter()
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), model, cp)
    load_s = time.perf_counter() - t0
    if not ctx:
        raise RuntimeError(f"libmtmd could not load {mmproj}")
    n_embd = L.llama_model_n_embd(model)
    out = []
    try:
        for img in images:
            rgb = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
            bitmap = M.mtmd_bitmap_init(img.width, img.height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
            chunks = M.mtmd_input_chunks_init()
            txt = M.mtmd_input_text()
            marker = M.mtmd_default_marker()
            txt.text = marker
            txt.text_len = len(marker)
            txt.add_special = False
            txt.parse_special = True
            arr = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if M.mtmd_tokenize(ctx, chunks, ctypes.byref(txt), arr, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            every = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            chunk = next(c for c in every if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE)
            n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
            it = M.mtmd_input_chunk_get_tokens_image(chunk)
            grid = (M.mtmd_image_tokens_get_ny(it), M.mtmd_image_tokens_get_nx(it))
            M.mtmd_encode_chunk(ctx, chunk)  # warm-up
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                if M.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                times.append(time.perf_counter() - t0)
            embd = M.mtmd_get_output_embd(ctx)
            y = np.ctypeslib.as_array(embd, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
            out.append({"tokens_grid": grid, "tokens": n_tok, "seconds": statistics.median(times), "load_s": load_s,
                        "y": y})
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)
    finally:
        M.mtmd_free(ctx)
        L.llama_model_free(model)
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.abs(a - b).max() / np.abs(b).max()), float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    for w, h in sizes:
        if w % 28 or h % 28:
            raise SystemExit(f"--sizes {w}x{h}: use multiples of 28 (see the docstring)")
    mmproj = args.mmproj or make_mmproj(args)
    if args.mmproj and not args.text:
        raise SystemExit("--mmproj needs --text (libmtmd loads the text model beside the tower)")
    text = args.text or make_text(args)
    from hybrid.loaders.gguf_file import GGUFFile

    g = GGUFFile(mmproj)
    text_hidden = g.field("clip.vision.projection_dim", int)
    g.close()
    images = [picture(w, h, args.seed + i) for i, (w, h) in enumerate(sizes)]
    res = {"mmproj": str(mmproj), "threads": args.threads, "runs": args.runs, "sizes": sizes, "hybrid": {}}
    log(f"llama.cpp (libmtmd) on {mmproj.name}, {args.threads} threads ...")
    try:
        res["llamacpp"] = run_llamacpp(mmproj, text, images, args.threads, args.runs, args.verbose)
    except (ImportError, RuntimeError, AttributeError) as e:
        res["llamacpp"] = None
        res["llamacpp_skipped"] = str(e)
        log(f"llama.cpp skipped: {e}")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        log(f"hybrid ({name}) on {mmproj.name}, {args.threads} threads ...")
        res["hybrid"][name] = run_hybrid(mmproj, text_hidden, images, dtype, args.threads, args.runs)
    rows = []
    for i, (w, h) in enumerate(sizes):
        lc = res["llamacpp"][i] if res["llamacpp"] else None
        for name, per in res["hybrid"].items():
            hy = per[i]
            row = {"size": f"{w}x{h}", "hybrid_dtype": name, "tokens": hy["tokens"], "hybrid_s": hy["seconds"]}
            if lc is not None:
                row["llamacpp_s"] = lc["seconds"]
                row["x"] = lc["seconds"] / hy["seconds"]
                same = lc["tokens"] == hy["tokens"]
                row["same_tokens"] = same
                if same:
                    row["rel_max_diff"], row["cosine"] = agreement(hy["y"], lc["y"])
            rows.append(row)
    res["rows"] = rows
    if args.json:
        for per in [res["llamacpp"] or [], *res["hybrid"].values()]:
            for r in per:
                r.pop("y", None)
        print(json.dumps(res, indent=1, default=str))
        return 0
    print(f"vision tower: {mmproj.name}, CPU, {args.threads} threads, median of {args.runs}")
    if res["llamacpp"] is None:
        print(f"llama.cpp skipped: {res['llamacpp_skipped']}")
    print(f"{'image':>10} {'tokens':>6} {'hybrid':>7} {'hybrid s':>9} {'llama.cpp s':>12} {'x':>6} "
          f"{'max|d|/max':>11} {'cosine':>9}")
    for r in rows:
        print(f"{r['size']:>10} {r['tokens']:>6} {r['hybrid_dtype']:>7} {r['hybrid_s']:>9.2f} "
              f"{r.get('llamacpp_s', float('nan')):>12.2f} {r.get('x', float('nan')):>6.2f} "
              f"{r.get('rel_max_diff', float('nan')):>11.2e} {r.get('cosine', float('nan')):>9.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
