"""calibrate.fit recovers known machine parameters from synthetic timings (no wall clock here:
bench/cost_model_check.py is where real runs are timed)."""

import dataclasses

import numpy as np
import pytest

from hybrid.planner import calibrate as cal
from hybrid.runtime import calibration
from hybrid.planner.cost import CostModel, MachineSpec
from hybrid.models.spec import spec_from_config

CONFIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
              num_hidden_layers=4, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=4,
              vocab_size=1000)


def _machine(**kw) -> MachineSpec:
    d = dict(name="cpu", cpu_read_gbps=20.0, cpu_kernel_efficiency=0.5, cpu_matmul_tops=1.0,
             gpu_mem_gbps=12.0, gpu_tflops=0.2, pcie_gbps=50.0, sync_us=90.0,
             vram_bytes=0, ram_bytes=1 << 34, layer_overhead_us=700.0, cpu_kernel_gbps=8.0,
             gpu_expert_overhead_us=25.0, gpu_cache_layer_us=120.0, gpu_present=False)
    d.update(kw)
    return MachineSpec(**d)


@pytest.fixture()
def setup():
    spec = dataclasses.replace(spec_from_config(CONFIG, "calib-test"), expert_format="int4_g32")
    rng = np.random.default_rng(0)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    w = rng.gamma(0.6, size=(L, E)) + 1e-3
    freq = w / w.sum(axis=1, keepdims=True) * K               # rows sum to K, like a trace
    counts = np.round(freq * 1000).astype(np.uint64)
    return spec, freq, counts


def _timings(cost: CostModel, truth: MachineSpec, freq, masks: dict, in_place=1.7):
    """What a perfect measurement of `truth` would give; the cache's micro-timings run
    `in_place` times faster than its work inside a decode step."""
    m = cost.model
    per_cpu = cost.cpu_expert_bytes / (truth.cpu_kernel_gbps * 1e9)
    per_hit = cost.gpu_expert_bytes / (truth.gpu_mem_gbps * 1e9) \
        + truth.gpu_expert_overhead_us * 1e-6
    fix = truth.gpu_cache_layer_us * 1e-6
    parts = cal.PartTimings(
        engine={n: truth.sync_us * 1e-6 + n * per_cpu for n in range(m.top_k + 1)},
        cache={n: (fix + n * per_hit) / in_place for n in range(1, m.top_k + 1)},
        matmul_gbps=truth.gpu_mem_gbps)
    c = dataclasses.replace(cost, machine=truth).costs(freq, 1)
    runs = {k: cal.RunTiming(label=k, mask=mk, step_s=[c.step_time(mk)] * 3)
            for k, mk in masks.items()}
    return parts, runs


