"""Train the embedded demo model (hybrid/demo_model/) from CPython's own documentation.

The model has Kimi K2.5's architecture (DeepSeek-V3: MLA attention, sigmoid router with
e_score_correction_bias / noaux_tc, one shared expert, first layer dense), only tiny: it is here
so `hybrid chat` works with no download, and so tests and the planner have a real checkpoint
whose router has learned, skewed expert preferences (random weights route uniformly and teach
the planner nothing).

Steps (each one is a function below):
  1. documents  scripts/demo_data.py: stdlib docstrings + pydoc topics, plain and as Kimi chats
  2. tokenizer  byte-level BPE (`tokenizers`), Kimi's special tokens first (ids 0..14)
  3. training   transformers' DeepseekV3ForCausalLM on torch CPU, AdamW, warmup + cosine LR,
                gradient clipping; the router bias follows DeepSeek's aux-loss-free rule
                bias += gamma * sign(mean_load - load) with a small gamma, so balance improves
                without erasing the learned preferences
  4. export     bf16 safetensors in the Hugging Face layout (per-expert tensors, as Kimi ships),
                tokenizer.json, tokenizer_config.json with the chat template, generation_config
  5. report     validation loss, expert-usage skew per layer, greedy sample answers

The schedule is driven by progress = max(step / max_steps, elapsed / time_budget), so a run on a
crowded machine still ends on time with a fully decayed learning rate. Checkpoints go to --work
every --ckpt-every steps; --resume continues from the last one; --export-only re-exports it.

    nice -n 10 python scripts/train_demo.py --minutes 45          # full run (~45 min, 2 threads)
    python scripts/train_demo.py --export-only                     # re-export the last checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "hybrid" / "demo_model",
                   help="where the final checkpoint is written")
    p.add_argument("--work", type=Path, default=Path("/tmp/hybrid_demo_train"),
                   help="tokenizer, token streams, checkpoints and logs of this run")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-time budget for training")
    p.add_argument("--max-steps", type=int, default=6000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=1e-4,
                   help="router bias update speed (DeepSeek uses 1e-3; smaller keeps skew)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --work/ckpt.pt")
    p.add_argument("--export-only", action="store_true", help="export --work/ckpt.pt and report")
    p.add_argument("--card-note", default="",
                   help="text added to MODEL_CARD.md's training section (e.g. how a run was resumed)")
    return p.parse_args(argv)


def model_config(vocab_size: int):
    """Kimi K2.5's config.json fields, scaled down. 64 experts pick 8, as 384 pick 8 in K2.5."""
    from transformers import DeepseekV3Config

    from demo_data import SPECIAL_TOKENS

    cfg = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,           # the dense layer 0 MLP
        moe_intermediate_size=32,        # one routed expert; also the shared expert width
        num_hidden_layers=5,             # layer 0 dense + 4 MoE layers
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=1,                       # Kimi K2.5: no group-limited routing
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.827,     # Kimi K2.5's value
        max_position_embeddings=2048,
        rope_scaling=None,               # YaRN off
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        bos_token_id=SPECIAL_TOKENS.index("[BOS]"),
        eos_token_id=SPECIAL_TOKENS.index("[EOS]"),
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        topk_method="noaux_tc",          # read by DeepSeek's own code and by hybrid's loader
        scoring_func="sigmoid",
    )
    # Experts as one grouped matmul: ~2x faster than the per-expert loop on CPU, same math.
    cfg._experts_implementation = "grouped_mm"
    return cfg


# ---- 1+2. documents and tokenizer ---------------------------------------------------------

def build_tokenizer(train_docs, vocab_size: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from demo_data import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):  # ids are part of the contract with config.json
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.save(str(path))
    return tok


def encode_stream(tok, docs):
    """All documents as one int32 token stream, each followed by [EOS]."""
    import numpy as np

    from demo_data import SPECIAL_TOKENS

    eos = SPECIAL_TOKENS.index("[EOS]")
    parts = []
    for i in range(0, len(docs), 512):
        for enc in tok.encode_batch(docs[i:i + 512]):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts)


