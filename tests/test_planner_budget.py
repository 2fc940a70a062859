"""Planner and loader count device memory the same way (one accounting: loaders/memory.py), so a
profile made for a budget loads under exactly that budget and not under one byte less."""

import dataclasses

import numpy as np
import pytest
import torch
from checkpoints import build

import hybrid
from hybrid.models import config_from_dir
from hybrid.models import facts_of
from hybrid.planner.device_memory import device_bytes
from hybrid.planner import calibrate as cal
from hybrid.runtime import calibration
from hybrid.planner import plan as planner
from hybrid.planner.cost import CostModel, reference_workstation
from hybrid.models.spec import load_model_spec
from hybrid.planner.profile import ProfileError
from hybrid.planner.trace import Trace


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("budget"), variant="int4", shards=1)
    return path


def test_budget_parts_are_the_loaders(ckpt):
    spec = load_model_spec(str(ckpt))
    cfg = config_from_dir(ckpt)
    for fmt, dtype, formats in (("bf16", torch.bfloat16, {}),
                                ("int8", torch.bfloat16, {g: "int8" for g in
                                                          ("attention", "shared", "dense",
                                                           "lm_head")})):
        cost = CostModel(spec, reference_workstation("8GiB"), device_weight_format=fmt)
        b = planner.compute_budget(cost, 256)
        ref = device_bytes(facts_of(cfg), dtype.itemsize, formats, max_len=256, num_slots=1)
        assert (b.device_weights_bytes, b.kv_cache_bytes, b.activation_bytes) == \
            (ref.weights, ref.kv_cache, ref.activations)


def test_profile_loads_under_its_budget_and_not_one_byte_less(ckpt, tmp_path):
    spec = load_model_spec(str(ckpt))
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    counts = np.tile(np.arange(E, 0, -1, dtype=np.uint64), (L, 1))
    trace = Trace(spec.model_id, spec.config_hash, list(spec.moe_layers), E, K, counts,
                  int(counts[0].sum()) // K, source="test", synthetic=True)
    mask = cal.fraction_mask(counts, 0.25)
    cost = CostModel(spec, reference_workstation(), gpu_expert_format="bf16")
    path = str(tmp_path / "p.yaml")
    max_len = 128
    cal.write_profile(path, cost, trace, mask, "quarter", context_tokens=max_len)
    need = planner.budget_for_slots(cost, max_len, int(mask.sum())).vram_bytes
    model = hybrid.load(ckpt, profile=path, max_vram=need, max_len=max_len, progress=False)
    cached = {m.layer: sorted(m.device_experts().experts) for m in calibration.moe_layers(model)}
    assert cached == {l: sorted(np.nonzero(mask[i])[0].tolist())
                      for i, l in enumerate(spec.moe_layers)}
    with pytest.raises((ProfileError, MemoryError)):
        hybrid.load(ckpt, profile=path, max_vram=need - 1, max_len=max_len, progress=False)


def test_budget_refuses_a_spec_without_architecture_facts():
    spec = dataclasses.replace(load_model_spec("kimi-k2.5"), facts=None)
    with pytest.raises(planner.PlanError, match="cannot count device memory"):
        planner.compute_budget(CostModel(spec, reference_workstation()), 4096)
