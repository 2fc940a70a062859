"""Shared by the serve and chat tests: a tiny real checkpoint with a Kimi-style tokenizer, and a
live server on a free loopback port.

The checkpoint is a seeded random transformers DeepseekV3ForCausalLM (tests/checkpoints.py)
with a byte-level tiktoken vocabulary plus Kimi's special tokens (chat markers, <think>, the
tool-call section markers). Random weights produce gibberish, which is all the protocol tests
need; everything else (tokenizer, template, engine, model) is the real code.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

N_BASE = 256  # byte tokens
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
            "<|im_middle|>", "<think>", "</think>", "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
            "<|tool_call_end|>", "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"]
MEDIA_PAD = N_BASE + SPECIALS.index("<|media_pad|>")  # the image placeholder of vision_checkpoint_dir()
VOCAB = N_BASE + 256  # Kimi reserves 256 special ids after the BPE vocabulary
CONTEXT = 1024


def write_tokenizer(directory: Path) -> None:
    from hybrid.tokenizer import write_tiktoken_ranks

    write_tiktoken_ranks({bytes([i]): i for i in range(N_BASE)}, directory / "tiktoken.model")
    config = {"bos_token": "[BOS]", "eos_token": "[EOS]", "add_bos_token": False,
              "added_tokens_decoder": {str(N_BASE + i): {"content": s, "special": True}
                                       for i, s in enumerate(SPECIALS)}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@functools.cache
def checkpoint_dir() -> Path:
    """Built once per test process (about 10 s, mostly importing transformers)."""
    from checkpoints import build

    base = Path(tempfile.mkdtemp(prefix="hybrid-serve-test-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    path, _ = build(base, vocab_size=VOCAB, max_position_embeddings=CONTEXT, shards=1,
                    bos_token_id=N_BASE, eos_token_id=N_BASE + 1)
    write_tokenizer(path)
    return path


@functools.cache
def vision_checkpoint_dir() -> Path:
    """A tiny Kimi K2.5 with a vision tower (tests/checkpoints_vision.py, release naming) and the
    same tokenizer; <|media_pad|> is its image placeholder."""
    from checkpoints_vision import build

    base = Path(tempfile.mkdtemp(prefix="hybrid-serve-vision-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    path, _ = build(base, placeholder=MEDIA_PAD, vocab_size=VOCAB, max_position_embeddings=CONTEXT, shards=1,
                    bos_token_id=N_BASE, eos_token_id=N_BASE + 1)
    write_tokenizer(path)
    return path


@functools.cache
def vision_model():
    import torch

    import hybrid

    return hybrid.load(vision_checkpoint_dir(), dtype=torch.float32, progress=False)


@functools.cache
def no_stop_checkpoint_dir() -> Path:
    """The same checkpoint with the LM head rows of the stop tokens ([EOS], <|im_end|>) zeroed.

    Their logit is then 0 while the best of the other 510 random logits is positive unless all
    are negative (odds 2^-510), so greedy decoding never stops early: answers run to max_tokens,
    long enough to interrupt."""
    from safetensors.torch import load_file, save_file

    src = checkpoint_dir()
    dst = src.parent / (src.name + "-nostop")
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    head = tensors["lm_head.weight"].clone()
    head[[N_BASE + SPECIALS.index("[EOS]"), N_BASE + SPECIALS.index("<|im_end|>")]] = 0
    tensors["lm_head.weight"] = head
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@functools.cache
def model():
    import torch

    import hybrid

    # fp32: batch composition must not flip a greedy argmax through bf16 rounding.
    return hybrid.load(checkpoint_dir(), dtype=torch.float32, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(...) in a background thread on 127.0.0.1."""

    def __init__(self, config_overrides: dict | None = None, max_seqs: int = 32, loaded=None,
                 context: int = CONTEXT):
        import uvicorn

        from hybrid.engine.engine import Engine
        from hybrid.serve.app import create_app
        from hybrid.serve.backend import Backend
        from hybrid.serve.config import ServeConfig
        from hybrid.serve.metrics import Metrics

        m = loaded if loaded is not None else model()
        settings = dict(port=free_port(), model_name="tiny", max_running=max_seqs, max_tokens=512,
                        max_body_bytes=64 * 1024)
        settings.update(config_overrides or {})
        cfg = ServeConfig(**settings)
        cfg.validate()
        self.config = cfg
        self.engine = Engine(m, tokenizer=m.tokenizer, max_seqs=max_seqs, max_context=context)
        self.backend = Backend(self.engine, m.tokenizer, cfg.max_tokens, cfg.max_queued, Metrics(), model=m,
                               images=cfg.image_policy())
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.backend, cfg), host="127.0.0.1",
                                                    port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{cfg.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


def stop_string_for(shown: str, raw: str, start: int = 8) -> str:
    """A short stop string (3 characters if it can) from an answer's `shown` text, not at its
    start, that first occurs at the same place
    in its `raw` text (special tokens included: the engine matches stops there, while a random
    model's special tokens are dropped from what is shown)."""
    import re

    specials = re.compile("|".join(re.escape(t) for t in SPECIALS) + r"|<\|reserved_token_\d+\|>")
    for n in (3, 2, 1):
        for i in list(range(start, len(shown) - n)) + list(range(1, start)):
            w = shown[i:i + n]
            j, k = raw.find(w), shown.find(w)
            if j >= 0 and specials.sub("", raw[:j]) == shown[:k]:
                return w
    raise AssertionError(f"no usable stop string in {shown!r}")


def raw_answer(server: "LiveServer", messages: list[dict], max_tokens: int, key: str) -> str:
    """The greedy instant-mode answer to `messages` as the engine decoded it, special tokens
    included: the chat prompt's token ids sent to /v1/completions, which shows text unparsed."""
    import httpx

    from hybrid.serve.job import Job

    ids, _ = server.backend.render_prompt(Job(messages=messages, thinking=False))
    r = httpx.post(server.url + "/v1/completions", headers={"x-api-key": key}, timeout=60, json={
        "model": server.config.model_name, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    return r.json()["choices"][0]["text"]


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_tokenizer_has_kimi_markers_as_single_tokens():
    from hybrid.tokenizer import load_tokenizer

    d = Path(tempfile.mkdtemp())
    try:
        write_tokenizer(d)
        tok = load_tokenizer(d)
        for s in SPECIALS:
            assert len(tok.encode(s)) == 1, s
        assert tok.vocab_size == VOCAB
        assert tok.decode(tok.encode("hé <think>x")) == "hé <think>x"
    finally:
        shutil.rmtree(d)
