"""Our Qwen3-MoE model against transformers' Qwen3MoeForCausalLM on tiny checkpoints
(tests/checkpoints_qwen3.py: GQA ratios 4 and 8, 64 and 128 experts, a dense layer, tied and
untied, decoder_sparse_step 2 with attention biases).

fp32: max |logit diff| <= 1e-3 at every position whose routing is not a near-tie (K-th and
(K+1)-th router logits within 1e-3 in some layer; counted and printed), with the routed experts
on the CPU engine (precise mode: fp32 activations; the checkpoint's bf16 experts are held
exactly) and on the torch reference backend; greedy generation equals transformers' generate.
bf16: the tolerance is what bf16 costs transformers itself (see test_bf16_path). Packed expert
formats: the error each format costs. Then the rest of the runtime on a Qwen3 checkpoint:
chunked prefill with decode, the chat template from tokenizer_config.json, `hybrid run` and
`hybrid doctor`.
"""

import copy
import json

import pytest
import torch

from checkpoints_qwen3 import CASES, IM_END, IM_START, build, reference_logits
from test_model_vs_transformers import _compare, _ragged_forward, _report, _within_bf16_cost

T = 24
try:
    import hybrid._native  # noqa: F401

    BACKENDS = ("cpu", "torch")
except ImportError:
    BACKENDS = ("torch",)


def _ids(vocab, n=T, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _load(path, dtype=torch.float32, **kw):
    """-> the built result (network, experts stats) through the runtime's builder, keeping the
    process's threads as they are."""
    from hybrid.runtime.build import build_model

    kw.setdefault("experts_backend", "torch")
    return build_model(path, "cpu", dtype, progress=False, split_threads=False, **kw)


def _prefill(net, ids):
    cache = net.make_cache(2, 64)
    pos = torch.arange(ids.numel())
    return net.forward(ids, pos, torch.ones_like(pos), cache)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_logits_match_transformers(tmp_path, case):
    path, ref = build(tmp_path, case=case)
    ids = _ids(ref.config.vocab_size)
    r, ties = reference_logits(ref, ids)
    for backend in BACKENDS:
        built = _load(path, experts_backend=backend)
        assert len(built.network.moe_layers()) == len(built.config.moe_layers)
        _compare(_prefill(built.network, ids), r, ties, 1e-3, f"{case}/{backend}")


def test_other_seed_and_transformers_spelling(tmp_path):
    """config.json as transformers 5 writes it (num_local_experts, rope_parameters), another
    seed, a single safetensors file."""
    path, ref = build(tmp_path, seed=3, spelling="transformers", shards=1)
    assert "num_local_experts" in json.loads((path / "config.json").read_text())
    net = _load(path).network
    ids = _ids(ref.config.vocab_size, seed=4)
    r, ties = reference_logits(ref, ids)
    _compare(_prefill(net, ids), r, ties, 1e-3, "seed3/transformers-spelling")


def test_yarn_rope_scaling(tmp_path):
    """rope_scaling {rope_type: yarn} as Qwen documents for long context; 40 positions against
    original_max_position_embeddings 16 exercise the interpolated frequencies."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e6}
    path, ref = build(tmp_path, max_position_embeddings=64, rope_parameters=yarn)
    assert json.loads((path / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    built = _load(path)
    assert built.config.rope.rope_type == "yarn"
    ids = _ids(ref.config.vocab_size, 40, seed=2)
    r, ties = reference_logits(ref, ids)
    _compare(_prefill(built.network, ids), r, ties, 1e-3, "yarn-40")


def test_fp8_checkpoint(tmp_path):
    """Block-FP8 projections + weight_scale_inv (as Qwen3-*-FP8 ships): torch experts decode the
    checkpoint exactly (1e-3); the CPU engine keeps FP8 experts as int8 group-32 (reported)."""
    path, ref = build(tmp_path, variant="fp8")
    ids = _ids(ref.config.vocab_size)
    r, ties = reference_logits(ref, ids)
    built = _load(path)
    assert built.config.quant.method == "fp8"
    _compare(_prefill(built.network, ids), r, ties, 1e-3, "fp8/torch")
    if "cpu" in BACKENDS:
        out = _prefill(_load(path, experts_backend="cpu").network, ids)
        err = (out - r).abs().max(-1)[0]
        print(f"fp8->int8/cpu: mean max|diff| {err.mean():.4f} (logit scale {r.abs().max():.2f})")
        assert err.mean() <= 0.02 * r.abs().max()


@pytest.mark.parametrize("case", list(CASES))
def test_facts_count_every_parameter(case):
    """ModelFacts (device groups, always-dense, routers, routed experts, host embedding) add up
    to transformers' parameter count, and the cache facts match the cache."""
    from transformers import Qwen3MoeForCausalLM

    from checkpoints_qwen3 import hf_config
    from hybrid.models.head_kv_cache import HeadKVCache
    from hybrid.models.qwen3_moe import Qwen3Moe
    from hybrid.models.qwen3_moe_config import Qwen3MoeConfig

    hf = hf_config(case)
    raw = dict(json.loads(hf.to_json_string()), model_type="qwen3_moe")
    c = Qwen3MoeConfig.from_dict(raw)
    f = Qwen3Moe.facts(c)
    with torch.device("meta"):
        n_hf = sum(p.numel() for p in Qwen3MoeForCausalLM(hf).parameters())
    device = sum(n for n, _ in f.group_params().values()) + f.always_dense_params + f.router_params
    host = len(f.moe_layers) * f.num_experts * f.expert_params + f.vocab * f.hidden
    tied_copy = f.vocab * f.hidden if f.tie_word_embeddings else 0  # the LM head's device copy of the table
    assert device + host - tied_copy == n_hf
    assert f.kv_bytes_per_token(2) == HeadKVCache.bytes_per_token_for(c, torch.bfloat16)


def test_greedy_generation_matches_transformers(tmp_path):
    """hybrid.load with a tokenizer: generation runs on hybrid.engine with the per-head cache."""
    import hybrid

    path, ref = build(tmp_path, case="e128_gqa8_tied", seed=2)
    model = hybrid.load(path, device="cpu", dtype=torch.float32, experts_backend=BACKENDS[0], progress=False)
    try:
        assert model.tokenizer is not None and model.kv_bytes_per_token() == 3 * 2 * 1 * 16 * 4
        prompt = _ids(model.config.vocab_size, 8, seed=7)
        with torch.no_grad():
            want = ref.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=0)[0, 8:].tolist()
        assert model.generate(prompt.tolist(), 12, stop_at_eos=False) == want
    finally:
        model.close()