def prepare_data(args):
    import numpy as np
    from tokenizers import Tokenizer

    from demo_data import build_documents

    args.work.mkdir(parents=True, exist_ok=True)
    tok_path = args.work / "tokenizer.json"
    train_path, val_path = args.work / "train.npy", args.work / "val.npy"
    if tok_path.exists() and train_path.exists() and val_path.exists():
        return Tokenizer.from_file(str(tok_path)), np.load(train_path), np.load(val_path)
    t0 = time.time()
    print("building documents from CPython's documentation ...", flush=True)
    train_docs, val_docs = build_documents(seed=args.seed)
    print(f"  {len(train_docs)} train / {len(val_docs)} val documents, "
          f"{sum(map(len, train_docs)) / 1e6:.1f} M chars ({time.time() - t0:.0f} s)", flush=True)
    print(f"training a {args.vocab}-token byte-level BPE tokenizer ...", flush=True)
    tok = build_tokenizer(train_docs, args.vocab, tok_path)
    train, val = encode_stream(tok, train_docs), encode_stream(tok, val_docs)
    np.save(train_path, train)
    np.save(val_path, val)
    print(f"  {len(train) / 1e6:.2f} M train tokens, {len(val) / 1e6:.3f} M val tokens "
          f"({time.time() - t0:.0f} s)", flush=True)
    return tok, train, val


# ---- 3. training ----------------------------------------------------------------------------

class RouterLoad:
    """Counts, per MoE layer, how often each expert was picked in the last forward pass(es)."""

    def __init__(self, model):
        import torch

        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self.counts = [torch.zeros(r.num_experts, dtype=torch.float64) for r in self.routers]
        self._hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i):
        import torch

        def hook(module, inputs, output):
            idx = output[2]  # [T, K] picked expert ids
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=module.num_experts).double()

        return hook

    def reset(self):
        for c in self.counts:
            c.zero_()

    def update_bias(self, gamma: float):
        """DeepSeek-V3's aux-loss-free balancing: nudge under-used experts up, over-used down."""
        import torch

        with torch.no_grad():
            for r, c in zip(self.routers, self.counts):
                r.e_score_correction_bias += gamma * torch.sign(c.mean() - c).float()

    def close(self):
        for h in self._hooks:
            h.remove()


