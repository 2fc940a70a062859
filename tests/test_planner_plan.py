"""Placement: exact optimality against brute force on small cases, budgets never exceeded."""

import itertools

import numpy as np
import pytest

from hybrid.planner import plan as planner
from hybrid.planner.cost import CostModel, LayerCosts, reference_workstation
from hybrid.models.spec import load_model_spec
from hybrid.planner.trace import Trace
from hybrid.planner.units import parse_bytes


def _costs(seed, L=3, E=5, gpu_scale=0.01, K=2, cpu_bound=False):
    """Per-expert costs shaped like cost.py's: both proportional to pick probability p.
    cpu_bound: the CPU part of every layer stays above its GPU part whatever is cached."""
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.6, size=(L, E)) + 1e-3
    p = p / p.sum(axis=1, keepdims=True) * K
    a = rng.uniform(1.0, 2.0, size=(L, 1))            # CPU seconds per pick, per layer
    gpu = p * a * gpu_scale * rng.uniform(0.5, 1.5, size=(L, 1))
    gpu_fix = rng.uniform(0, 0.3, L) * K
    cpu_fix = rng.uniform(0, 0.1, L) + (gpu_fix + gpu.sum(axis=1) if cpu_bound else 0.0)
    return LayerCosts(cpu=p * a, gpu=gpu, cpu_fix=cpu_fix, gpu_fix=gpu_fix,
                      serial=rng.uniform(0, 0.1, L), sync=0.01, other=0.05, batch=1)


def _all_masks(L, E):
    bits = np.array(list(itertools.product([False, True], repeat=L * E)))
    return bits.reshape(-1, L, E)


def _times(costs, masks):
    cpu = costs.cpu_fix + np.where(masks, 0.0, costs.cpu).sum(axis=2)
    gpu = costs.gpu_fix + np.where(masks, costs.gpu, 0.0).sum(axis=2)
    return costs.other + (costs.serial + costs.sync + np.maximum(cpu, gpu)).sum(axis=1)


@pytest.mark.parametrize("seed", range(12))
def test_optimal_equals_brute_force_when_cpu_bound(seed):
    # No layer's GPU part can overtake its CPU part, so the optimum over ALL subsets is a
    # prefix placement and the planner must find it exactly.
    c = _costs(seed, gpu_scale=0.3, cpu_bound=True)
    masks = _all_masks(3, 5)
    times = _times(c, masks)
    used = masks.reshape(len(masks), -1).sum(axis=1)
    for slots in range(0, 16):
        best = times[used <= slots].min()
        m = planner.place_optimal(c, slots)
        assert m.sum() <= slots
        assert c.step_time(m) == pytest.approx(best, rel=1e-12, abs=1e-12), slots


@pytest.mark.parametrize("seed", range(12))
def test_optimal_over_prefixes_and_bounded_against_all_subsets(seed):
    # Expensive GPU: layers cross over. The planner is exact among per-layer prefix placements
    # (brute force over every (n_1, .., n_L)), and within one expert per layer of the optimum
    # over all subsets (plan.py, point 3).
    L, E = 3, 5
    c = _costs(seed, L=L, E=E, gpu_scale=1.2)
    orders = np.argsort(-c.cpu, axis=1, kind="stable")
    masks = _all_masks(L, E)
    times = _times(c, masks)
    used = masks.reshape(len(masks), -1).sum(axis=1)
    slack = np.maximum(c.cpu, c.gpu).max(axis=1).sum()
    for slots in range(0, L * E + 1):
        m = planner.place_optimal(c, slots)
        assert m.sum() <= slots
        t = c.step_time(m)
        best_prefix = np.inf
        for ns in itertools.product(range(E + 1), repeat=L):
            if sum(ns) > slots:
                continue
            pm = np.zeros((L, E), dtype=bool)
            for l, n in enumerate(ns):
                pm[l, orders[l, :n]] = True
            best_prefix = min(best_prefix, c.step_time(pm))
        assert t == pytest.approx(best_prefix, rel=1e-12, abs=1e-12)
        best_any = times[used <= slots].min()
        assert best_any - 1e-12 <= t <= best_any + slack


