"""Online re-placement in the runtime: hybrid.load(..., profile=..., online=...).

Checks, on the tiny INT4 checkpoint (2 MoE layers x 64 experts, top-8) with a profile caching
every third expert and a placer told to swap eagerly (a check every token, a horizon so long
that every rate difference pays):
  - numerics: the logits equal the all-CPU run at every step, before and after swaps. Both
    paths are exact fp32 on the same INT4 weights (precise mode, fp32 cache), so the bound is
    the one tests/test_model_cpu_experts.py uses for a static profile, 1e-4;
  - the swaps the runtime makes equal simulate.replay_online on the routing it saw (recorded
    through the planner's own `trace` hook, which online re-placement leaves alone);
  - the number of cached experts per layer never changes, and the CPU skip mask always is
    the cache's own mask (no pair computed twice or dropped);
  - bad options are refused with a message naming them.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

from checkpoints import build  # noqa: E402

EAGER = {"interval": 1, "window": 4.0, "max_swaps": 3, "horizon": 1e9}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import yaml

    from hybrid.planner.cost import reference_workstation
    from hybrid.models.spec import spec_from_config

    tmp = tmp_path_factory.mktemp("online")
    path, _ = build(tmp, variant="int4")
    spec = spec_from_config(json.loads((path / "config.json").read_text()), model_id="tiny")
    prof = {"format": "hybrid-profile/1",
            "model": {"id": "tiny", "config_hash": spec.config_hash, "experts": spec.num_experts},
            "machine": reference_workstation().summary(),
            "budget": {"device_weights": {"bytes": 0}, "kv_cache": {"bytes": 0},
                       "activations": {"bytes": 0}, "cuda_reserve": {"bytes": 0},
                       "experts": {"bytes_per_expert": 1, "format": "bf16"}},
            "online": {"enabled": False},
            "cached": {layer: ",".join(str(e) for e in range(0, 64, 3))
                       for layer in spec.moe_layers}}
    pfile = tmp / "tiny.yaml"
    pfile.write_text(yaml.safe_dump(prof))
    no_machine = dict(prof)
    del no_machine["machine"]
    pfile2 = tmp / "no_machine.yaml"
    pfile2.write_text(yaml.safe_dump(no_machine))
    return path, pfile, pfile2, spec


def _load(path, **kw):
    import hybrid

    return hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, **kw)


def _caches(model):
    return {i: m.device_experts() for i, m in model.moe_layers().items()}


def _prompts(vocab, n, seed):
    # Prompts from disjoint token ranges route differently: the drift the placer follows.
    g = torch.Generator().manual_seed(seed)
    span = vocab // n
    return [torch.randint(k * span, (k + 1) * span, (6,), generator=g).tolist() for k in range(n)]


def test_logits_equal_cpu_only_before_and_after_swaps(ckpt):
    path, pfile, _, _ = ckpt
    base = _load(path)
    online = _load(path, profile=pfile, online=EAGER)
    caches = _caches(online)
    sizes = {i: c.num_cached for i, c in caches.items()}
    worst, swaps_seen = 0.0, []
    for prompt in _prompts(online.config.vocab_size, 4, seed=3):
        # Prefill, then greedy decode; each forward is one step of the placer.
        kv_a, kv_b = base.make_cache(1, 16), online.make_cache(1, 16)
        ids, pos = torch.tensor(prompt), torch.arange(len(prompt))
        for _ in range(5):
            before = online.online_stats()["swaps"]
            want = base.forward(ids, pos, torch.zeros_like(pos), kv_a)
            got = online.forward(ids, pos, torch.zeros_like(pos), kv_b)
            worst = max(worst, float((got - want).abs().max()))
            swaps_seen.append(online.online_stats()["swaps"] - before)
            nxt = int(want[-1].argmax())
            ids, pos = torch.tensor([nxt]), pos[-1:] + 1
        for i, c in caches.items():
            assert c.num_cached == sizes[i]                     # the budget holds
            assert int(c.mask.sum()) == sizes[i]
            assert sorted(np.nonzero(c.mask.numpy())[0].tolist()) == sorted(c.experts)
    print(f"max |logit diff| {worst:.2e}, swaps per step {swaps_seen}")
    assert worst <= 1e-4
    # Swaps happened, and steps after them were still compared.
    assert sum(swaps_seen) > 0 and sum(swaps_seen[:-1]) > 0
    stats = online.online_stats()
    assert stats["swaps"] == sum(swaps_seen) and stats["steps"] == len(swaps_seen)
    assert 0.0 < stats["hit_rate"] < 1.0


def test_runtime_swaps_equal_the_replay(ckpt):
    from hybrid.planner import simulate
    from hybrid.planner.cost import CostModel, MachineSpec
    from hybrid.planner.profile import load as load_profile
    from hybrid.planner.trace import TraceRecorder

    path, pfile, _, spec = ckpt
    policy = {"interval": 2, "window": 8.0, "max_swaps": 2, "horizon": 1e9}
    model = _load(path, profile=pfile, online=policy)
    rec = TraceRecorder.for_spec(spec, keep_sequence=True)
    for m in model.moe_layers().values():
        if m.device_experts() is not None:
            m.add_observer(on_routing=rec.record)   # the planner's hook, beside the online observer
    # One token per step (a 1-token prompt, then decode), as the replay walks the routing;
    # the token jumps across the vocabulary to make the routing drift.
    kv = model.make_cache(1, 48)
    g = torch.Generator().manual_seed(5)
    for t in range(40):
        span = model.config.vocab_size // 4
        tok = int(torch.randint((t // 10) * span, (t // 10 + 1) * span, (1,), generator=g))
        model.forward(torch.tensor([tok]), torch.tensor([t]), torch.tensor([0]), kv)
    trace = rec.to_trace()
    prof = load_profile(str(pfile), model=spec)
    mask = prof.mask(spec.moe_layers)
    cost = CostModel(spec, MachineSpec.from_dict(prof.data["machine"]),
                     gpu_expert_format=prof.gpu_expert_format)
    replay = simulate.replay_online(trace, mask, cost, simulate.OnlinePolicy(**policy))
    live = np.stack([_caches(model)[layer].mask.numpy() for layer in spec.moe_layers])
    stats = model.online_stats()
    assert stats["swaps"] == replay.swaps > 0
    np.testing.assert_array_equal(live, replay.final_mask)
    # Hits the runtime counted equal the replay's (same placement at every token).
    assert stats["hits"] == int(replay.hits_per_layer.sum())
    assert stats["picks"] == trace.tokens * len(spec.moe_layers) * spec.top_k


def test_hit_counter_keeps_working_with_online(ckpt):
    from hybrid.chat.cache_stats import attach_hit_counter, hit_rate

    path, pfile, _, _ = ckpt
    model = _load(path, profile=pfile, online=EAGER)
    counter = attach_hit_counter(model)
    for prompt in _prompts(model.config.vocab_size, 3, seed=8):
        model.logits(prompt)
    stats = model.online_stats()
    assert stats["swaps"] > 0
    # The frontends' counter reads the mask before each layer's CPU submit, as the online
    # observer does: the two counts agree.
    assert (counter.hits, counter.picks) == (stats["hits"], stats["picks"])
    assert hit_rate(model, counter) == pytest.approx(stats["hit_rate"])


def test_off_by_default_and_bad_options(ckpt):
    path, pfile, pfile2, _ = ckpt
    static = _load(path, profile=pfile)
    assert static.online is None and static.online_stats() is None
    assert all(not m._on_routing for m in static.moe_layers().values())
    with pytest.raises(ValueError, match="pass profile="):
        _load(path, online=True)
    with pytest.raises(ValueError, match="unknown policy option.*max_swap\\b"):
        _load(path, profile=pfile, online={"max_swap": 2})
    with pytest.raises(ValueError, match="interval >= 1"):
        _load(path, profile=pfile, online={"interval": 0})
    with pytest.raises(ValueError, match="'machine' section"):
        _load(path, profile=pfile2, online=True)
    with pytest.raises(TypeError, match="online must be"):
        _load(path, profile=pfile, online="yes")


def test_metrics_count_the_swaps(ckpt):
    # /metrics publishes online re-placement's swaps as a counter (hybrid_expert_swaps_total),
    # from the engine's stats; the other backend values stay gauges.
    from hybrid.engine.engine import Engine
    from hybrid.serve.backend import Backend
    from hybrid.serve.metrics import Metrics

    path, pfile, _, _ = ckpt
    model = _load(path, profile=pfile, online=EAGER)
    for prompt in _prompts(model.config.vocab_size, 3, seed=8):
        model.logits(prompt)
    class NoText:  # the engine needs a tokenizer only to decode text; none is asked for here
        vocab_size = model.config.vocab_size
        special_tokens: dict = {}

    engine = Engine(model, tokenizer=NoText(), max_seqs=2, max_context=64)
    try:
        gauges = Backend(engine, engine.tokenizer, 16, 4, Metrics(), model=model).gauges()
        assert gauges["expert_swaps_total"] == model.online_stats()["swaps"] > 0
        text = Metrics().render(gauges)
        assert "# TYPE hybrid_expert_swaps_total counter" in text
        assert f"hybrid_expert_swaps_total {model.online_stats()['swaps']}" in text
        assert "# TYPE hybrid_running gauge" in text
    finally:
        engine.close()