def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.lr * args.min_lr_frac
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def val_windows(val, seq: int, n: int = 24):
    import numpy as np
    import torch

    n = min(n, (len(val) - 1) // (seq + 1))
    if n < 1:
        raise ValueError(f"validation stream has {len(val)} tokens, fewer than one {seq}-window")
    w = np.stack([val[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(n)])
    return torch.from_numpy(w.astype(np.int64))


def labels_for(ids):
    """Labels = the inputs (transformers shifts them), except the `</think>` that closes an
    empty `<think>`: whether to think is the caller's choice (the chat template writes
    `<think></think>` into instant-mode prompts), so the model must not learn to skip the
    reasoning that a thinking-mode prompt asks for. Without this, greedy thinking mode closes
    `<think>` at once because most training chats are instant."""
    from demo_data import SPECIAL_TOKENS

    labels = ids.clone()
    open_, close = SPECIAL_TOKENS.index("<think>"), SPECIAL_TOKENS.index("</think>")
    skip = (ids[:, 1:] == close) & (ids[:, :-1] == open_)
    labels[:, 1:][skip] = -100
    return labels


def evaluate(model, windows, batch: int) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            total += model(input_ids=w[:, :-1], labels=labels_for(w[:, :-1])).loss.item() * len(w)
    model.train()
    return total / len(windows)


def save_checkpoint(path: Path, model, opt, state: dict):
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
    os.replace(tmp, path)


def train(args, model, train_stream, val_stream):
    import numpy as np
    import torch

    ckpt = args.work / "ckpt.pt"
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    state = {"step": 0, "elapsed": 0.0, "tokens": 0, "log": []}
    if args.resume and ckpt.exists():
        blob = torch.load(ckpt, weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        state = blob["state"]
        print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min)", flush=True)

    windows = val_windows(val_stream, args.seq)
    rng = np.random.default_rng(args.seed + state["step"])
    load = RouterLoad(model)
    budget = args.minutes * 60
    t_start = time.time() - state["elapsed"]
    t_print, tok_print = time.time(), state["tokens"]
    model.train()
    while True:
        elapsed = time.time() - t_start
        progress = max(state["step"] / args.max_steps, elapsed / budget)
        if progress >= 1.0:
            break
        lr = lr_at(args, state["step"], progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # [B, S+1] random windows of the train stream; inputs and labels are the same tensor,
        # transformers shifts labels inside the loss.
        starts = rng.integers(0, len(train_stream) - args.seq - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train_stream[s:s + args.seq] for s in starts]).astype(np.int64))
        load.reset()
        loss = model(input_ids=batch, labels=labels_for(batch)).loss
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        load.update_bias(args.gamma)
        state["step"] += 1
        state["tokens"] += batch.numel()

        if state["step"] % 20 == 0:
            now = time.time()
            tps = (state["tokens"] - tok_print) / (now - t_print)
            t_print, tok_print = now, state["tokens"]
            print(f"step {state['step']:5d}  loss {loss.item():.3f}  gnorm {gnorm:.2f}  lr {lr:.2e}  "
                  f"{tps:.0f} tok/s  {state['tokens'] / 1e6:.2f} M tok  "
                  f"{(now - t_start) / 60:.1f}/{args.minutes:.0f} min", flush=True)
        if state["step"] % args.eval_every == 0:
            vl = evaluate(model, windows, args.batch)
            state["log"].append({"step": state["step"], "tokens": state["tokens"],
                                 "minutes": round((time.time() - t_start) / 60, 2),
                                 "train_loss": round(loss.item(), 4), "val_loss": round(vl, 4)})
            print(f"  val loss {vl:.3f} (ppl {math.exp(vl):.1f})", flush=True)
        if state["step"] % args.ckpt_every == 0:
            state["elapsed"] = time.time() - t_start
            save_checkpoint(ckpt, model, opt, state)
    load.close()
    state["elapsed"] = time.time() - t_start
    vl = evaluate(model, windows, args.batch)
    state["final_val_loss"] = vl
    state["log"].append({"step": state["step"], "tokens": state["tokens"],
                         "minutes": round(state["elapsed"] / 60, 2), "val_loss": round(vl, 4)})
    print(f"done: {state['step']} steps, {state['tokens'] / 1e6:.2f} M tokens, "
          f"{state['elapsed'] / 60:.1f} min, final val loss {vl:.3f}", flush=True)
    save_checkpoint(ckpt, model, opt, state)
    return state


# ---- 4. export -----------------------------------------------------------------------------

def export(args, model, tok_path: Path, state: dict):
    """Write the shipped directory: bf16 weights (router bias kept fp32, as DeepSeek ships it)."""
    import copy

    import torch
    from transformers import GenerationConfig

    from demo_data import KIMI_CHAT_TEMPLATE, SPECIAL_TOKENS

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    m = copy.deepcopy(model).to(torch.bfloat16)
    for name, buf in m.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.data = buf.data.float()
    m.config.dtype = "bfloat16"
    m.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKENS.index("[BOS]"),
        eos_token_id=[SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("[EOS]")],
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=256,
    )
    m.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("_experts_implementation", None)  # a training choice, not part of the checkpoint
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(tok_path, out / "tokenizer.json")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "chat_template": KIMI_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
         "additional_special_tokens": SPECIAL_TOKENS[3:]}, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported to {out} ({size / 1e6:.2f} MB)", flush=True)


# ---- 5. report -----------------------------------------------------------------------------

def gini(counts) -> float:
    """0 = every expert picked equally often, toward 1 = a few experts take everything."""
    import numpy as np

    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def expert_usage(model, val_stream, seq: int) -> list[dict]:
    import numpy as np
    import torch

    windows = val_windows(val_stream, seq, n=32)
    load = RouterLoad(model)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(input_ids=windows[i:i + 4, :-1])
    out = []
    for layer, c in enumerate(load.counts, start=1):
        c = np.sort(c.numpy())[::-1]
        share8 = float(c[:8].sum() / c.sum())
        out.append({"layer": layer, "gini": round(gini(c), 3), "top8_share": round(share8, 3),
                    "unused_experts": int((c == 0).sum()),
                    "max_over_mean": round(float(c.max() / c.mean()), 2)})
    load.close()
    return out, int(windows[:, :-1].numel())


SAMPLE_PROMPTS = [
    ("What does str.split do?", False),
    ("Explain the with statement.", False),
    ("What is the json module for?", False),
    ("How do I use itertools.chain?", False),
    ("What does len do?", True),
]


