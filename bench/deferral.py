"""The accuracy cost of expert deferral (hybrid.load(defer_experts=k), hybrid/experts/moe_layer.py):
each MoE layer's k lowest-weight CPU picks per token are added to the next MoE layer's output.

    python bench/deferral.py                 # demo model + the K2.5-shaped tiny checkpoint
    python bench/deferral.py --ks 1 2 3 --tokens 48 --json out.json

For each model and k, against the same model with no deferral (same dtype, fp32 unless --bf16,
so rounding is not counted as deferral's cost), over teacher-forced text (the demo model: its
chat template around profiles/prompts/demo.jsonl's questions, then the undeferred model's greedy
answer; random checkpoints: the undeferred greedy continuation of a fixed prompt):
  top1      share of positions whose argmax is unchanged
  kl_mean   mean over positions of KL(p_no_deferral || p_deferred), nats
  kl_max    its maximum
  greedy    tokens generated greedily with deferral before the first that differs (of --tokens)

The checkpoints' weights decide how much a flipped low-weight pick matters: the demo model is
trained (on a small corpus), the K2.5-shaped one is random (bench/gpu_check.py writes it), so its
figures are an upper bound more than an estimate. Deferral stays off by default unless the cost
is negligible on real weights.

Legend: k deferred picks per token, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _prompts_demo(model, n: int) -> list[list[int]]:
    lines = (REPO / "profiles" / "prompts" / "demo.jsonl").read_text().splitlines()[:n]
    return [list(model.tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True))
            for line in lines]


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache(1, len(prompt) + n + 1)
    T = len(prompt)
    logits = model.forward(torch.tensor(prompt), torch.arange(T), torch.zeros(T, dtype=torch.long), cache,
                           logits_index=torch.tensor([T - 1]))
    out = []
    for i in range(n):
        out.append(int(logits[0].argmax()))
        logits = model.forward(torch.tensor([out[-1]]), torch.tensor([T + i]), torch.tensor([0]), cache)
    return out


def measure(path, ks, tokens: int, dtype, prompts_of) -> dict:
    import hybrid

    base = hybrid.load(path, progress=False, dtype=dtype, max_len=1024)
    prompts = prompts_of(base)
    seqs = [p + greedy(base, p, tokens) for p in prompts]
    ref = [base.logits(s).log_softmax(-1) for s in seqs]
    base_greedy = [greedy(base, p, tokens) for p in prompts]
    rows = []
    for k in ks:
        m = hybrid.load(path, progress=False, dtype=dtype, max_len=1024, defer_experts=k)
        top1 = kl_sum = kl_max = n = div = 0.0
        for s, r, p, g0 in zip(seqs, ref, prompts, base_greedy):
            lp = m.logits(s).log_softmax(-1)
            kl = (r.exp() * (r - lp)).sum(-1)  # [positions]
            top1 += float((lp.argmax(-1) == r.argmax(-1)).sum())
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            n += len(s)
            g = greedy(m, p, tokens)
            div += next((i for i, (a, b) in enumerate(zip(g, g0)) if a != b), tokens)
        rows.append({"k": k, "top1": top1 / n, "kl_mean": kl_sum / n, "kl_max": kl_max,
                     "greedy_before_divergence": div / len(prompts), "positions": int(n)})
    return {"top_k": base.config.num_experts_per_tok, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--bf16", action="store_true", help="measure in bf16 instead of fp32")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import write_k25_shaped

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        k25 = write_k25_shaped(Path(tmp) / "k25-shaped")
        random_prompts = lambda m: [[3 + (7 * i + j) % 90 for j in range(16)] for i in range(args.prompts)]  # noqa: E731
        result["demo"] = measure(None, args.ks, args.tokens, dtype, lambda m: _prompts_demo(m, args.prompts))
        result["k25-shaped (random)"] = measure(k25, args.ks, args.tokens, dtype, random_prompts)
    print(f"| model | top-k | deferred k | top-1 agreement | KL mean (nats) | KL max | greedy tokens before divergence (of {args.tokens}) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result.items():
        for row in r["rows"]:
            print(f"| {name} | {r['top_k']} | {row['k']} | {row['top1']:.3f} | {row['kl_mean']:.4f} | "
                  f"{row['kl_max']:.3f} | {row['greedy_before_divergence']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