def test_plan_never_worse_than_baselines():
    for seed in range(20):
        c = _costs(seed, L=4, E=6, gpu_scale=0.8)
        counts = (c.cpu / c.cpu.max() * 1000).astype(np.uint64)   # same order as the costs
        for slots in (0, 3, 7, 12, 24):
            plan_t = c.step_time(planner.place_optimal(c, slots))
            for fn in planner.STRATEGIES.values():
                m = fn(counts, slots)
                assert m.sum() <= slots
                assert plan_t <= c.step_time(m) + 1e-12


def _k25_trace(spec, seed=0, tokens=1000):
    rng = np.random.default_rng(seed)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    counts = np.zeros((L, E), dtype=np.uint64)
    for l in range(L):
        w = 1.0 / np.arange(1, E + 1) ** rng.uniform(0.5, 1.2)
        w = rng.permutation(w / w.sum())
        for _ in range(K):   # K picks per token, spread by weight (duplicates merged away)
            counts[l] += rng.multinomial(tokens, w).astype(np.uint64)
    return Trace(spec.model_id, spec.config_hash, list(spec.moe_layers), E, K, counts, tokens,
                 source="test", synthetic=True)


@pytest.mark.parametrize("vram,weights,gpu_fmt", [("24GiB", "int8", "bf16"), ("32GiB", "bf16", "bf16"),
                                                  ("48GiB", "bf16", "int4_g32"), ("80GiB", "bf16", "bf16")])
def test_k25_budget_never_exceeded(vram, weights, gpu_fmt):
    spec = load_model_spec("kimi-k2.5")
    cm = CostModel(spec, reference_workstation(parse_bytes(vram)), gpu_expert_format=gpu_fmt,
                   device_weight_format=weights)
    r = planner.make_plan(cm, _k25_trace(spec), context_tokens=32768)
    b = r.budget
    assert b.slots > 0
    for name, m in r.masks.items():
        used = b.device_weights_bytes + b.kv_cache_bytes + b.activation_bytes + \
            b.reserve_bytes + int(m.sum()) * b.bytes_per_expert
        assert used <= parse_bytes(vram), name
    p = r.predictions
    assert p["plan"]["decode_tok_s"] >= max(p[s]["decode_tok_s"] for s in ("none", "uniform", "top-N")) - 1e-9
    assert p["plan"]["decode_tok_s"] > p["none"]["decode_tok_s"]


def test_budget_too_small_is_refused_with_numbers():
    spec = load_model_spec("kimi-k2.5")
    cm = CostModel(spec, reference_workstation(parse_bytes("16GiB")))
    with pytest.raises(planner.PlanError, match=r"(?s)does not fit.*device weights.*short by"):
        planner.compute_budget(cm, 32768)


def test_plan_refuses_trace_of_other_model():
    spec = load_model_spec("kimi-k2.5")
    tr = _k25_trace(spec)
    tr.config_hash = "sha256:0000"
    cm = CostModel(spec, reference_workstation(parse_bytes("48GiB")))
    with pytest.raises(planner.PlanError, match="trace is for model"):
        planner.make_plan(cm, tr, 32768)


def test_no_overlap_plan_equals_brute_force():
    # Without a GPU the parts add up: the plan must still be optimal (and never cache an expert
    # that is slower on the "device" than on the CPU).
    for seed in range(6):
        c = _costs(seed, gpu_scale=1.0)
        c.gpu = c.gpu * np.random.default_rng(seed).uniform(0.3, 2.0, size=c.gpu.shape)
        c.overlap = False
        masks = _all_masks(3, 5)
        cpu = c.cpu_fix + np.where(masks, 0.0, c.cpu).sum(axis=2)
        gpu = c.gpu_fix + np.where(masks, c.gpu, 0.0).sum(axis=2)
        times = c.other + (c.serial + c.sync + cpu + gpu).sum(axis=1)
        used = masks.reshape(len(masks), -1).sum(axis=1)
        for slots in (0, 2, 5, 9, 15):
            m = planner.place_optimal(c, slots)
            assert m.sum() <= slots
            assert c.step_time(m) == pytest.approx(times[used <= slots].min(), rel=1e-12)