def samples(out_dir: Path, max_new_tokens: int = 80) -> list[dict]:
    """Greedy answers from the exported directory, loaded the way users load it."""
    import torch
    from tokenizers import Tokenizer
    from transformers import DeepseekV3ForCausalLM

    from demo_data import SPECIAL_TOKENS, make_renderer

    model = DeepseekV3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    render = make_renderer()
    stop = [SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("[EOS]")]
    results = []
    for q, thinking in SAMPLE_PROMPTS:
        prompt = render([{"role": "user", "content": q}], add_generation_prompt=True, thinking=thinking)
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=SPECIAL_TOKENS.index("[PAD]"))
        answer = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
        results.append({"prompt": q, "thinking": thinking, "answer": answer})
        print(f"\n>>> {q}  (thinking={thinking})\n{answer}", flush=True)
    return results


MODEL_CARD = """# hybrid demo model

A tiny model with the architecture of Kimi K2.5 (DeepSeek-V3: MLA attention, sigmoid router with
`e_score_correction_bias`, one shared expert, first layer dense), trained on CPython's own
documentation. It ships inside the package so `hybrid chat`, `hybrid serve` and the tests work
with no download, and so the planner sees a router with real, learned expert preferences.

It is a demo, not an assistant: it answers questions about Python in the style of a docstring,
often inventing details. Do not rely on what it says.

## Files

| file | what |
|---|---|
| `config.json` | `DeepseekV3Config` (model_type `deepseek_v3`), Kimi K2.5's fields scaled down |
| `model.safetensors` | weights in the Hugging Face layout, one tensor per expert projection as Kimi ships them; bf16, router `e_score_correction_bias` fp32 |
| `tokenizer.json` | byte-level BPE, 4096 tokens; Kimi's special tokens at ids 0-14 |
| `tokenizer_config.json` | special tokens and the Kimi K2-style `chat_template` |
| `generation_config.json` | stops at `<|im_end|>` (3) or `[EOS]` (1) |

Load it with transformers (`DeepseekV3ForCausalLM.from_pretrained`) or with `hybrid.load(None)`.

## Architecture

__ARCH__

## Chat format

Kimi K2's: `<|im_system|>system<|im_middle|>...<|im_end|><|im_user|>user<|im_middle|>...<|im_end|><|im_assistant|>assistant<|im_middle|>`,
then `<think>` (thinking mode, the default) or `<think></think>` (instant mode). Tools are
declared in a `<|im_system|>tool_declare<|im_middle|>[...]<|im_end|>` message; tool calls are
`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>`,
tool results a `<|im_system|>tool<|im_middle|>## Return of ID\\n...<|im_end|>` turn. With no
system message the template inserts "You are a helpful assistant that answers questions about
Python."

## Training data and licence

All training text ships with CPython 3.11 (no download):

- `pydoc_data.topics.topics`: the language reference topics that `help("with")` shows;
- docstrings of the pure-Python standard library, read from the `.py` files with `ast` (no module
  is imported), and of builtins and a few C modules (`math`, `itertools`, `operator`, `time`,
  `sys`, ...) read with `inspect`; test, GUI and private modules are skipped;
- chats synthesised from the same entries in Kimi's format: a question ("What does str.split
  do?", "Explain the with statement.") answered with the signature and docstring; 65% instant
  mode, 25% with a short `<think>` reasoning, 10% calling a `python_help` tool and summarising
  its result.

__DATA__

The text is Copyright (c) 2001-2023 Python Software Foundation, used under the PSF License
Agreement for Python 3.11 (https://docs.python.org/3/license.html), which permits derived works
with this notice. The weights are released under this project's licence (Apache-2.0).

## Training

`scripts/train_demo.py` (the tokenizer, corpus, training, export and the figures below all come
from that one script; `scripts/demo_data.py` builds the documents):

__TRAIN__

## Expert usage

Counted over __USAGE_TOKENS__ validation tokens. Gini 0 means every expert is picked equally
often; uniform routing gives a top-8 share of 8/64 = 0.125.

__USAGE__

## Sample answers (greedy, from the shipped bf16 weights loaded in fp32)

__SAMPLES__
"""