@pytest.mark.parametrize("ops", ["torch", "native"])
def test_bf16_path(tmp_path, ops):
    """bf16 everywhere (weights, activations, cache) against transformers fp32, with each op set
    (torch: what a CUDA device runs; native: a bf16 CPU device's). The tolerance is what bf16
    costs a plain PyTorch reference, transformers itself run in bf16: bf16 also flips near-tie
    routing, so the bound is on the mean per-position error, ours <= 2x theirs."""
    if ops == "native":
        pytest.importorskip("hybrid._native", reason="C++ extension not built")
    path, ref = build(tmp_path)
    ids = _ids(ref.config.vocab_size)
    r, _ = reference_logits(ref, ids)
    r16, _ = reference_logits(copy.deepcopy(ref).to(torch.bfloat16), ids)
    out = _prefill(_load(path, torch.bfloat16, experts_backend=BACKENDS[0], device_ops=ops).network, ids)
    _within_bf16_cost(out, r, r16, f"bf16/{ops}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("fmt,rel", [("int4", 0.15), ("int8", 0.02), ("bf16", 1e-3)])
def test_expert_formats(tmp_path, fmt, rel):
    """The checkpoint's bf16 experts packed for the CPU engine: rel is the mean logit error
    allowed as a fraction of the logit scale (int4 group-32: up to 1/15 of a group's range per
    weight; int8: 1/254; bf16: exact, since the checkpoint is bf16)."""
    path, ref = build(tmp_path)
    ids = _ids(ref.config.vocab_size)
    r, _ = reference_logits(ref, ids)
    built = _load(path, experts_backend="cpu", expert_format=fmt)
    assert built.experts.stats["quantised"] == len(built.config.moe_layers)
    err, agree = _report(fmt, _prefill(built.network, ids), r)
    assert err.mean() <= rel * r.abs().max()
    assert agree >= (0.75 if fmt == "int4" else 0.95)


def test_chunked_prefill_and_decode_equal_one_pass(tmp_path):
    """Two sequences in one flat batch, prefilled in chunks, then decoded together (mixed
    prefill/decode steps): every row equals the sequence's own full pass."""
    path, ref = build(tmp_path, case="dense_layer_no_norm")
    net = _load(path).network
    a, b = _ids(ref.config.vocab_size, 20, seed=5), _ids(ref.config.vocab_size, 13, seed=6)
    full_a, full_b = _prefill(net, a), _prefill(net, b)
    plan = [((0, 8), (0, 5)), ((8, 16), (5, 12)), ((16, 17), (12, 13)), ((17, 18), None), ((18, 20), None)]
    out_a, out_b = _ragged_forward(net, net.make_cache(4, 32), a, b, 3, 0, plan)
    assert torch.allclose(out_a, full_a, atol=1e-4)
    assert torch.allclose(out_b, full_b, atol=1e-4)
    idx = torch.tensor([2, 19])
    some = net.forward(a, torch.arange(20), torch.zeros(20, dtype=torch.long), net.make_cache(1, 20), idx)
    assert torch.allclose(some, full_a[idx], atol=1e-5)
    with pytest.raises(IndexError, match=r"positions must be in 0..19"):
        net.forward(a[:2], torch.tensor([19, 20]), torch.zeros(2, dtype=torch.long), net.make_cache(1, 20))


def test_chat_template_from_tokenizer_config(tmp_path):
    """The checkpoint's own Jinja template is used; a chat turn runs through the engine and
    stops at <|im_end|> (tokenizer_config.json eos)."""
    import hybrid
    from hybrid.chat.session import ChatSession, Settings
    from hybrid.engine.engine import Engine

    path, _ = build(tmp_path)
    model = hybrid.load(path, device="cpu", dtype=torch.float32, experts_backend=BACKENDS[0], progress=False)
    try:
        tok = model.tokenizer
        assert tok.has_own_chat_template and tok.eos_id == IM_END and IM_END in tok.stop_token_ids
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(msgs, thinking=False)
        assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
        ids = tok.apply_chat_template(msgs, tokenize=True)
        assert ids[0] == IM_START and ids.count(IM_START) == 3 and tok.decode(ids) == tok.apply_chat_template(msgs)
        engine = Engine(model, tokenizer=tok, max_seqs=1, max_context=128)
        try:
            reply = ChatSession(engine, tok, Settings(temperature=0, max_tokens=6)).ask("hello")
            list(reply)
            assert 1 <= reply.stats.completion_tokens <= 6 and reply.stats.finish_reason in ("stop", "length")
        finally:
            engine.close()
    finally:
        model.close()


def test_cli_run_and_doctor(tmp_path, capsys):
    from hybrid.cli import main as cli_main

    path, _ = build(tmp_path)
    assert cli_main(["run", str(path), "--prompt", "hello there", "-n", "4", "--temperature", "0",
                     "--dtype", "float32", "--experts", BACKENDS[0], "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert "4 generated" in out.err and out.out.strip() != ""
    # the default dtype (bf16) and op set, through the chat template
    assert cli_main(["run", str(path), "--prompt", "hello", "-n", "3", "--chat", "--no-thinking",
                     "--temperature", "0", "--experts", BACKENDS[0]]) == 0
    assert "prompt tokens" in capsys.readouterr().err
    assert cli_main(["doctor", str(path), "--json", "--no-measure"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expect"]["model"]["id"]
    assert report["expect"]["ram"]["needed_bytes"] > 0
