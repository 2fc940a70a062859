"""Loading GGUF files: a tiny deepseek2 GGUF (written by `hybrid convert --to gguf`, metadata and
names as llama.cpp's converter writes them, then rewritten with the gguf package's writer into
the other forms) gives the logits of its safetensors twin (a checkpoint holding exactly the
GGUF's dequantised values, built by tests/gguf_files.py without hybrid's loader).

Tolerances: the reference path (fp32, torch experts) computes the same math on the same values,
so logits agree to fp32 rounding: 2e-5 absolute on logits of size ~3 (the only differences are
summation orders, e.g. kv_b rebuilt from k_b / v_b). The CPU engine packs both sides' experts
with the same quantiser from the same floats, so those agree to the same bound.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import gguf
import numpy as np
import pytest
import torch

import checkpoints
import gguf_files

IDS = torch.tensor([3, 5, 7, 11, 13, 2, 200, 17, 19])
ATOL = 2e-5
T = gguf.GGMLQuantizationType


def _logits(path, **kw):
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("experts_backend", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, net = checkpoints.load_model(path, **kw)
    cache = net.make_cache(1, 32)
    pos = torch.arange(len(IDS))
    return net.forward(IDS, pos, torch.zeros_like(pos), cache)


def _cfg(ref) -> dict:
    return ref.config.to_dict()


@pytest.mark.parametrize("out", ["f32", "f16", "q8_0"])
def test_deepseek2_logits_equal_safetensors_twin(tmp_path, out):
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, out)
    twin = gguf_files.twin(g, ref, _cfg(ref), tmp_path)
    got, want = _logits(g), _logits(twin)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()
    # and the twin is the transformers model with those values (the loader path is checked too)
    ref_logits = checkpoints.reference_logits(ref, IDS)
    ref_logits = ref_logits[0] if isinstance(ref_logits, tuple) else ref_logits
    assert torch.allclose(got, ref_logits.reshape(got.shape).float(), atol=1e-4, rtol=0)


def test_config_from_metadata_equals_config_json(tmp_path):
    from hybrid.models import config_from_dir

    yarn = dict(checkpoints.YARN, mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0)  # not the defaults
    g, ckpt, _ = gguf_files.deepseek2_gguf(tmp_path, "f32", rope_parameters=yarn)
    a, b = dataclasses.asdict(config_from_dir(g)), dataclasses.asdict(config_from_dir(ckpt))
    a.pop("extra"), b.pop("extra")
    # The converter writes no yarn attention_factor / truncate: both default the same way.
    assert a == b
    assert a["rope"]["beta_fast"] == 16.0 and a["rope"]["beta_slow"] == 2.0  # read, not ignored


def test_metadata_as_llamacpps_converter_writes_it(tmp_path):
    """Keys llama.cpp's convert_hf_to_gguf.py writes beside the ones hybrid's converter does (seen
    with gguf's reader on its output for the demo model): the padding id is read, the rest
    (sampling defaults, size label, add_eos) does not disturb the config."""
    from hybrid.models import config_from_dir

    g, ckpt, _ = gguf_files.deepseek2_gguf(tmp_path, "f32")
    V = gguf.GGUFValueType
    made = gguf_files.rewrite(g, tmp_path / "llamacpp-keys.gguf", set_fields={
        "tokenizer.ggml.padding_token_id": (2, V.UINT32), "tokenizer.ggml.add_eos_token": (False, V.BOOL),
        "general.sampling.top_p": (0.95, V.FLOAT32), "general.sampling.temp": (0.6, V.FLOAT32),
        "general.size_label": ("64x3.4M", V.STRING), "general.type": ("model", V.STRING)})
    a, b = dataclasses.asdict(config_from_dir(made)), dataclasses.asdict(config_from_dir(g))
    assert a.pop("pad_token_id") == 2 and b.pop("pad_token_id") is None
    assert a == b


def test_yarn_logits(tmp_path):
    yarn = dict(checkpoints.YARN, mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0)
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", rope_parameters=yarn)
    twin = gguf_files.twin(g, ref, _cfg(ref), tmp_path)
    assert torch.allclose(_logits(g), _logits(twin), atol=ATOL, rtol=0)


def test_kv_b_form(tmp_path):
    """The older converter's MLA form: attn_kv_b and per-head key/value lengths, no *_mla keys."""
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32")
    c = _cfg(ref)
    V = gguf.GGUFValueType.UINT32
    old = gguf_files.rewrite(
        g, tmp_path / "kvb.gguf", drop=("deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"),
        set_fields={"deepseek2.attention.key_length": (c["qk_nope_head_dim"] + c["qk_rope_head_dim"], V),
                    "deepseek2.attention.value_length": (c["v_head_dim"], V)},
        tensors=lambda items: gguf_files.kv_b_form(items, c))
    assert "blk.0.attn_kv_b.weight" in gguf_files.read_values(old)
    assert torch.allclose(_logits(old), _logits(g), atol=ATOL, rtol=0)


def _mixed_types(items):
    """Experts of layer 1 in Q8_0, layer 2 in F16 (as the "UD" files mix types per layer)."""
    out = []
    for n, t, ty in items:
        if "_exps." in n:
            ty = T.Q8_0 if n.startswith("blk.1.") else T.F16
        out.append((n, t, ty))
    return out


def test_mixed_expert_types_split_in_two_files(tmp_path):
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32")
    first = gguf_files.rewrite(g, tmp_path / "mixed.gguf", tensors=_mixed_types, split_max_tensors=30)
    first = tmp_path / "mixed-00001-of-00002.gguf"
    assert first.is_file() and (tmp_path / "mixed-00002-of-00002.gguf").is_file()
    from hybrid.loaders.gguf_file import GGUFFile

    f = GGUFFile(first)
    assert {f.info("blk.1.ffn_up_exps.weight").type_name, f.info("blk.2.ffn_up_exps.weight").type_name} == {"Q8_0", "F16"}
    assert len({t.file for t in f.tensors.values()}) == 2
    twin = gguf_files.twin(first, ref, _cfg(ref), tmp_path)
    assert torch.allclose(_logits(first), _logits(twin), atol=ATOL, rtol=0)


def test_cpu_engine_fallback_packs_as_the_twin(tmp_path):
    """expert_format="int8" re-packs even experts with a native kernel (Q8_0 here): the result
    equals the twin packed int8 from the same floats."""
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    twin = gguf_files.twin(g, ref, _cfg(ref), tmp_path)
    got = _logits(g, experts_backend="cpu", expert_format="int8")
    want = _logits(twin, experts_backend="cpu", expert_format="int8")
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def test_qwen3moe_logits(tmp_path):
    g, ckpt, ref = gguf_files.qwen3moe_gguf(tmp_path)
    from hybrid.models import config_from_dir

    a, b = dataclasses.asdict(config_from_dir(g)), dataclasses.asdict(config_from_dir(ckpt))
    a.pop("extra"), b.pop("extra")
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert set(diff) <= {"bos_token_id", "eos_token_id"}, diff  # the test GGUF writes no token ids
    assert torch.allclose(_logits(g), _logits(ckpt), atol=ATOL, rtol=0)


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    from hybrid.tokenizer import load_tokenizer
    from hybrid.tokenizer_gguf import gguf_tokenizer

    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    g, ckpt, _ = gguf_files.deepseek2_gguf(tmp_path, "f32", template=template)
    got, want = gguf_tokenizer(g), load_tokenizer(ckpt)
    for text in ["the quick brown fox", "hello there, lazy dog! 123", "zebra ünïcode 🦙 </s> x<|im_end|>"]:
        assert got.encode(text) == want.encode(text)
        assert got.decode(got.encode(text)) == text
    assert (got.bos_id, got.eos_id) == (0, 1)
    assert got.special_tokens == {"<s>": 0, "</s>": 1, "<|im_end|>": 2}
    assert 2 in got.stop_token_ids  # <|im_end|> ends a turn
    assert got.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_hybrid_load_and_generate(tmp_path):
    import hybrid

    g, ckpt, _ = gguf_files.deepseek2_gguf(tmp_path, "f32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hybrid.load(g, device="cpu", dtype="fp32", experts_backend="torch", progress=False, max_len=64)
        t = hybrid.load(ckpt, device="cpu", dtype="fp32", experts_backend="torch", progress=False, max_len=64)
    ids = m.tokenizer.encode("hello there")
    assert ids == t.tokenizer.encode("hello there")
    assert m.generate(ids, 8, stop_at_eos=False) == t.generate(ids, 8, stop_at_eos=False)
    m.close(), t.close()


def test_hybrid_load_parses_the_metadata_once(tmp_path, monkeypatch):
    """Config, weights and tokenizer read one parsed file (K2.5's token arrays take a while)."""
    import hybrid
    from hybrid.loaders import gguf_file

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f32")
    opened = []
    real = gguf_file._OneFile.__init__

    def counted(self, path):
        opened.append(path)
        real(self, path)

    monkeypatch.setattr(gguf_file._OneFile, "__init__", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hybrid.load(g, device="cpu", dtype="fp32", experts_backend="torch", progress=False, max_len=64)
    assert opened == [g]
    assert m.tokenizer.encode("hello") and m.config.num_hidden_layers == 3
    m.close()


def _held(path) -> tuple[int, int]:
    """(mappings, open file descriptors) of `path` in this process."""
    import os

    real = os.path.realpath(path)
    maps = sum(line.rstrip().endswith(" " + real) for line in open("/proc/self/maps"))
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.path.realpath(f"/proc/self/fd/{fd}") == real
        except OSError:  # the descriptor listdir itself used
            pass
    return maps, fds


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_closed_model_leaves_the_file_unmapped(tmp_path, backend):
    """hybrid.load closes the GGUF it read (config, weights, tokenizer): a loaded model, a closed
    one and a failed load (its traceback still held) keep no mapping or descriptor of it."""
    import hybrid
    from hybrid import native

    if backend == "cpu" and not native.available():
        pytest.skip("hybrid._native is not built")
    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    kw = dict(device="cpu", dtype="fp32", experts_backend=backend, progress=False, max_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hybrid.load(g, **kw)
        assert m.generate(m.tokenizer.encode("hello"), 3, stop_at_eos=False)
        assert _held(g) == (0, 0)
        m.close()
        assert _held(g) == (0, 0)
        with pytest.raises(MemoryError) as failed:
            hybrid.load(g, max_vram=1, **kw)
    assert failed.traceback and _held(g) == (0, 0)


def test_gguf_names_cover_every_tensor(tmp_path):
    """Every tensor of the converter's file is one the source maps to (nothing ignored silently)."""
    from hybrid.loaders.gguf_source import EXPERT_PROJS, LAYER, MLA_SPLIT, TOP

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f32")
    known = {*TOP.values(), *LAYER.values(), *EXPERT_PROJS.values(), *MLA_SPLIT, "exp_probs_b"}
    for name in gguf_files.read_values(g):
        base = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        assert base in known, name


def test_raw_blocks_are_views_of_the_mapping(tmp_path):
    from hybrid.loaders.gguf_file import GGUFFile

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    f = GGUFFile(g)
    t = f.info("blk.1.ffn_gate_exps.weight")
    raw = f.raw(t.name)
    assert raw.shape == (t.shape[0], t.shape[1], t.shape[2] // 32 * 34) and not raw.flags.owndata
    one = f.values(t.name, 3, 1)[0]
    assert np.array_equal(one, gguf.quants.dequantize(raw[3], T.Q8_0))


def test_doctor_describes_the_file(tmp_path):
    import argparse

    from hybrid.commands import doctor
    from hybrid.loaders.gguf_file import GGUFFile

    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    args = argparse.Namespace(model=str(g), json=True, no_measure=True, trace=None, context="4k", machine=None)
    r = doctor.collect(args)
    d = r["gguf"]
    c = _cfg(ref)
    E, H, I = c["n_routed_experts"], c["hidden_size"], c["moe_intermediate_size"]
    assert d["architecture"] == "deepseek2" and d["model_type"] == "deepseek_v3"
    assert d["routed_expert_types"] == {"Q8_0": {"tensors": 6, "bytes": 2 * E * 3 * I * H // 32 * 34}}
    assert d["file_bytes"] == g.stat().st_size
    held = "native" if "Q8_0" in d["native_types"] else "int8"
    assert [x["held_as"] for x in d["expert_layers"]] == [held, held]
    assert r["expect"]["ram"]["parts"]["routed_experts"] == d["routed_ram_bytes"]
    assert r["expect"]["model"]["id"] == g.name
    # Device matrices in blocks: Q8_0 ones at their file bytes, kv_b (always dense) at bf16; on a
    # machine without a GPU the RAM counts them so, and the speed table leads with them.
    # This file: Q8_0 matrices whose rows fit (all 2-D ones here, the LM head output.weight too),
    # q_b in F16 and the split kv_b (k_b F16, v_b Q8_0) dense.
    ts = GGUFFile(g).tensors
    q8 = sum(t.nbytes for n, t in ts.items() if t.type_name == "Q8_0" and len(t.shape) == 2
             and "_exps." not in n and not n.startswith("token_embd."))
    dense = sum(t.numel * 2 for n, t in ts.items() if ".attn_q_b." in n or ".attn_k_b." in n or ".attn_v_b." in n)
    assert d["blocks_bytes"] == q8 + dense
    if not r["machine"].get("gpus"):
        assert r["expect"]["ram"]["parts"]["device_weights"] == d["blocks_bytes"]
        rows = r["expect"]["device_weights"]
        assert list(rows) == ["blocks", "bf16", "int8"]
        assert rows["blocks"]["device_weights_bytes"] == d["blocks_bytes"]
        assert rows["blocks"]["no_cache"]["decode_tok_s"] > rows["bf16"]["no_cache"]["decode_tok_s"]


def test_serve_a_gguf_file(tmp_path):
    """`hybrid serve FILE.gguf` as a user starts it: model id from the file name, tokenizer and chat
    template from the metadata."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from test_serve_support import free_port

    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f32", template=template)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    err = open(tmp_path / "serve.err", "w")  # a file, not a pipe nobody reads while it starts
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", "serve", str(g), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a shared, loaded machine starts slowly (imports, load)
        while True:
            assert proc.poll() is None, (tmp_path / "serve.err").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up: " + (tmp_path / "serve.err").read_text()
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny-f32"
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-f32", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(gguf_files_tokens(g, "<s>hello there</s>"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def gguf_files_tokens(g, text):
    from hybrid.tokenizer_gguf import gguf_tokenizer

    return gguf_tokenizer(g).encode(text)


SMALL_K = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, n_routed_experts=8,
               num_experts_per_tok=2, q_lora_rank=64, kv_lora_rank=64)  # rows of 256: K-quant blocks fit


def _experts_as(layer_types: dict[int, tuple[str, str, str]], other: str | None = None):
    """Routed experts as random valid blocks of the given types per layer (gate, up, down); with
    `other`, every non-expert matrix whose rows fit its block quantised to it (llama.cpp's
    fallback types for short rows)."""
    def edit(items):
        out = []
        for n, t, ty in items:
            layer = int(n.split(".")[1]) if n.startswith("blk.") else None
            proj = next((p for p in ("gate", "up", "down") if f".ffn_{p}_exps." in n), None)
            if proj is not None and layer in layer_types:
                name = layer_types[layer][("gate", "up", "down").index(proj)]
                fan_in = t.shape[-1]
                t = gguf_files.random_blocks(name, tuple(t.shape), fan_in ** -0.5, seed=zlib.crc32(n.encode()))
                ty = T[name]
            elif other is not None and t.dim() == 2 and "_exps" not in n and "ffn_gate_inp" not in n \
                    and t.shape[-1] % gguf.GGML_QUANT_SIZES[T[other]][0] == 0:
                ty = T[other]
            out.append((n, t, ty))
        return out
    return edit


@pytest.mark.parametrize("types, other", [
    ({1: ("Q4_K", "Q4_K", "Q6_K"), 2: ("Q2_K", "Q3_K", "Q5_K")}, "Q4_1"),
    ({1: ("IQ4_XS", "IQ4_XS", "IQ4_XS"), 2: ("IQ2_XXS", "IQ2_XS", "IQ3_XXS")}, "Q5_0"),
    ({1: ("IQ1_S", "IQ1_S", "IQ2_S"), 2: ("IQ3_S", "IQ3_S", "Q4_K")}, "Q5_1"),
])
def test_kquant_and_iq_experts_equal_twin(tmp_path, types, other):
    """A file mixing K-quant / IQ types per tensor and per layer (as the "UD" files do), with
    non-expert tensors in Q4_1 / Q5_0 / Q5_1 where their rows fit: the reference path computes
    with exactly the blocks' values."""
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    mixed = gguf_files.rewrite(g, tmp_path / "mixed.gguf", tensors=_experts_as(types, other))
    from hybrid.loaders.gguf_file import GGUFFile

    f = GGUFFile(mixed)
    for layer, names in types.items():
        got_types = [f.info(f"blk.{layer}.ffn_{p}_exps.weight").type_name for p in ("gate", "up", "down")]
        assert got_types == list(names)
    assert f.info("blk.0.attn_q_a.weight").type_name == other
    twin = gguf_files.twin(mixed, ref, _cfg(ref), tmp_path)
    got, want = _logits(mixed), _logits(twin)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def test_gate_and_up_of_two_types_run_in_their_own_bits(tmp_path):
    """A layer whose gate and up differ in type (a per-tensor mix) stays in its blocks on the CPU
    engine, gate and up as two kernel calls; fp32 activations: the twin's logits to fp32
    accumulation order (1e-4 on logits ~3)."""
    from hybrid.runtime.build import build_model
    from hybrid.runtime.gguf_experts import held_as, native_types

    types = {1: ("Q4_K", "Q5_K", "Q6_K"), 2: ("Q2_K", "IQ4_XS", "Q8_0")}
    if not all(set(t) <= native_types() for t in types.values()):
        pytest.skip("this build lacks a native kernel for one of the types")
    assert all(held_as(t, native_types()) == "native" for t in types.values())
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    mixed = gguf_files.rewrite(g, tmp_path / "split.gguf", tensors=_experts_as(types))
    built = build_model(mixed, "cpu", torch.float32, experts_backend="cpu", progress=False, split_threads=False)
    assert built.stats()["experts"]["gguf_native"] == 2
    layer = next(iter(built.network.moe_layers().values())).host_experts().layer
    assert (layer.format, layer.up_format, layer.down_format) == ("q4_k", "q5_k", "q6_k")
    twin = gguf_files.twin(mixed, ref, _cfg(ref), tmp_path)
    got = _logits(mixed, experts_backend="cpu", mode="precise")
    want = _logits(twin)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_fallback_on_cpu_engine_equals_twin_packed_int4(tmp_path):
    """Types without a native kernel (IQ2_S, IQ3_S) are dequantised and packed int4, as the twin
    packed int4 from the same floats."""
    from hybrid.runtime.gguf_experts import native_types

    assert not native_types() & {"IQ2_S", "IQ3_S"}
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    mixed = gguf_files.rewrite(g, tmp_path / "k.gguf", tensors=_experts_as({1: ("IQ2_S",) * 3, 2: ("IQ3_S",) * 3}))
    twin = gguf_files.twin(mixed, ref, _cfg(ref), tmp_path)
    got = _logits(mixed, experts_backend="cpu")
    want = _logits(twin, experts_backend="cpu", expert_format="int4")
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def test_packed_cache_next_to_the_file(tmp_path):
    """A re-packed layer is saved beside the GGUF and mmapped the next time; same logits."""
    from hybrid.runtime.build import build_model

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f16")  # F16 experts: re-packed as bf16

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_model(g, "cpu", torch.float32, experts_backend="cpu", packed_cache=True, progress=False,
                               split_threads=False)

    def logits(net):
        cache = net.make_cache(1, 32)
        pos = torch.arange(len(IDS))
        return net.forward(IDS, pos, torch.zeros_like(pos), cache)

    first = build()
    a = logits(first.network)
    cached = sorted((g.parent / ".hybrid-cache").glob("tiny-f16.layer*.bf16.*.packed"))
    assert len(cached) == 2 and first.stats()["experts"]["quantised"] == 2
    second = build()
    assert second.stats()["experts"]["from_cache"] == 2
    assert torch.equal(logits(second.network), a)


def test_embedding_read_in_row_chunks(tmp_path, monkeypatch):
    from hybrid.loaders import gguf_source
    from hybrid.loaders.gguf_file import GGUFFile
    from hybrid.models import config_from_dir

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    monkeypatch.setattr(gguf_source, "EMBED_CHUNK", 64 * 7)  # 7 rows a chunk: 320 = 45 * 7 + 5
    src = gguf_source.GGUFSource(config_from_dir(g), GGUFFile(g), "cpu", torch.float32)
    table = src.embedding("model.embed_tokens.weight", (320, 64))
    assert torch.equal(table, gguf_files.read_values(g)["token_embd.weight"])


def test_kimi_tiktoken_vocabulary(tmp_path):
    """Pre-tokenizer kimi-k2: tiktoken with Kimi's regex over the GGUF's byte tokens, ranks = ids."""
    import json

    from hybrid.convert.gguf_export import convert_to_gguf
    from hybrid.tokenizer import load_tokenizer, write_tiktoken_ranks
    from hybrid.tokenizer_gguf import gguf_tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"  ": 258, b"\xc3\xa9": 259, b"th": 260, b"the": 261})
    n_base = len(ranks)
    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=n_base + 256)
    write_tiktoken_ranks(ranks, path / "tiktoken.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "[BOS]", "eos_token": "[EOS]",
        "added_tokens_decoder": {str(n_base): {"content": "[BOS]", "special": True},
                                 str(n_base + 1): {"content": "[EOS]", "special": True},
                                 str(n_base + 2): {"content": "<|im_end|>", "special": True}}}))
    g = tmp_path / "kimi.gguf"
    convert_to_gguf(path, g, "f32", progress=False)
    got, want = gguf_tokenizer(g), load_tokenizer(path)
    assert got.backend == "tiktoken"
    for text in ["abc the theme  é", "Hello 世界 123456 <|im_end|>[EOS]"]:
        assert got.encode(text) == want.encode(text)
        assert got.decode(got.encode(text)) == text
    assert (got.bos_id, got.eos_id) == (n_base, n_base + 1) and n_base + 2 in got.stop_token_ids


def test_native_gguf_experts_equal_twin(tmp_path):
    """Q8_0 experts in their own blocks on the CPU engine (when the kernels run Q8_0), fp32
    activations (mode precise): the weights are exact, so the logits match the twin's reference
    path to fp32 accumulation order (1e-4 on logits ~3)."""
    from hybrid.runtime.build import build_model
    from hybrid.runtime.gguf_experts import native_types

    if "Q8_0" not in native_types():
        pytest.skip("the CPU engine has no native Q8_0 kernel in this build")
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    twin = gguf_files.twin(g, ref, _cfg(ref), tmp_path)
    built = build_model(g, "cpu", torch.float32, experts_backend="cpu", progress=False, split_threads=False)
    assert built.stats()["experts"]["gguf_native"] == 2
    got = _logits(g, experts_backend="cpu")
    want = _logits(twin)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_device_weights_int8_from_gguf_equal_twin(tmp_path):
    """Non-expert GGUF tensors dequantised once, then to the device format asked for (int8 per row
    here): the same as the twin's floats converted the same way."""
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    twin = gguf_files.twin(g, ref, _cfg(ref), tmp_path)
    fmts = {k: "int8" for k in ("attention", "shared", "dense", "lm_head")}
    got, want = _logits(g, device_formats=fmts), _logits(twin, device_formats=fmts)
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def _linears(net):
    """Every device linear op of a built network (attributes holding a hybrid.ops Linear)."""
    from hybrid.ops.linear import Linear

    seen, out, stack = set(), [], [net]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (torch.Tensor, str, int, float)) or o is None:
            continue
        seen.add(id(o))
        if isinstance(o, Linear):
            out.append(o)
            continue
        items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else \
            vars(o).values() if hasattr(o, "__dict__") and type(o).__module__.startswith("hybrid") else ()
        stack.extend(items)
    return out


def _int8_rounded_reference(self, x):
    """PackedLinear's math in torch: x rounded to int8 per 32 inputs (the kernels' own quantiser),
    times the blocks' exact values in float64, one rounding to bf16."""
    from hybrid import _native_testing as NT

    xq, xs, _ = NT.kernel_quantize_row_a8("scalar", x.float().numpy())
    xd = torch.from_numpy(xq.astype(np.float64) * np.repeat(xs, 32, axis=1))
    return (xd @ self.dense(torch.float32).double().T).to(torch.bfloat16)


def test_device_weights_blocks_keep_the_files_blocks(tmp_path, monkeypatch):
    """device_weights="blocks" on a CPU device: every non-expert matrix whose type has a kernel
    runs in its own GGUF blocks (PackedLinear, repacked losslessly: its values are the file's),
    the others dense. Its logits are those of the same network with each such linear computed in
    torch from int8-rounded activations (the rounding llama.cpp's Q8 activations also make) to
    bf16 output rounding; against the dense bf16 load they differ by that rounding (0.7 here on
    logits ~3, where bf16 alone moves 0.2), top-1 mostly the same."""
    from hybrid.models.facts import GROUPS
    from hybrid.ops.linear import PackedLinear

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    fmts = {k: "blocks" for k in GROUPS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, net = checkpoints.load_model(g, dtype=torch.bfloat16, experts_backend="torch", device_formats=fmts)
    packed = [lin for lin in _linears(net) if isinstance(lin, PackedLinear)]
    assert packed and {p.packed.format for p in packed} == {"q8_0"}
    assert {p.name.rsplit(".", 1)[-1] for p in packed} >= {"q_a_proj", "o_proj", "down_proj", "lm_head"}
    values = gguf_files.read_values(g)
    for p in packed:
        assert torch.equal(p.dense(torch.float32), values[gguf_source_name(p.name)]), p.name
    assert sum(p.nbytes for p in packed) < sum(p.packed.shape[0] * p.packed.shape[1] * 2 for p in packed) / 1.8
    empty = packed[0](torch.empty(0, packed[0].packed.shape[1], dtype=torch.bfloat16))
    assert empty.shape == (0, packed[0].out_features)
    with pytest.raises(TypeError, match="bf16 activations"):
        packed[0](torch.zeros(1, packed[0].packed.shape[1]))
    cache = net.make_cache(1, 32)
    pos = torch.arange(len(IDS))
    got = net.forward(IDS, pos, torch.zeros_like(pos), cache).float()
    monkeypatch.setattr(PackedLinear, "__call__", _int8_rounded_reference)
    want = _logits(g, dtype=torch.bfloat16, device_formats=fmts).float()
    assert torch.allclose(got, want, atol=0.02, rtol=0), (got - want).abs().max()
    dense = _logits(g, dtype=torch.bfloat16).float()
    assert (got.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.75


def gguf_source_name(name: str) -> str:
    from hybrid.loaders.gguf_source import gguf_name

    return gguf_name(name + ".weight")


def test_device_weights_blocks_refused_where_they_cannot_run(tmp_path):
    from hybrid.models.facts import GROUPS

    g, path, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    fmts = {k: "blocks" for k in GROUPS}
    with pytest.raises(ValueError, match="bf16 activations"):
        checkpoints.load_model(g, dtype=torch.float32, experts_backend="torch", device_formats=fmts)
    with pytest.raises(ValueError, match="not a GGUF file"):
        checkpoints.load_model(path, dtype=torch.bfloat16, experts_backend="torch", device_formats=fmts)


def test_device_weights_blocks_under_torch_ops_are_their_dense_values(tmp_path):
    """The torch op set (HYBRID_DEVICE_OPS=torch, and what a CUDA device would run) has no kernel
    for blocks: it holds their values dense, so its logits are the dense load's exactly."""
    from hybrid.models.facts import GROUPS
    from hybrid.ops.linear import PackedLinear

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    fmts = {k: "blocks" for k in GROUPS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, net = checkpoints.load_model(g, dtype=torch.bfloat16, experts_backend="torch", device_formats=fmts,
                                        device_ops="torch")
    assert not any(isinstance(lin, PackedLinear) for lin in _linears(net))
    got = _logits(g, dtype=torch.bfloat16, device_formats=fmts, device_ops="torch")
    want = _logits(g, dtype=torch.bfloat16, device_ops="torch")
    assert torch.equal(got, want)


def test_gguf_on_a_cpu_device_defaults_to_its_blocks(tmp_path):
    """hybrid.load of a GGUF on a CPU device (bf16, native ops) keeps its non-expert tensors in
    their blocks unless told otherwise; device_weights="bf16" keeps them dense; fp32 (the
    reference path) is dense."""
    import hybrid
    from hybrid.models.facts import GROUPS
    from hybrid.ops.linear import PackedLinear

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = hybrid.load(g, device="cpu", experts_backend="torch", progress=False, max_len=64)
        d = hybrid.load(g, device="cpu", experts_backend="torch", progress=False, max_len=64, device_weights="bf16")
        f = hybrid.load(g, device="cpu", dtype="fp32", experts_backend="torch", progress=False, max_len=64)
    if m.stats()["ops"] == "native":
        assert m.stats()["device_weights"] == {k: "blocks" for k in GROUPS}
        assert any(isinstance(lin, PackedLinear) for lin in _linears(m.network))
    assert not any(isinstance(lin, PackedLinear) for lin in _linears(d.network))
    assert not any(isinstance(lin, PackedLinear) for lin in _linears(f.network))
    ids = m.tokenizer.encode("hello there")
    assert len(m.generate(ids, 4, stop_at_eos=False)) == 4
    m.close(), d.close(), f.close()


def test_doctor_measures_the_files_own_expert_type(tmp_path):
    """The doctor's expert-kernel probe runs on blocks of the file's main routed type when the
    kernels run it (the lattice types decode at their own, compute-bound rate), else on INT4."""
    from hybrid.commands import doctor
    from hybrid.runtime.measure import measure_expert_kernel_gbps

    from hybrid.runtime.gguf_experts import describe_gguf

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "q8_0")
    f, _, _ = gguf_files.deepseek2_gguf(tmp_path / "f", "f32")
    assert doctor._main_expert_type(describe_gguf(g)) == "q8_0"
    assert doctor._main_expert_type(describe_gguf(f)) is None
    assert doctor._main_expert_type(None) is None
    r = measure_expert_kernel_gbps(0.05, experts=2, hidden=256, intermediate=256, gguf_type="iq2_xxs")
    assert r["format"] == "iq2_xxs" and r["gbps"] > 0 and r["runs"] >= 5
    with pytest.raises(ValueError, match="not a type the kernels run"):
        measure_expert_kernel_gbps(0.05, experts=2, hidden=256, intermediate=256, gguf_type="q5_0")


@pytest.mark.parametrize("other", ["Q4_K", "Q6_K", "IQ4_XS", "Q4_0"])
def test_device_weights_blocks_of_k_types(tmp_path, monkeypatch, other):
    """Non-expert matrices in K-quant types (as a Q4_K_M file has them), experts in K types too:
    the matrices whose inputs fit the type's 256-value blocks run in their blocks, the others
    (short rows: none here but kv_b) dense; logits as the torch computation of the same
    int8-rounded activations."""
    from hybrid.ops.linear import PackedLinear

    experts = _experts_as({1: ("Q4_K", "Q4_K", "Q6_K"), 2: ("Q2_K", "Q3_K", "Q5_K")})

    def edit(items):  # gguf cannot quantise to K types: random blocks of `other` for the matrices
        out = []
        for n, t, ty in experts(items):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and "_exps" not in n and "ffn_gate_inp" not in n \
                    and t.shape[-1] % gguf.GGML_QUANT_SIZES[T[other]][0] == 0 and n != "token_embd.weight":
                t, ty = gguf_files.random_blocks(other, tuple(t.shape), t.shape[-1] ** -0.5,
                                                 seed=zlib.crc32(n.encode())), T[other]
            out.append((n, t, ty))
        return out

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    mixed = gguf_files.rewrite(g, tmp_path / "k.gguf", tensors=edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, net = checkpoints.load_model(mixed, dtype=torch.bfloat16, experts_backend="torch")
    packed = [lin for lin in _linears(net) if isinstance(lin, PackedLinear)]
    assert packed and {p.packed.format for p in packed} == {other.lower()}
    cache = net.make_cache(1, 32)
    pos = torch.arange(len(IDS))
    got = net.forward(IDS, pos, torch.zeros_like(pos), cache).float()
    monkeypatch.setattr(PackedLinear, "__call__", _int8_rounded_reference)
    want = _logits(mixed, dtype=torch.bfloat16).float()
    # the kernel's fp32 sums and the reference's float64 ones may round a bf16 output apart: a
    # unit in its last place (2^-7 relative) or two, carried through the layers (logits ~15 here)
    assert torch.allclose(got, want, atol=0.02, rtol=2**-6), (got - want).abs().max()