def write_model_card(out: Path, cfg: dict, report: dict) -> None:
    """MODEL_CARD.md beside the weights, with this run's figures."""
    arch = "\n".join(f"| {k} | {cfg.get(k)} |" for k in [
        "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
        "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
        "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "num_attention_heads",
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "vocab_size", "max_position_embeddings", "topk_method", "scoring_func", "rope_parameters"])
    arch = (f"{report['parameters'] / 1e6:.2f} M parameters, "
            f"{report['file_mb']:.1f} MB on disk.\n\n| field | value |\n|---|---|\n" + arch)
    data = (f"Corpus: {report['train_tokens_in_corpus'] / 1e6:.2f} M training tokens, "
            f"{report['val_tokens_in_corpus'] / 1e3:.0f} K validation tokens (3% of the documented "
            "names, held out by a hash of the name, with all their chats).")
    train = "\n".join([
        f"- {report['steps']} steps of {report['batch']} x {report['seq']} tokens: "
        f"{report['tokens_trained'] / 1e6:.2f} M tokens, {report['wall_minutes']} minutes wall "
        f"time on {report['threads']} CPU thread(s) of a shared 2-core machine (torch CPU, "
        "transformers' DeepseekV3ForCausalLM, experts as grouped matmuls);",
        f"- AdamW (0.9, 0.95), peak LR {report['lr']}, warmup then cosine on "
        "max(step fraction, time fraction), gradient clipping 1.0, loss on every token but the "
        "`</think>` closing an empty `<think>` (see `labels_for`);",
        f"- router bias: DeepSeek-V3's aux-loss-free rule, bias += {report['gamma']} * "
        "sign(mean load - load) per step and layer; gamma is 10x below DeepSeek's so the learned "
        "preferences stay skewed (the planner's expert cache needs skew to pay);",
        f"- final validation loss {report['final_val_loss']:.3f} "
        f"(perplexity {math.exp(report['final_val_loss']):.1f}).",
        "", "| step | tokens | minutes | val loss |", "|---|---|---|---|"] + [
        f"| {r['step']} | {r['tokens'] / 1e6:.2f} M | {r['minutes']} | {r['val_loss']:.3f} |"
        for r in {r["step"]: r for r in report["log"]}.values()])  # last entry per step
    if report.get("card_note"):
        train += "\n\n" + report["card_note"]
    usage = "| MoE layer | Gini | top-8 share | unused experts | busiest / mean |\n|---|---|---|---|---|\n"
    usage += "\n".join(f"| {u['layer']} | {u['gini']:.3f} | {u['top8_share']:.3f} | "
                        f"{u['unused_experts']} | {u['max_over_mean']:.2f} |"
                        for u in report["expert_usage"])
    samples = "\n\n".join(
        f"**{s['prompt']}** ({'thinking' if s['thinking'] else 'instant'} mode)\n\n```\n"
        f"{s['answer']}\n```" for s in report["samples"])
    text = (MODEL_CARD.replace("__ARCH__", arch).replace("__DATA__", data)
            .replace("__TRAIN__", train).replace("__USAGE_TOKENS__", f"{report['usage_tokens']:,}")
            .replace("__USAGE__", usage).replace("__SAMPLES__", samples))
    (out / "MODEL_CARD.md").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok, train_stream, val_stream = prepare_data(args)
    if tok.get_vocab_size() != args.vocab:
        raise SystemExit(f"{args.work}/tokenizer.json has {tok.get_vocab_size()} tokens, "
                         f"--vocab is {args.vocab}: use a fresh --work directory")

    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(model_config(args.vocab))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    if args.export_only:
        blob = torch.load(args.work / "ckpt.pt", weights_only=False)
        model.load_state_dict(blob["model"])
        state = blob["state"]
    else:
        state = train(args, model, train_stream, val_stream)
    export(args, model, args.work / "tokenizer.json", state)
    usage, usage_tokens = expert_usage(model, val_stream, args.seq)
    for u in usage:
        print(f"layer {u['layer']}: gini {u['gini']:.3f}  top-8 share {u['top8_share']:.3f}  "
              f"unused {u['unused_experts']}  max/mean {u['max_over_mean']:.2f}", flush=True)
    answers = samples(args.out)
    report = {
        "parameters": n_params,
        "file_mb": sum(f.stat().st_size for f in args.out.iterdir() if f.is_file()) / 1e6,
        "usage_tokens": usage_tokens,
        "train_tokens_in_corpus": int(len(train_stream)),
        "val_tokens_in_corpus": int(len(val_stream)),
        "steps": state["step"], "tokens_trained": state["tokens"],
        "wall_minutes": round(state["elapsed"] / 60, 1),
        "final_val_loss": round(state.get("final_val_loss", float("nan")), 4),
        "threads": args.threads, "seq": args.seq, "batch": args.batch, "lr": args.lr,
        "gamma": args.gamma, "card_note": args.card_note, "expert_usage": usage, "samples": answers, "log": state["log"],
    }
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(args.out, json.loads((args.out / "config.json").read_text()), report)
    print(f"report: {args.work / 'report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
