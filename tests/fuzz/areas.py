"""The fuzz areas: what each mutates, what it runs, which errors count as a clean refusal.

Seed inputs (Seeds) are made once in the parent: a tiny DeepSeek-V3 checkpoint (2 layers, 2
shards, an index), the Kimi K2.5 and Qwen3-MoE config.json spellings, a packed layer file of
each format, and the demo model's tokenizer for request rendering. A case copies what it
mutates into its own folder (the rest is linked) and runs the real entry point on it:

  config      config.json fields (types, ranges, missing keys, nested rope / quantisation
              objects) -> the model's config parser and facts; one case in three that parses
              is loaded whole (shapes against the tensors)
  header      a shard's safetensors header, as JSON (dtypes, shapes, offsets, entries) or as
              bytes (its length word included) -> load
  data        bytes of a shard's tensor data -> load, then logits of 3 tokens (NaN may come
              out; a crash may not)
  index       model.safetensors.index.json (shard names: ../, absolute, missing; types) -> load
  packed      a packed layer file's header fields and length -> PackedLayer.load, a forward, unpack
  native      hybrid._native's functions with wrong arguments (native_cases.py)
  serve       OpenAI chat / completion and Anthropic messages bodies, as JSON and as bytes ->
              the dialect's parser, then the chat template and tokenizer (Backend.render_prompt)
  gguf        a tiny deepseek2 GGUF (Q8_0, its experts in their own blocks): bytes of its header,
              metadata and tensor table, a count or offset word set to an edge value, the file
              cut short -> load, then logits of 3 tokens
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.mutate import EDGE_U64, mutate_bytes, mutate_json

FILE_ERRORS = ("ValueError", "FileNotFoundError", "MemoryError")  # ConfigError, CheckpointError are ValueErrors


@dataclass
class Seeds:
    root: Path
    ckpt: Path                 # the tiny checkpoint
    configs: list[dict]        # config.json variants to start from
    packed: dict[str, Path]    # format -> packed layer file
    requests: list[tuple[str, dict]]  # (dialect route, body)
    backend: object            # hybrid.serve.backend.Backend over the demo tokenizer (no engine)
    gguf: Path                 # a tiny deepseek2 GGUF
    gguf_data: int             # where its tensor data starts (the header before it)


def make_seeds(root: Path) -> Seeds:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: checkpoints, native_ref
    from checkpoints import YARN, build
    from checkpoints_qwen3 import _shipped_spelling, hf_config
    from native_ref import random_experts

    from hybrid.experts.cpu_moe import PackedLayer
    from hybrid.serve.backend import Backend
    from hybrid.serve.metrics import Metrics
    from hybrid.tokenizer import load_tokenizer

    ckpt, _ = build(root / "seed", num_hidden_layers=2)
    base = json.loads((ckpt / "config.json").read_text())
    qwen = _shipped_spelling(json.loads(hf_config().to_json_string(use_diff=False)))
    yarn = dict(base, rope_scaling=dict(YARN))
    k25 = {"model_type": "kimi_k25", "text_config": dict(base, model_type="kimi_k2")}
    packed = {}
    for fmt in ("int4", "int8", "bf16"):
        p = root / f"layer.{fmt}.packed"
        PackedLayer.from_float(*random_experts(np.random.default_rng(0), 4, 64, 64), format=fmt).save(p)
        packed[fmt] = p
    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "hybrid" / "demo_model")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "get", "description": "d",
                                             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    requests = [
        ("/v1/chat/completions", {"model": "m", "messages": msgs, "max_tokens": 4, "temperature": 0.5,
                                  "stop": ["x"], "tools": [tool], "tool_choice": "auto", "logprobs": True,
                                  "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": "m", "messages": msgs + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"q\": \"a\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "result"}], "tools": [tool]}),
        ("/v1/completions", {"model": "m", "prompt": "once upon", "max_tokens": 3, "seed": 1, "top_p": 0.9}),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 3}),
        ("/v1/messages", {"model": "m", "max_tokens": 5, "system": "s", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"q": "a"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}],
            "tools": [{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}}),
    ]
    backend = Backend(None, tok, max_tokens=64, max_queued=4, metrics=Metrics())
    import gguf_files

    from hybrid.loaders.gguf_file import GGUFFile

    g, _, _ = gguf_files.deepseek2_gguf(root / "gguf", "q8_0", num_hidden_layers=2)
    f = GGUFFile(g)
    data = min(t.offset for t in f.tensors.values())
    f.close()
    return Seeds(root, ckpt, [base, yarn, k25, qwen], packed, requests, backend, g, data)


# ---- helpers -----------------------------------------------------------------------------------
def _case_dir(seeds: Seeds, area: str, index: int) -> Path:
    d = seeds.root / "cases" / f"{area}-{index}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _checkpoint_copy(seeds: Seeds, d: Path, copy: tuple[str, ...]) -> Path:
    """A checkpoint folder: the files named in `copy` copied (they get mutated), the rest linked."""
    for f in seeds.ckpt.iterdir():
        if f.name in copy:
            shutil.copyfile(f, d / f.name)
        else:
            os.symlink(f, d / f.name)
    return d


def _load(path: Path, backend: str = "torch"):
    import torch

    from hybrid.runtime.build import build_model

    return build_model(path, "cpu", torch.float32, experts_backend=backend, progress=False, split_threads=False)


def _logits(built, n: int = 3):
    import torch

    net, cfg = built.network, built.config
    ids = torch.arange(n) % cfg.vocab_size
    cache = net.make_cache(1, 16)
    out = net.forward(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), cache)
    return f"logits finite: {bool(torch.isfinite(out).all())}"


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# ---- areas: each returns (case callable, accepted error types, text the error must contain) ---
def config_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "config", index)
    raw = mutate_json(rng, rng.choice(seeds.configs))
    load_whole = rng.random() < 0.34

    def case():
        _checkpoint_copy(seeds, d, ("config.json",))
        os.unlink(d / "config.json")
        (d / "config.json").write_text(json.dumps(raw))
        from hybrid.models import config_from_dir, model_class

        cfg = config_from_dir(d)
        facts = model_class(cfg.model_type).facts(cfg)
        if load_whole and cfg.model_type in ("deepseek_v3", "kimi_k2"):
            _load(d)
            return "parsed and loaded"
        return f"parsed: {type(facts).__name__}"

    return case, FILE_ERRORS, d.name


def header_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "header", index)
    shard = rng.choice(_shards(seeds.ckpt)).name
    as_json = rng.random() < 0.6

    def case():
        _checkpoint_copy(seeds, d, (shard,))
        blob = (d / shard).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        if as_json:
            head = mutate_json(rng, json.loads(blob[8:8 + n]))
            new = json.dumps(head).encode()
            blob = struct.pack("<Q", len(new)) + new + blob[8 + n:]
        else:
            blob = mutate_bytes(rng, blob, hot=(0, 8 + n))
        (d / shard).write_bytes(blob)
        _load(d, rng.choice(["torch", "cpu"]))
        return "loaded"

    return case, FILE_ERRORS, d.name


def data_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "data", index)
    shard = rng.choice(_shards(seeds.ckpt)).name

    def case():
        _checkpoint_copy(seeds, d, (shard,))
        blob = (d / shard).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):  # stay inside the data: lengths are the header area's job
            at = rng.randrange(8 + n, len(b) - 4)
            b[at:at + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff",
                                       bytes(rng.randrange(256) for _ in range(4))])
        (d / shard).write_bytes(bytes(b))
        return _logits(_load(d, rng.choice(["torch", "cpu"])))

    return case, FILE_ERRORS, d.name


def index_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "index", index)
    name = "model.safetensors.index.json"
    raw = json.loads((seeds.ckpt / name).read_text())
    if rng.random() < 0.5:  # aim at the shard names
        wm = raw["weight_map"]
        key = rng.choice(sorted(wm))
        wm[key] = rng.choice(["../seed/" + wm[key], "/etc/hostname", "", ".", "..", "sub/" + wm[key],
                              wm[key] + "\u0000", "missing.safetensors", 7, None, ["x"], "config.json"])
    else:
        raw = mutate_json(rng, raw)

    def case():
        _checkpoint_copy(seeds, d, (name,))
        os.unlink(d / name)
        (d / name).write_text(json.dumps(raw))
        _load(d)
        return "loaded"

    return case, FILE_ERRORS, d.name


# LayerHeader field offsets (csrc/core/packed_layer.h): magic 0, version 8, format 12, then u64s.
_PACKED_U64 = [16, 24, 32, 40, 48, 56, 64, 72, 80, 88]


def packed_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "packed", index)
    fmt = rng.choice(sorted(seeds.packed))

    def case():
        import numpy as np

        from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

        b = bytearray(seeds.packed[fmt].read_bytes())
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            if op == 0 and len(b) >= 96:
                at = rng.choice(_PACKED_U64)
                b[at:at + 8] = struct.pack("<Q", rng.choice(EDGE_U64 + [struct.unpack("<Q", b[at:at + 8])[0] + 1]))
            elif op == 1 and len(b) >= 16:
                at = rng.choice([8, 12])
                b[at:at + 4] = struct.pack("<I", rng.choice([0, 1, 2, 3, 7, 2**31, 2**32 - 1]))
            elif op == 2:
                del b[rng.choice([0, 100, 4096, 2 << 20, len(b) - 4096, len(b) - 1]):]
            else:
                b = bytearray(mutate_bytes(rng, bytes(b), hot=(0, 96)))
        p = d / "layer.packed"
        p.write_bytes(bytes(b))
        layer = PackedLayer.load(p)
        moe = CpuMoE(layer, mode=rng.choice(["fast", "precise"]))
        x = np.ones((2, layer.hidden), np.float32)
        ids = np.zeros((2, 2), np.int32) + np.int32(layer.num_experts - 1)
        moe.forward(x, ids, np.ones((2, 2), np.float32))
        layer.unpack_expert(layer.num_experts - 1)
        return f"loaded {layer}"

    return case, ("ValueError", "RuntimeError", "FileNotFoundError"), "layer.packed"


def native_case(seeds: Seeds, rng: random.Random, index: int):
    from tests.fuzz.native_cases import ACCEPT, build

    name, fn, args = build(rng)

    def case():
        fn(*args)
        return f"{name}: computed"

    return case, ACCEPT, None


def serve_case(seeds: Seeds, rng: random.Random, index: int):
    route, body = rng.choice(seeds.requests)
    as_bytes = rng.random() < 0.25
    raw = (mutate_bytes(rng, json.dumps(body).encode()) if as_bytes
           else json.dumps(mutate_json(rng, body)).encode())

    def case():
        from hybrid.serve import anthropic_requests, openai_requests
        from hybrid.serve.fields import parse_json_body

        parsed = parse_json_body(raw)
        if route == "/v1/messages":
            job, _ = anthropic_requests.parse_request(parsed, "m", 64)
        elif route == "/v1/completions":
            job, _ = openai_requests.parse_completion_request(parsed, "m", 64)
        else:
            job, _ = openai_requests.parse_chat_request(parsed, "m", 64)
        ids, _ = seeds.backend.render_prompt(job)
        return f"{route}: {len(ids)} prompt tokens"

    return case, ("ApiError",), None


def gguf_case(seeds: Seeds, rng: random.Random, index: int):
    d = _case_dir(seeds, "gguf", index)

    def case():
        b = bytearray(seeds.gguf.read_bytes())
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            if op == 0:  # the tensor / metadata counts, or a word anywhere in the header
                at = rng.choice([8, 16, 8 * rng.randrange(3, seeds.gguf_data // 8)])
                b[at:at + 8] = struct.pack("<Q", rng.choice(EDGE_U64))
            elif op == 1:
                del b[rng.choice([4, 24, seeds.gguf_data // 2, seeds.gguf_data, len(b) // 2, len(b) - 1]):]
            else:
                b = bytearray(mutate_bytes(rng, bytes(b), hot=(0, seeds.gguf_data)))
        p = d / "model.gguf"
        p.write_bytes(bytes(b))
        return _logits(_load(p, rng.choice(["torch", "cpu"])))

    return case, FILE_ERRORS + ("GGUFError",), "model.gguf"


AREAS = {"config": config_case, "header": header_case, "data": data_case, "index": index_case,
         "packed": packed_case, "native": native_case, "serve": serve_case, "gguf": gguf_case}
