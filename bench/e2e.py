"""End-to-end speed of one model: prefill and decode tok/s, where a decode step's time goes,
and the Python overhead per layer per decoded token.

    python bench/e2e.py MODEL_DIR [--prompt 128] [--decode 32] [--backend cpu|torch]
    python bench/e2e.py --synthetic /tmp/k25-2layer     # write (if absent) and bench the
                                                        # 2-layer full-K2.5-width checkpoint

The synthetic checkpoint: layer 0 dense, layer 1 MoE with 384 INT4 routed experts in the
compressed-tensors pack-quantized layout, K2.5's widths (H 7168, I 2048, dense 18432, MLA 64
heads, q_lora 1536, kv_lora 512), written with safetensors directly (no transformers) from
random packed nibbles and random bf16 scales: the numbers are meaningless, the bytes are the
real size (~9 GB of experts), which is all a speed test needs. Generate it to /tmp only when
benchmarking; it uses that much disk and page cache.

Breakdown of a decode step (seconds per token, summed over layers):
  attention   MLA incl. projections and the latent-cache write
  router      router matmul, top-k, host copies
  experts     routed experts: CPU engine submit (returns at once) + torch backend compute
  shared      shared expert on the device (overlaps the CPU engine's work)
  sync wait   waiting for the CPU engine after the shared expert is done
  other       embedding, norms, dense MLP, LM head, Python
Python overhead: time the interpreter spends in Python functions themselves (cProfile tottime;
calls cProfile sees as builtins, e.g. F.linear and the CPU engine, excluded), per layer per
decoded token. An upper bound: tensor operators invoked through C slots (x * y, x[i]) count as
Python time, and cProfile inflates every call. On a tiny-width checkpoint the whole step time
per layer is the other bound (host time with negligible compute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

K25 = dict(hidden=7168, inter=18432, moe_inter=2048, heads=64, q_lora=1536, kv_lora=512, nope=128, rope=64,
           v=128, experts=384, topk=8)


# ---------------------------------------------------------------------------------------------
# Synthetic full-width checkpoint
# ---------------------------------------------------------------------------------------------
def write_synthetic(path: Path, vocab: int = 32768, seed: int = 0, experts: int | None = None) -> None:
    """K2.5's widths (K25), 2 layers; `experts` routed experts (default K2.5's 384): the decode
    work per token is the same 8 experts at any count, so fewer save RAM and disk."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    k = K25 if experts is None else dict(K25, experts=experts)
    H, I, E = k["hidden"], k["moe_inter"], k["experts"]
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def dense(n, m):  # [n, m] bf16 ~ N(0, 1/m)
        return (torch.randn(n, m, generator=g) / math.sqrt(m)).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    shards: list[dict] = []
    base = {"model.embed_tokens.weight": (torch.randn(vocab, H, generator=g)).to(torch.bfloat16),
            "model.norm.weight": ones(H), "lm_head.weight": dense(vocab, H)}
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        nh, qk = k["heads"], k["nope"] + k["rope"]
        base.update({
            f"{p}.input_layernorm.weight": ones(H), f"{p}.post_attention_layernorm.weight": ones(H),
            f"{p}.self_attn.q_a_proj.weight": dense(k["q_lora"], H),
            f"{p}.self_attn.q_a_layernorm.weight": ones(k["q_lora"]),
            f"{p}.self_attn.q_b_proj.weight": dense(nh * qk, k["q_lora"]),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": dense(k["kv_lora"] + k["rope"], H),
            f"{p}.self_attn.kv_a_layernorm.weight": ones(k["kv_lora"]),
            f"{p}.self_attn.kv_b_proj.weight": dense(nh * (k["nope"] + k["v"]), k["kv_lora"]),
            f"{p}.self_attn.o_proj.weight": dense(H, nh * k["v"]),
        })
    base.update({"model.layers.0.mlp.gate_proj.weight": dense(k["inter"], H),
                 "model.layers.0.mlp.up_proj.weight": dense(k["inter"], H),
                 "model.layers.0.mlp.down_proj.weight": dense(H, k["inter"]),
                 "model.layers.1.mlp.gate.weight": (torch.randn(E, H, generator=g) / math.sqrt(H)),
                 "model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(E),
                 "model.layers.1.mlp.shared_experts.gate_proj.weight": dense(I, H),
                 "model.layers.1.mlp.shared_experts.up_proj.weight": dense(I, H),
                 "model.layers.1.mlp.shared_experts.down_proj.weight": dense(H, I)})
    shards.append(base)
    per_shard = 48  # experts per shard: ~1.1 GB written at a time
    n_shards = 1 + -(-E // per_shard)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    def save(i, tensors):
        save_file(tensors, str(path / names[i]), metadata={"format": "pt"})
        weight_map.update({n: names[i] for n in tensors})

    save(0, base)
    del base
    for s in tqdm(range(n_shards - 1), desc="writing synthetic experts", unit="shard"):
        t = {}
        for e in range(s * per_shard, min(E, (s + 1) * per_shard)):
            for proj, (n, m) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                pre = f"model.layers.1.mlp.experts.{e}.{proj}"
                t[f"{pre}.weight_packed"] = torch.randint(-2**31, 2**31 - 1, (n, m // 8), generator=g,
                                                          dtype=torch.int32)
                # scale so that W ~ N(0, 1/m)-ish: nibble std ~4.6
                t[f"{pre}.weight_scale"] = torch.full((n, m // 32), 1.0 / (4.6 * math.sqrt(m)),
                                                      dtype=torch.bfloat16)
                t[f"{pre}.weight_shape"] = torch.tensor([n, m], dtype=torch.int64)
        save(s + 1, t)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": vocab,
        "hidden_size": H, "intermediate_size": k["inter"], "moe_intermediate_size": I,
        "num_hidden_layers": 2, "num_attention_heads": k["heads"], "num_key_value_heads": k["heads"],
        "n_routed_experts": E, "num_experts_per_tok": k["topk"], "n_shared_experts": 1, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": k["kv_lora"], "q_lora_rank": k["q_lora"],
        "qk_rope_head_dim": k["rope"], "qk_nope_head_dim": k["nope"], "v_head_dim": k["v"],
        "routed_scaling_factor": 2.827, "norm_topk_prob": True, "max_position_embeddings": 262144,
        "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": 32}}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]},
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
class _Timed:
    """Wraps a layer's attention callable to add its wall time to a total (bench-only)."""

    def __init__(self, fn, totals, key, sync):
        self.fn, self.totals, self.key, self.sync = fn, totals, key, sync

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.fn(*a, **kw)
        self.sync()
        self.totals[self.key] = self.totals.get(self.key, 0.0) + time.perf_counter() - t0
        return out


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def bench(model_dir: Path, prompt: int, decode: int, backend: str | None, threads: int | None, seed: int,
          torch_threads: int | None = None, dtype: str = "bf16") -> dict:
    import torch

    import hybrid
    from hybrid.experts.cpu_moe import CpuMoE

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    opts = {"threads": threads} if threads else {}
    if backend:
        opts["experts_backend"] = backend
    model = hybrid.load(model_dir, max_len=prompt + decode + 8, dtype=torch.float32 if dtype == "fp32" else None,
                        **opts)
    load_s = time.perf_counter() - t0
    if torch_threads:
        torch.set_num_threads(torch_threads)
    rss_loaded = rss_bytes()
    net, cfg = model.network, model.config
    dev = net.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    L = cfg.num_hidden_layers
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (prompt,), generator=g)
    cache = model.make_cache(1, prompt + decode + 8)
    pos = torch.arange(prompt)
    last = torch.tensor([prompt - 1])
    net.forward(ids[:8], pos[:8], torch.zeros(8, dtype=torch.long), cache, last[:1] * 0 + 7)  # warm-up
    sync()
    t = time.perf_counter()
    logits = net.forward(ids, pos, torch.zeros_like(pos), cache, last)
    sync()
    prefill_s = time.perf_counter() - t

    totals: dict[str, float] = {}
    moe: dict[str, float] = {}

    def on_phase(layer, phase, seconds):
        moe[phase] = moe.get(phase, 0.0) + seconds

    for layer in net.layers:
        layer.attn = _Timed(layer.attn, totals, "attention", sync)
    for m in model.moe_layers().values():
        m.add_observer(on_phase=on_phase)
    tok = int(logits.argmax())
    step_times = []
    for i in range(decode):
        t = time.perf_counter()
        logits = net.forward(torch.tensor([tok]), torch.tensor([prompt + i]), torch.tensor([0]), cache)
        sync()
        step_times.append(time.perf_counter() - t)
        tok = int(logits[0].argmax())
    decode_s = sum(step_times)
    for m in model.moe_layers().values():
        m.remove_observer(on_phase)
    parts = {"attention": totals.get("attention", 0.0), "router": moe.get("router", 0.0),
             "experts": moe.get("experts_submit", 0.0), "shared": moe.get("shared", 0.0),
             "sync wait": moe.get("experts_wait", 0.0)}
    parts["other"] = max(0.0, decode_s - sum(parts.values()))

    # Python overhead: cProfile a few decode steps and add up the time spent in Python
    # functions themselves (tottime), leaving out builtins and C extension calls (torch ops,
    # the CPU engine), which cProfile lists as "{built-in ...}" / "{method ...}" entries.
    import cProfile
    import pstats

    n_prof = min(4, decode)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n_prof):
        p = prompt + decode + i
        logits = net.forward(torch.tensor([tok]), torch.tensor([p]), torch.tensor([0]), cache)
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    # cpu_moe.py's submit/sync are thin wrappers whose own time is the wait for the engine
    # (pybind11 methods are not seen as builtins by cProfile), so they are left out too.
    py_s = sum(v[2] for (f, _, name), v in stats.items()
               if not name.startswith("{") and f != "~" and not f.endswith("cpu_moe.py"))
    overhead = py_s / (n_prof * L)

    hosts = [m.host_experts() for m in model.moe_layers().values()]
    packed_bytes = sum(h.layer.nbytes for h in hosts if isinstance(h, CpuMoE))
    return {
        "model": str(model_dir), "device": str(dev), "dtype": str(net.dtype), "layers": L, "moe_layers": n_moe,
        "experts_backend": type(hosts[-1]).__name__ if hosts else None,
        "load_s": round(load_s, 2), "prefill_tokens": prompt, "prefill_tok_s": round(prompt / prefill_s, 2),
        "decode_tokens": decode, "decode_tok_s": round(decode / decode_s, 3),
        "decode_step_ms": round(1000 * decode_s / decode, 2),
        "step_breakdown_ms": {k2: round(1000 * v / decode, 3) for k2, v in parts.items()},
        "python_overhead_us_per_layer_token_upper_bound": round(1e6 * overhead, 1),
        "step_us_per_layer": round(1e6 * decode_s / decode / L, 1),
        "rss_before_load_gb": round(rss0 / 2**30, 2), "rss_after_load_gb": round(rss_loaded / 2**30, 2),
        "rss_end_gb": round(rss_bytes() / 2**30, 2), "packed_experts_gb": round(packed_bytes / 2**30, 2),
        "experts_loader": model.stats()["experts"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory")
    ap.add_argument("--synthetic", metavar="DIR", help="write (if absent) and bench the 2-layer K2.5-width checkpoint")
    ap.add_argument("--vocab", type=int, default=32768, help="synthetic vocabulary (K2.5: 163840)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--backend", choices=["cpu", "torch"], default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads after loading (default: hybrid.load's choice); 1 helps "
                         "on an oversubscribed machine, where every multi-threaded op waits for a core")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.synthetic):
        ap.error("give a MODEL directory or --synthetic DIR")
    path = Path(args.model or args.synthetic)
    if args.synthetic and not (path / "config.json").is_file():
        print(f"writing synthetic K2.5-width checkpoint to {path} ...", file=sys.stderr)
        write_synthetic(path, vocab=args.vocab, seed=args.seed)
    res = bench(path, args.prompt, args.decode, args.backend, args.threads, args.seed,
                args.torch_threads, args.dtype)
    if args.json:
        print(json.dumps(res))
    else:
        for k2, v in res.items():
            print(f"{k2:36s} {v}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