@pytest.mark.parametrize("overlap", [False, True])
def test_fit_recovers_the_parameters_and_predicts_other_placements(setup, overlap):
    # overlap: the cached experts' torch work runs beside the CPU engine (threads side by side)
    spec, freq, counts = setup
    truth = _machine(device_overlaps_cpu=overlap)
    start = _machine(layer_overhead_us=0.0, cpu_kernel_gbps=0.0, sync_us=10.0,
                     gpu_expert_overhead_us=0.0, gpu_cache_layer_us=0.0, gpu_mem_gbps=1.0)
    cost = CostModel(spec, start, gpu_expert_format="bf16", device_weight_format="bf16",
                     kv_tokens=64, prefill_chunk=32)
    masks = {f: cal.fraction_mask(counts, f) for f in (0.0, 0.125, 0.25, 0.5)}
    parts, runs = _timings(cost, truth, freq, masks)
    fitted, report = cal.fit(cost, parts, freq, runs[0.0], runs[0.5], "synthetic", overlap)
    assert fitted.overlaps is overlap
    for name in ("cpu_kernel_gbps", "sync_us", "gpu_mem_gbps", "gpu_expert_overhead_us",
                 "gpu_cache_layer_us", "layer_overhead_us"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert not report["engine_per_expert_below_resolution"]
    assert report["cache_in_place_factor"] == pytest.approx(1.7, rel=1e-9)
    # Placements the fit never saw are predicted exactly (noise-free timings).
    fc = dataclasses.replace(cost, machine=fitted).costs(freq, 1)
    for f in (0.125, 0.25):
        assert fc.step_time(masks[f]) == pytest.approx(runs[f].typical_s, rel=1e-9)
    # Every fitted number says where it came from.
    for name in ("cpu_kernel_gbps", "layer_overhead_us", "gpu_cache_layer_us"):
        assert "synthetic" in fitted.sources[name]


def test_fit_uses_medians_and_flat_engine_is_all_fixed_cost(setup):
    spec, freq, counts = setup
    truth = _machine()
    cost = CostModel(spec, _machine(), gpu_expert_format="bf16", kv_tokens=64, prefill_chunk=32)
    masks = {0.0: cal.fraction_mask(counts, 0.0), 0.5: cal.fraction_mask(counts, 0.5)}
    parts, runs = _timings(cost, truth, freq, masks)
    # One outlier step per run (a burst of load elsewhere) does not move the medians.
    for r in runs.values():
        r.step_s = r.step_s + [r.step_s[0] * 50]
    fitted, _ = cal.fit(cost, parts, freq, runs[0.0], runs[0.5])
    assert fitted.layer_overhead_us == pytest.approx(truth.layer_overhead_us, rel=1e-6)
    # An engine whose time does not grow with the expert count (tiny experts in cache).
    flat = dataclasses.replace(parts, engine={n: 100e-6 for n in range(spec.top_k + 1)})
    fitted, report = cal.fit(cost, flat, freq, runs[0.0], runs[0.5])
    assert report["engine_per_expert_below_resolution"]
    assert fitted.sync_us == pytest.approx(100.0)


def test_fit_refuses_wrong_runs(setup):
    spec, freq, counts = setup
    cost = CostModel(spec, _machine(), gpu_expert_format="bf16", kv_tokens=64, prefill_chunk=32)
    masks = {0.0: cal.fraction_mask(counts, 0.0), 0.5: cal.fraction_mask(counts, 0.5)}
    parts, runs = _timings(cost, _machine(), freq, masks)
    with pytest.raises(ValueError, match="'none' run must cache nothing"):
        cal.fit(cost, parts, freq, runs[0.5], runs[0.5])
    with pytest.raises(ValueError, match="'other' run must cache some"):
        cal.fit(cost, parts, freq, runs[0.0], runs[0.0])
    with pytest.raises(ValueError, match="two or more counts"):
        cal.fit(cost, dataclasses.replace(parts, engine={0: 1e-4}), freq, runs[0.0], runs[0.5])


def test_fraction_mask_is_most_picked_per_layer(setup):
    _, _, counts = setup
    m = cal.fraction_mask(counts, 0.25)
    E = counts.shape[1]
    assert (m.sum(axis=1) == E // 4).all()
    for row, c in zip(m, counts):
        assert c[row].min() >= c[~row].max()


def test_typical_statistics():
    two_humps = [1.0] * 6 + [5.0] * 5     # undisturbed steps and preempted ones
    assert cal.typical(two_humps, "median") == 1.0
    assert cal.typical(two_humps + [5.0, 5.0], "median") == 5.0   # the median flips humps
    assert cal.typical(two_humps + [5.0, 5.0], "q25") == 1.0      # the lower quartile does not
    with pytest.raises(ValueError, match="statistic 'mean'"):
        cal.typical([1.0], "mean")


def test_check_runs_the_loop_on_a_real_model(tmp_path):
    # The whole calibration loop on a tiny checkpoint: what it writes and how it is shaped.
    # Nothing about the timings is asserted (tests never judge speed).
    import os

    from checkpoints import build

    import hybrid
    from hybrid.planner.cost import MachineSpec
    from hybrid.planner.profile import load as load_profile

    path, _ = build(tmp_path, variant="int4", shards=1)
    model = hybrid.load(path, max_len=64, threads=1, progress=False)
    rng = np.random.default_rng(0)
    toks = rng.integers(2, model.config.vocab_size, size=24).tolist()
    res = calibration.check(model, path, toks[:8], toks[8:], [0.0, 0.25, 0.5], 0.5, rounds=1,
                    profiles_dir=str(tmp_path / "profiles"), log=lambda *_: None)
    assert [r["cached_fraction"] for r in res["rows"]] == [0.0, 0.25, 0.5]
    assert [r["fit_input"] for r in res["rows"]] == [True, False, True]
    E, L = model.config.n_routed_experts, len(calibration.moe_layers(model))
    assert [r["cached_experts"] for r in res["rows"]] == [0, E // 4 * L, E // 2 * L]
    assert {len(v) for v in res["steps_s"].values()} == {16 - 2}     # warm-up steps dropped
    m = res["machine"]
    assert isinstance(m, MachineSpec) and not m.gpu_present
    assert "calibrated on" in m.sources["layer_overhead_us"]
    files = sorted(os.listdir(tmp_path / "profiles"))
    assert files == ["cached_25.yaml", "cached_50.yaml"]
    prof = load_profile(str(tmp_path / "profiles" / "cached_25.yaml"))
    assert prof.num_cached == E // 4 * L
    # The fitted machine round-trips through its YAML.
    cal.save_machine(m, str(tmp_path / "m.yaml"), "test")
    assert MachineSpec.from_yaml(str(tmp_path / "m.yaml")) == m
