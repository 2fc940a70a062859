"""Simulator: hit counts equal direct counting; replayed time equals a plain Python replay;
the online policy keeps the budget and beats a static placement when routing drifts."""

import numpy as np
import pytest

from hybrid.planner import simulate
from hybrid.planner.cost import CostModel, reference_workstation
from hybrid.models.spec import spec_from_config
from hybrid.planner.plan import place_optimal
from hybrid.planner.synthetic import make_trace
from hybrid.planner.units import parse_bytes

SMALL = {"hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
         "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1,
         "num_hidden_layers": 5, "first_k_dense_replace": 1, "q_lora_rank": 1536,
         "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
         "v_head_dim": 128, "num_attention_heads": 64, "vocab_size": 163840}


@pytest.fixture(scope="module")
def setup():
    spec = spec_from_config(SMALL, "small-k2.5-shaped")
    cm = CostModel(spec, reference_workstation(parse_bytes("80GiB")))
    return spec, cm


def test_hits_equal_direct_counting(setup):
    spec, cm = setup
    tr = make_trace(spec, 3000, zipf_first=0.8, zipf_last=1.2, seed=3)
    rng = np.random.default_rng(0)
    mask = rng.random((tr.num_layers, tr.num_experts)) < 0.3
    res = simulate.replay(tr, mask, cm)
    direct = np.array([mask[l][tr.seq[:, l, :]].sum() for l in range(tr.num_layers)])
    np.testing.assert_array_equal(res.hits_per_layer, direct)
    assert res.hit_rate == pytest.approx(direct.sum() / (3000 * tr.num_layers * tr.top_k))


def test_replayed_time_equals_python_loop(setup):
    spec, cm = setup
    tr = make_trace(spec, 200, seed=4)
    mask = np.zeros((tr.num_layers, tr.num_experts), dtype=bool)
    mask[:, :5] = True
    res = simulate.replay(tr, mask, cm)
    lc = cm.costs(tr.frequencies(), 1)
    cpu_pick = cm.cpu_expert_bytes / (cm.machine.cpu_effective_gbps * 1e9)
    gpu_pick = cm.gpu_expert_bytes / (cm.machine.gpu_mem_gbps * 1e9)
    total = 0.0
    for t in range(tr.tokens):
        total += lc.other
        for l in range(tr.num_layers):
            h = int(mask[l][tr.seq[t, l]].sum())
            total += lc.serial[l] + lc.sync + max(lc.cpu_fix[l] + (tr.top_k - h) * cpu_pick,
                                                  lc.gpu_fix[l] + h * gpu_pick)
    assert res.seconds == pytest.approx(total, rel=1e-9)
    assert res.decode_tok_s == pytest.approx(tr.tokens / total, rel=1e-9)


def test_replay_agrees_with_cost_model_when_cpu_bound(setup):
    # With few cached experts every token is CPU-bound, so mean of max == max of means.
    spec, cm = setup
    tr = make_trace(spec, 4000, seed=5)
    lc = cm.costs(tr.frequencies(), 1)
    mask = place_optimal(lc, 8)
    res = simulate.replay(tr, mask, cm)
    assert res.decode_tok_s == pytest.approx(cm.decode_tok_s(tr.frequencies(), mask), rel=0.02)


def test_online_keeps_budget_and_wins_under_drift(setup):
    spec, cm = setup
    tr = make_trace(spec, 20000, zipf_first=1.2, zipf_last=1.2, drift_every=2000,
                    drift_fraction=0.5, seed=6)
    warm = tr.slice_tokens(0, 2000)                  # plan from the first 2000 tokens only
    mask = place_optimal(cm.costs(warm.frequencies(), 1), 40)
    static = simulate.replay(tr, mask, cm)
    online = simulate.replay_online(tr, mask, cm, prior=warm.frequencies())
    np.testing.assert_array_equal(online.final_mask.sum(axis=1), mask.sum(axis=1))
    assert online.swaps > 0
    assert online.hit_rate > static.hit_rate
    assert online.decode_tok_s > static.decode_tok_s


def test_online_does_not_churn_without_drift(setup):
    spec, cm = setup
    tr = make_trace(spec, 20000, zipf_first=1.0, zipf_last=1.0, seed=7)
    mask = place_optimal(cm.costs(tr.frequencies(), 1), 40)
    static = simulate.replay(tr, mask, cm)
    online = simulate.replay_online(tr, mask, cm, prior=tr.frequencies())
    assert online.decode_tok_s >= 0.99 * static.decode_tok_s


def test_counts_only_trace_is_refused(setup):
    spec, cm = setup
    tr = make_trace(spec, 100, keep_sequence=False)
    with pytest.raises(ValueError, match="no token sequence"):
        simulate.replay(tr, np.zeros((tr.num_layers, tr.num_experts), bool), cm)


def test_no_gpu_replay_equals_cost_model_exactly(setup):
    # Without a GPU the parts add up, which is linear in the picks: the replay's mean time per
    # token must equal the cost model's expected time on the same trace.
    import dataclasses

    spec, cm = setup
    cpu_only = CostModel(spec, dataclasses.replace(cm.machine, gpu_present=False))
    tr = make_trace(spec, 500, seed=8)
    mask = np.zeros((tr.num_layers, tr.num_experts), dtype=bool)
    mask[:, ::3] = True
    res = simulate.replay(tr, mask, cpu_only)
    assert res.decode_tok_s == pytest.approx(cpu_only.decode_tok_s(tr.frequencies(), mask),
                                             rel=1e-9)


def test_runtime_placer_makes_the_replays_decisions(setup):
    # OnlinePlacer, fed token by token as a runtime would, ends with the same cache and the same
    # number of swaps as the replay of the same policy.
    from hybrid.planner.online import OnlinePlacer

    spec, cm = setup
    tr = make_trace(spec, 3000, zipf_first=1.2, zipf_last=1.2, drift_every=500,
                    drift_fraction=0.5, seed=9)
    mask = place_optimal(cm.costs(tr.slice_tokens(0, 500).frequencies(), 1), 40)
    pol = simulate.OnlinePolicy(interval=16, window=128.0, max_swaps=2, horizon=256.0)
    replay = simulate.replay_online(tr, mask, cm, pol)
    placer = OnlinePlacer(cm, mask, spec.moe_layers, pol)
    live = mask.copy()
    for t in range(tr.tokens):
        for i, layer in enumerate(spec.moe_layers):
            placer.observe(layer, tr.seq[t:t + 1, i, :])
        for layer, out_e, in_e in placer.end_step():
            i = spec.moe_layers.index(layer)
            assert live[i, out_e] and not live[i, in_e]
            live[i, out_e], live[i, in_e] = False, True
    assert placer.swaps == replay.swaps > 0
    np.testing.assert_array_equal(live, replay.final_mask)
    np.testing.assert_array_equal(live.sum(axis=1), mask.sum(axis=1))
