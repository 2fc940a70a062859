"""One prepared check of the CUDA paths, for a borrowed GPU machine (an H200 for ~15 minutes):
correctness against the CPU reference, decode and prefill speed, and launches per token, for the
eager, static-buffer and CUDA-graph decode steps, with and without GPU-cached experts. Runs in
well under 8 minutes; writes a JSON file and prints a table.

    python bench/gpu_check.py                      # on the GPU machine (needs CUDA)
    python bench/gpu_check.py --dry-run            # on a CPU: the same plumbing, device = the
                                                   # CPU with the torch op set, no graphs
    python bench/gpu_check.py --out result.json --steps 64

Models: the embedded demo model, and a tiny K2.5-shaped checkpoint written here with
transformers (K2.5's config fields and ratios at small widths: noaux_tc routing with the
correction bias, q_lora, MLA, YaRN RoPE, 1 dense layer then MoE with a shared expert).

References: the same checkpoint CPU-only (the CPU engine, no device) in fp32 and in bf16. Every
device configuration reads the same tokens (the prompt, then the fp32 reference's greedy
continuation, teacher-forced), and its logits at each position are compared with the reference
of its dtype:
  rel_err   max |logits - ref| / max |ref| over every position
  top1      share of positions whose argmax equals the reference's
  ok        fp32 (the correctness check: the same math in another order): rel_err <= 1e-3 and
            top1 >= 0.95; bf16 (what runs): top1 >= 0.9; rel_err is reported, since bf16
            rounding alone moves a random model's logits by ~15% (measured CPU-only: native
            ops against torch ops on the K2.5-shaped checkpoint, top1 1.0)

Configurations: decode steps eager (forward() each step) | static (static buffers per bucket,
hybrid/engine/step_runner.py) | graphs (those captured as CUDA graph segments; CUDA only);
cache 0 or 25% of each MoE layer's experts held on the device (GpuExpertCache); KV cache
slot (a whole-context grid per sequence) or paged (blocks of KV_BLOCK tokens, what chat and serve
use; with no expert cache only): its B = 4 timing runs 4 sequences sharing the prompt's block.
Per configuration:
  decode_tok_s       B = 1 and B = 4 sequences, --steps timed steps after warm-up
  step_ms            milliseconds per decode step at B = 1
  launches           graph launches per step (graphs), else aten ops that are not views (one
                     kernel launch each, roughly) in one step (HostSyncCheck)
  host_syncs         host-syncing ops on the device side of one step (HostSyncCheck, outside the
                     MoE hand-offs): 0 is the goal for static and graphs
  capture_failures   buckets whose capture failed (they ran eagerly; the warning says why)
Per model: prefill_tok_s of a --prompt-token prompt on the device and on the CPU reference, and
expert deferral (hybrid.load(defer_experts=DEFER_K), no cache, bf16): decode tok/s per mode with
and without it, and its cost against no deferral (top-1 agreement, mean KL in nats).

Layerwise prefill and overlap efficiency: bench/gpu_check_layerwise.py (its docstring), on the
demo model; its table follows the others.

Legend: B sequences decoded together, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

# dtype -> (max rel_err or None, min top1)
TOLERANCE = {torch.float32: (1e-3, 0.95), torch.bfloat16: (None, 0.9)}
CACHE_FRACTIONS = (0.0, 0.25)
KV_BLOCK = 16  # tokens per block of the paged KV rows (the engine's default)
DEFER_K = 2  # deferred picks per token in the deferral rows
# The K2.5-shaped checkpoint's router: logits spread (std ROUTER_STD) without saturating the
# sigmoid, and a correction bias (std BIAS_STD) that spreads the choice further, so bf16 rounding
# rarely flips a pick (a flipped pick moves a random model's logits far more than rounding does).
ROUTER_STD = 2.0
BIAS_STD = 0.5

# K2.5's config fields at small widths (hidden 7168 -> 512 etc.; the ratios are kept).
K25_SHAPED = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1280, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=48,
    num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=64, q_lora_rank=192, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    routed_scaling_factor=2.827, norm_topk_prob=True, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=False, rope_interleave=True, bos_token_id=0,
    eos_token_id=1,
    rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "rope_theta": 50000.0},
)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def write_k25_shaped(path: Path, seed: int = 0) -> Path:
    """A random DeepseekV3 checkpoint with K25_SHAPED's fields, weights ~ N(0, 1/fan_in) so
    activations stay O(1) and router scores are spread (few near-ties between experts)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**K25_SHAPED)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                std = ROUTER_STD if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(std * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(BIAS_STD * torch.randn(b.shape, generator=g))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def load(path, device, dtype, device_ops=None):
    import hybrid

    return hybrid.load(path, device=device, dtype=dtype, progress=False, device_ops=device_ops,
                       decode_steps="eager", max_len=1024)


def set_cache(model, fraction: float) -> int:
    """Hold the first `fraction` of each MoE layer's experts on the device (or none); the
    number of experts held in all."""
    from hybrid.experts.gpu_cache import GpuExpertCache

    held = 0
    for moe in model.moe_layers().values():
        E = moe.host_experts().num_experts
        n = int(E * fraction)
        cache = None
        if n:
            cache = GpuExpertCache.from_packed(moe.host_experts(), list(range(n)), model.device, model.dtype)
        moe.set_device_experts(cache)
        held += n
    return held


def make_kv(model, kv: str, seqs: int, max_len: int, shared: int = 0):
    """A slot cache, or a paged one (kv == "paged") where each sequence has its own blocks but
    the first `shared` blocks, which all point at sequence 0's (a shared prompt prefix)."""
    if kv == "slot":
        return model.make_cache(seqs, max_len)
    M = -(-max_len // KV_BLOCK)
    cache = model.make_cache(seqs, max_len, num_blocks=seqs * M, block_size=KV_BLOCK)
    for s in range(seqs):
        cache.set_blocks(s, list(range(shared)) + list(range(s * M + shared, (s + 1) * M)))
    return cache


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def make_runner(model, cache, mode: str, max_batch: int):
    if mode == "eager":
        return None
    from hybrid.engine.step_runner import DecodeRunner

    return DecodeRunner(model.network, cache, max_batch=max_batch, graphs=mode == "graphs")


def decode_step(model, runner, cache, ids, pos, slots):
    if runner is not None:
        return runner.step(ids, pos, slots)
    dev = model.device
    t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
    return model.forward(t(ids), t(pos), t(slots), cache)


def prefill(model, cache, prompt: list[int], slot: int = 0):
    dev = model.device
    n = len(prompt)
    return model.forward(torch.tensor(prompt, device=dev), torch.arange(n, device=dev),
                         torch.full((n,), slot, device=dev), cache,
                         logits_index=torch.tensor([n - 1], device=dev))


def sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def teacher_forced(model, mode: str, prompt: list[int], follow: list[int], kv: str = "slot") -> torch.Tensor:
    """Logits [1 + len(follow), V] fp32 (CPU): after the prompt, then after each token of `follow`."""
    cache = make_kv(model, kv, 1, len(prompt) + len(follow) + 1)
    runner = make_runner(model, cache, mode, 1)
    out = [prefill(model, cache, prompt)[0].float().cpu()]
    for i, tok in enumerate(follow):
        out.append(decode_step(model, runner, cache, [tok], [len(prompt) + i], [0])[0].float().cpu())
    return torch.stack(out)


@torch.inference_mode()
def time_decode(model, mode: str, B: int, steps: int, warmup: int = 3, kv: str = "slot") -> dict:
    prompt = list(range(3, 3 + KV_BLOCK))  # one whole block: the paged sequences share it
    cache = make_kv(model, kv, B, len(prompt) + steps + warmup + 2, shared=1)
    runner = make_runner(model, cache, mode, B)
    for s in range(B if kv == "slot" else 1):
        prefill(model, cache, prompt, s)
    pos = len(prompt)
    ids, slots = [5] * B, list(range(B))
    for _ in range(warmup):
        decode_step(model, runner, cache, ids, [pos] * B, slots)
        pos += 1
    sync(model)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = decode_step(model, runner, cache, ids, [pos] * B, slots)
        ids = logits.argmax(-1).tolist()  # the engine's host sync per step, included
        pos += 1
    sync(model)
    dt = time.perf_counter() - t0
    out = {"tok_s": B * steps / dt, "step_ms": 1e3 * dt / steps}
    if runner is not None:
        out["capture_failures"] = runner.stats["capture_failures"]
        key = runner.bucket(B, pos)
        out["graph_launches"] = runner.launches_per_step(key)
    return out


@torch.inference_mode()
def count_step(model, mode: str, kv: str = "slot") -> dict:
    """aten ops and host syncs of one decode step's device side (after a warm-up step)."""
    from hybrid.engine.sync_check import HostSyncCheck

    prompt = list(range(3, 11))
    cache = make_kv(model, kv, 1, 32)
    runner = make_runner(model, cache, mode, 1)
    prefill(model, cache, prompt)
    decode_step(model, runner, cache, [5], [len(prompt)], [0])
    pos = len(prompt) + 1
    if runner is None:
        t = lambda v: torch.tensor(v, dtype=torch.long, device=model.device)  # noqa: E731
        ids, p, s = t([5]), t([pos]), t([0])
        with HostSyncCheck() as check:
            model.forward(ids, p, s, cache)
    else:
        key = runner.prepare([5], [pos], [0])
        with HostSyncCheck() as check:
            runner.run(key)
    sync(model)
    return {"aten_ops": check.kernels, "host_syncs": len(check.syncs),
            "sync_sites": sorted({f"{w} at {where}" for w, where in check.syncs})}


@torch.inference_mode()
def time_prefill(model, tokens: int) -> float:
    prompt = [3 + (i * 7) % 1000 for i in range(tokens)]
    cache = model.make_cache(1, tokens + 1)
    prefill(model, cache, prompt[:16])  # warm-up
    sync(model)
    t0 = time.perf_counter()
    prefill(model, cache, prompt)
    sync(model)
    return tokens / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------
def compare(logits: torch.Tensor, ref: torch.Tensor, dtype) -> dict:
    rel = float((logits - ref).abs().max() / ref.abs().max())
    top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    max_rel, min_top1 = TOLERANCE[dtype]
    return {"rel_err": rel, "top1": top1, "ok": (max_rel is None or rel <= max_rel) and top1 >= min_top1}


def check_model(name: str, path, args, device, modes, log) -> dict:
    ref_model = load(path, "cpu", torch.float32)
    prompt = list(range(3, 3 + args.prompt_check))
    follow, cache = [], ref_model.make_cache(1, len(prompt) + args.follow + 1)
    with torch.inference_mode():  # the reference's greedy continuation
        logits = prefill(ref_model, cache, prompt)
        for i in range(args.follow):
            follow.append(int(logits[0].argmax()))
            logits = decode_step(ref_model, None, cache, [follow[-1]], [len(prompt) + i], [0])
    refs = {torch.float32: teacher_forced(ref_model, "eager", prompt, follow)}
    out = {"model": name, "prefill_tok_s_cpu_reference": time_prefill(ref_model, args.prompt), "rows": []}
    del ref_model
    refs[torch.bfloat16] = teacher_forced(load(path, "cpu", torch.bfloat16), "eager", prompt, follow)

    for dtype in (torch.float32, torch.bfloat16):
        model = load(path, device, dtype, device_ops="torch" if device == "cpu" else None)
        timed = dtype == torch.bfloat16  # what runs; fp32 rows check the math only
        if timed:
            out["prefill_tok_s_device"] = time_prefill(model, args.prompt)
        for fraction, kv in [(f, "slot") for f in CACHE_FRACTIONS] + [(0.0, "paged")]:
            held = set_cache(model, fraction)
            for mode in modes:
                t0 = time.perf_counter()
                row = {"dtype": str(dtype).removeprefix("torch."), "mode": mode, "kv": kv,
                       "cache_fraction": fraction, "experts_held": held}
                row.update(compare(teacher_forced(model, mode, prompt, follow, kv), refs[dtype], dtype))
                row.update(count_step(model, mode, kv))
                row.update({"decode_tok_s_b1": None, "step_ms_b1": None, "decode_tok_s_b4": None,
                            "graph_launches": None, "capture_failures": 0})
                if timed:
                    d1 = time_decode(model, mode, 1, args.steps, kv=kv)
                    d4 = time_decode(model, mode, 4, max(1, args.steps // 2), kv=kv)
                    row.update({"decode_tok_s_b1": d1["tok_s"], "step_ms_b1": d1["step_ms"],
                                "decode_tok_s_b4": d4["tok_s"], "graph_launches": d1.get("graph_launches"),
                                "capture_failures": d1.get("capture_failures", 0) + d4.get("capture_failures", 0)})
                row["seconds"] = time.perf_counter() - t0
                out["rows"].append(row)
                log(f"  {name} {row['dtype']} {mode:6s} {kv:5s} KV, cache {fraction:.0%}: rel_err {row['rel_err']:.2e} "
                    f"top1 {row['top1']:.2f} {'ok' if row['ok'] else 'FAIL'}, {row['host_syncs']} host syncs")
        if timed:
            out["deferral"] = check_deferral(model, modes, prompt, follow, args)
        del model
    return out


def check_deferral(model, modes, prompt, follow, args) -> list[dict]:
    """Expert deferral (k = DEFER_K, no cache): decode speed per mode, and its cost against the
    same model undeferred (top-1 agreement, mean KL of the teacher-forced logits)."""
    from hybrid.runtime.build import attach_deferral

    set_cache(model, 0.0)
    base = teacher_forced(model, "eager", prompt, follow).log_softmax(-1)
    rows = []
    for k in (0, DEFER_K):
        attach_deferral(model.network, k)
        lp = teacher_forced(model, "eager", prompt, follow).log_softmax(-1)
        cost = {"top1": float((lp.argmax(-1) == base.argmax(-1)).float().mean()),
                "kl_mean": float((base.exp() * (base - lp)).sum(-1).mean())}
        for mode in modes:
            rows.append({"k": k, "mode": mode, **cost,
                         "decode_tok_s_b1": time_decode(model, mode, 1, args.steps)["tok_s"]})
    attach_deferral(model.network, 0)
    return rows


def table(result: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("| model | dtype | steps | KV | cache | rel_err | top1 | ok | host syncs | launches/step | "
            "ms/step B=1 | tok/s B=1 | tok/s B=4 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in result["models"]:
        for r in m["rows"]:
            launches = r["graph_launches"] if r["graph_launches"] is not None else f"{r['aten_ops']} ops"
            lines.append(f"| {m['model']} | {r['dtype']} | {r['mode']} | {r['kv']} | {r['cache_fraction']:.0%} | "
                         f"{r['rel_err']:.2e} | {r['top1']:.2f} | {'yes' if r['ok'] else 'NO'} | "
                         f"{r['host_syncs']} | {launches} | {num(r['step_ms_b1'], '.2f')} | "
                         f"{num(r['decode_tok_s_b1'], '.1f')} | {num(r['decode_tok_s_b4'], '.1f')} |")
    lines += ["", "| model | deferred k | steps | top1 vs k=0 | KL mean | tok/s B=1 |", "|---|---|---|---|---|---|"]
    for m in result["models"]:
        for r in m["deferral"]:
            lines.append(f"| {m['model']} | {r['k']} | {r['mode']} | {r['top1']:.3f} | {r['kl_mean']:.4f} | "
                         f"{r['decode_tok_s_b1']:.1f} |")
    lines.append("")
    for m in result["models"]:
        lines.append(f"{m['model']}: prefill {m['prefill_tok_s_device']:.0f} tok/s on the device (bf16), "
                     f"{m['prefill_tok_s_cpu_reference']:.0f} tok/s CPU fp32 reference")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run on the CPU (torch op set, no graphs) to check the script's plumbing")
    ap.add_argument("--out", default="gpu_check.json", help="JSON result file")
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per configuration")
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens")
    ap.add_argument("--prompt-check", type=int, default=24, help="prompt tokens of the logits check")
    ap.add_argument("--follow", type=int, default=16, help="decode steps of the logits check")
    ap.add_argument("--models", nargs="+", default=["demo", "k25-shaped"], choices=["demo", "k25-shaped"])
    args = ap.parse_args(argv)
    if args.dry_run:
        device, modes = "cpu", ("eager", "static")
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device, modes = "cuda", ("eager", "static", "graphs")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dry_run": args.dry_run, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = None if name == "demo" else write_k25_shaped(Path(tmp) / "k25-shaped")
            log(f"{name}: checking")
            result["models"].append(check_model(name, path, args, device, modes, log))
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when imported
        import gpu_check_layerwise

        log("layerwise prefill and overlap")
        result["layerwise"] = gpu_check_layerwise.check(None, device, args.dry_run, log)
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = all(r["ok"] for m in result["models"] for r in m["rows"]) and result["layerwise"]["ok"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(gpu_check_layerwise.table(result["layerwise"]))
    log(f"wrote {args.out}; {'all ok' if result['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
