"""The vision tower in the memory plan: the planner, the doctor and the shipped profiles count the
device bytes of a multimodal checkpoint's tower as hybrid.load does, so a profile that fits its
VRAM passes the load's check with images on (K2.5's tower: 471M weights, 0.9 GiB in bf16)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import checkpoints_vision as cv
from hybrid.models.moonvit import MoonViT
from hybrid.models.moonvit_config import VisionConfig
from hybrid.models.spec import load_model_spec
from hybrid.planner import plan as planner
from hybrid.planner import profile as profiles
from hybrid.planner.cost import CostModel, machine_from_arg

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def _k25_tower() -> int:
    return MoonViT.parameter_count(VisionConfig.from_dict({"vision_config": {}}, 7168))


def test_builtin_k25_counts_its_tower():
    spec = load_model_spec("kimi-k2.5")
    assert spec.vision_params == _k25_tower()
    assert 4.5e8 < spec.vision_params < 5e8
    machine = machine_from_arg("reference", 24 * 2**30)
    cost = CostModel(spec, machine, device_weight_format="int8")
    with_tower = planner.compute_budget(cost, 32768)
    text = planner.compute_budget(dataclasses.replace(cost, model=dataclasses.replace(spec, vision_params=0)), 32768)
    assert with_tower.vision_bytes == 2 * spec.vision_params and text.vision_bytes == 0
    freed = text.experts_bytes - with_tower.experts_bytes
    assert freed == with_tower.vision_bytes
    assert text.slots - with_tower.slots == pytest.approx(freed / with_tower.bytes_per_expert, abs=1)
    assert any("vision tower" in line for line in with_tower.lines())


@pytest.mark.parametrize("gib", [24, 32, 48, 80])
def test_shipped_profiles_count_the_tower(gib):
    spec = load_model_spec("kimi-k2.5")
    path = PROFILES / f"kimi-k2.5_reference_{gib}GiB.yaml"
    p = profiles.load(str(path), model=spec, vram_bytes=gib * 2**30)
    b = p.data["budget"]
    assert b["vision_tower"]["bytes"] == 2 * spec.vision_params
    assert p.data["model"]["vision_params"] == spec.vision_params
    assert p.vram_needed_bytes == (b["device_weights"]["bytes"] + b["kv_cache"]["bytes"] + b["activations"]["bytes"]
                                   + b["cuda_reserve"]["bytes"] + b["vision_tower"]["bytes"]
                                   + b["layerwise_prefill"]["bytes"] + p.num_cached * b["experts"]["bytes_per_expert"])
    assert p.vram_needed_bytes <= gib * 2**30


def test_plan_no_images_gives_the_tower_to_experts(tmp_path):
    from hybrid.cli import main as cli_main
    from hybrid.planner import trace as traces
    from hybrid.planner.synthetic import make_trace

    spec = load_model_spec("kimi-k2.5")
    tpath = str(tmp_path / "t.safetensors")
    traces.save(make_trace(spec, 200, seed=3), tpath)
    out = {}
    for flag in ([], ["--no-images"]):
        dest = tmp_path / f"p{len(flag)}.yaml"
        assert cli_main(["plan", "--trace", tpath, "--vram", "32GiB", "--out", str(dest), *flag]) == 0
        out[bool(flag)] = yaml.safe_load(dest.read_text())
    assert out[False]["budget"]["vision_tower"]["bytes"] == 2 * spec.vision_params
    assert out[True]["budget"]["vision_tower"]["bytes"] == 0 and "--no-images" in out[True]["command"]
    per = out[True]["budget"]["experts"]["bytes_per_expert"]
    gained = out[True]["budget"]["experts"]["slots"] - out[False]["budget"]["experts"]["slots"]
    assert gained == pytest.approx(2 * spec.vision_params / per, abs=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = cv.build(tmp_path_factory.mktemp("vision_plan"), 0, "release", shards=1)
    return path


def _load(path, **kw):
    import hybrid

    return hybrid.load(path, **dict(dict(dtype=torch.float32, progress=False, experts_backend="torch",
                                         device_ops="torch"), **kw))


def test_checkpoint_spec_counts_the_tower_it_loads(tiny):
    spec = load_model_spec(str(tiny))
    model = _load(tiny)
    assert spec.vision_params > 0
    # the tower hybrid.load holds (its count is transformers' module sizes:
    # tests/test_vision_vs_transformers.py::test_parameter_count_is_the_models)
    assert MoonViT.parameter_count(model.vision.config) == spec.vision_params


def test_checkpoint_without_its_tower_counts_none(tiny, tmp_path):
    """config.json describes a tower the safetensors lack: hybrid.load leaves it out (a warning),
    and so does the plan."""
    import shutil

    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    st = bare / "model.safetensors"
    save_file({k: v for k, v in load_file(st).items() if not k.startswith(("vision_tower.", "mm_projector."))},
              str(st), metadata={"format": "pt"})
    assert load_model_spec(str(bare)).vision_params == 0
    assert load_model_spec(str(bare / "config.json")).vision_params == 0


def test_load_refuses_a_tower_that_does_not_fit(tiny):
    """max_vram between the text model's need and the text model + tower: refused with the tower
    named and images_enabled=False offered; the text model alone loads."""
    from hybrid.models import config_from_dir, facts_of
    from hybrid.runtime.memory import check_fits

    spec = load_model_spec(str(tiny))
    text = check_fits(facts_of(config_from_dir(tiny)), tiny, "cpu", torch.float32, {}, max_len=512,
                      experts_on_device=True).total
    room = text + spec.vision_params * 4 // 2
    with pytest.raises(MemoryError, match=r"vision tower .* images_enabled=False"):
        _load(tiny, max_vram=room, max_len=512)
    assert _load(tiny, max_vram=room, max_len=512, images_enabled=False).vision is None
    assert _load(tiny, max_vram=room + spec.vision_params * 4, max_len=512).vision is not None
