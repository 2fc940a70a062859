"""Cost model sanity: exact expert bytes, monotone in hit rate and bandwidth, budget numbers."""

import dataclasses

import numpy as np
import pytest

from hybrid.planner.cost import CostModel, MachineSpec, reference_workstation
from hybrid.models.spec import load_model_spec
from hybrid.planner.model_spec import expert_format_bytes
from hybrid.planner.units import parse_bytes


@pytest.fixture(scope="module")
def k25():
    return load_model_spec("kimi-k2.5")


def _freq(spec, seed=0):
    rng = np.random.default_rng(seed)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    w = rng.gamma(0.7, size=(L, E)) + 1e-3
    p = w / w.sum(axis=1, keepdims=True) * K   # rows sum to K like a real trace's
    assert p.max() < 1
    return p


def test_expert_bytes_exact(k25):
    # INT4 group 32: N*K/2 + N*K/32*2 bytes per matrix; K2.5 expert = 3 matrices 7168 x 2048.
    per = 7168 * 2048 // 2 + 7168 * 2048 // 32 * 2
    assert expert_format_bytes("int4_g32", 2048, 7168) == per
    assert k25.expert_bytes() == 3 * per == 24_772_608
    assert k25.expert_bytes("bf16") == 3 * 7168 * 2048 * 2
    assert k25.kv_bytes_per_token == (512 + 64) * 2 * 61
    assert len(k25.moe_layers) == 60 and k25.moe_layers[0] == 1


def test_k25_device_weights(k25):
    # ~11.7 B non-expert params; without the RAM-resident embedding table ~10.5 B.
    params = sum(k25.device_params().values())
    assert 10.3e9 < params < 10.8e9
    assert k25.device_weight_bytes("int8") * 2 == k25.device_weight_bytes("bf16")


def test_decode_monotone_in_hit_rate(k25):
    cm = CostModel(k25, reference_workstation())
    freq = _freq(k25)
    order = np.argsort(-freq, axis=None)
    prev = 0.0
    for n in (0, 50, 200, 600):
        mask = np.zeros(freq.size, dtype=bool)
        mask[order[:n]] = True
        tps = cm.decode_tok_s(freq, mask.reshape(freq.shape))
        assert tps >= prev
        prev = tps


def test_decode_monotone_in_bandwidth(k25):
    freq = _freq(k25)
    mask = np.zeros(freq.shape, dtype=bool)
    base = reference_workstation()
    speeds = []
    for bw in (100.0, 200.0, 400.0):
        m = dataclasses.replace(base, cpu_read_gbps=bw)
        speeds.append(CostModel(k25, m).decode_tok_s(freq, mask))
    assert speeds[0] < speeds[1] < speeds[2]
    faster_pcie = dataclasses.replace(base, pcie_gbps=64.0)
    assert CostModel(k25, faster_pcie).decode_tok_s(freq, mask) >= \
        CostModel(k25, base).decode_tok_s(freq, mask)


def test_batch1_cpu_time_equals_expected_bytes(k25):
    # At batch 1 with no cache, the CPU part of a layer is K experts' bytes over the
    # effective bandwidth (plus the tiny PCIe hand-off).
    m = reference_workstation()
    cm = CostModel(k25, m)
    freq = _freq(k25)
    c = cm.costs(freq, 1)
    expect = k25.top_k * k25.expert_bytes() / (m.cpu_read_gbps * m.cpu_kernel_efficiency * 1e9)
    np.testing.assert_allclose(c.cpu.sum(axis=1), expect, rtol=1e-9)


def test_distinct_experts_for_batches(k25):
    cm = CostModel(k25, reference_workstation())
    freq = _freq(k25)
    c1, c8 = cm.costs(freq, 1), cm.costs(freq, 8)
    # A batch of 8 touches fewer than 8x the experts of one token (shared experts), more than 1x.
    r = c8.cpu.sum() / c1.cpu.sum()
    assert 1.0 < r < 8.0
    p = freq[0, 0]
    np.testing.assert_allclose(c8.cpu[0, 0] / c1.cpu[0, 0], (1 - (1 - p) ** 8) / p, rtol=1e-9)


def test_machine_yaml_round_trip_and_errors(tmp_path):
    import yaml

    m = reference_workstation(parse_bytes("48GiB"))
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(m.to_dict()))
    m2 = MachineSpec.from_yaml(str(p))
    assert m2 == m
    d = m.to_dict()
    d["cpu_read_gbps"] = -1
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match="cpu_read_gbps"):
        MachineSpec.from_yaml(str(p))
    d = m.to_dict()
    d["bogus"] = 1
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match="bogus"):
        MachineSpec.from_yaml(str(p))


def test_longer_context_is_slower_and_batches_read_their_own_kv(k25):
    freq = _freq(k25)
    mask = np.zeros(freq.shape, dtype=bool)
    m = reference_workstation()
    short, long = CostModel(k25, m, kv_tokens=1024), CostModel(k25, m, kv_tokens=65536)
    assert long.decode_tok_s(freq, mask) < short.decode_tok_s(freq, mask)
    # serial (attention) part grows with the batch: each sequence reads its own latent KV
    s1, s8 = long.costs(freq, 1).serial[0], long.costs(freq, 8).serial[0]
    kv = 65536 * (512 + 64) * 2 / (m.gpu_mem_gbps * 1e9)
    assert s8 - s1 == pytest.approx(7 * kv, rel=1e-6)
