"""Profiles: written by `hybrid plan`, read back, refused for the wrong model or too little VRAM."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from hybrid.cli import main as cli_main
from hybrid.planner import profile as profiles
from hybrid.planner import trace as traces
from hybrid.models.spec import KIMI_K25_CONFIG, load_model_spec, spec_from_config
from hybrid.planner.synthetic import make_trace
from hybrid.planner.units import compact_ids, expand_ids, parse_bytes


@pytest.fixture(scope="module")
def k25_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    spec = load_model_spec("kimi-k2.5")
    tr = make_trace(spec, 300, seed=1)
    tpath = str(d / "t.safetensors")
    traces.save(tr, tpath)
    out = str(d / "p.yaml")
    rc = cli_main(["plan", "--trace", tpath, "--vram", "24GiB", "--device-weights", "int8",
                   "--online", "--out", out])
    assert rc == 0
    return spec, out


def test_profile_round_trip(k25_profile):
    spec, path = k25_profile
    p = profiles.load(path, model=spec, vram_bytes=parse_bytes("24GiB"))
    data = yaml.safe_load(open(path))
    assert data["trace"]["synthetic"] is True
    assert "SYNTHETIC" in open(path).read().splitlines()[1]
    assert set(data["predicted"]) >= {"none", "uniform", "top-N", "plan", "online"}
    assert data["budget"]["device_weights"]["format"] == "int8"
    mask = p.mask(spec.moe_layers)
    assert mask.sum() == p.num_cached == data["budget"]["experts"]["slots"]
    assert p.vram_needed_bytes <= parse_bytes("24GiB")


def test_profile_refused_for_other_model(k25_profile):
    _, path = k25_profile
    other = spec_from_config({**KIMI_K25_CONFIG, "n_routed_experts": 256}, "other")
    with pytest.raises(profiles.ProfileError, match="made for model"):
        profiles.load(path, model=other)


def test_profile_refused_for_too_little_vram(k25_profile):
    spec, path = k25_profile
    with pytest.raises(profiles.ProfileError, match=r"needs .* of VRAM.*only 20.00 GiB"):
        profiles.load(path, model=spec, vram_bytes=parse_bytes("20GiB"))


def test_profile_with_bad_expert_list(k25_profile, tmp_path):
    _, path = k25_profile
    data = yaml.safe_load(open(path))
    data["cached"][1] = "0-3,999"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(profiles.ProfileError, match=r"cached\[1\]"):
        profiles.load(str(bad))
    bad.write_text("format: something-else\n")
    with pytest.raises(profiles.ProfileError, match="format"):
        profiles.load(str(bad))


def test_compact_ids_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = sorted(rng.choice(384, rng.integers(0, 60), replace=False).tolist())
        assert expand_ids(compact_ids(ids), 384) == ids
    assert compact_ids([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(ValueError, match="twice"):
        expand_ids("1-3,2", 10)


def test_plot_writes_pngs(tmp_path):
    spec = load_model_spec("kimi-k2.5")
    tpath = str(tmp_path / "t.safetensors")
    traces.save(make_trace(spec, 200, seed=2, keep_sequence=False), tpath)
    out = tmp_path / "plots"
    assert cli_main(["plan", "--trace", tpath, "--vram", "24GiB", "--device-weights", "int8",
                     "--plot", str(out)]) == 0
    for name in ("expert_frequency.png", "toks_vs_vram.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_trace_script(tmp_path):
    import runpy
    import sys

    out = tmp_path / "s.safetensors"
    argv = sys.argv
    sys.argv = ["make_synthetic_traces.py", "--out", str(out), "--tokens", "300",
                "--drift-every", "100", "--drift-fraction", "0.1", "--seed", "3"]
    try:
        with pytest.raises(SystemExit) as e:
            script = Path(__file__).resolve().parent.parent / "scripts" / "make_synthetic_traces.py"
            runpy.run_path(str(script), run_name="__main__")
        assert e.value.code == 0
    finally:
        sys.argv = argv
    tr = traces.load(str(out))
    assert tr.synthetic and "synthetic" in tr.source and "drift 0.1" in tr.source
    assert tr.tokens == 300 and tr.seq.shape == (300, 60, 8)
    assert len(tr.notes["zipf_exponents"]) == 60
    # every token picks K distinct experts in every layer
    s = np.sort(np.asarray(tr.seq), axis=2)
    assert (np.diff(s, axis=2) > 0).all()


@pytest.mark.parametrize("gib", [24, 32, 48, 80])
def test_shipped_k25_profiles_load_and_hold_their_budget(gib):
    path = Path(__file__).resolve().parent.parent / "profiles" / f"kimi-k2.5_reference_{gib}GiB.yaml"
    spec = load_model_spec("kimi-k2.5")
    p = profiles.load(str(path), model=spec, vram_bytes=gib * 2**30)
    data = p.data
    assert data["trace"]["synthetic"] is True and "Zipf" in data["trace"]["source"]
    assert p.num_cached == data["budget"]["experts"]["slots"] > 0
    assert p.vram_needed_bytes <= gib * 2**30
    assert data["budget"]["experts"]["bytes_per_expert"] == spec.expert_bytes("int4_g32")  # as held
    if gib == 24:
        assert data["budget"]["device_weights"]["format"] == "int8"
    pred = data["predicted"]
    for base in ("none", "uniform", "top-N"):
        assert pred["plan"]["decode_tok_s"] >= pred[base]["decode_tok_s"]
    with pytest.raises(profiles.ProfileError):
        profiles.load(str(path), model=spec, vram_bytes=(gib - 4) * 2**30)


def test_matching_profiles_for_a_gpu():
    from hybrid.planner.expect import matching_profiles

    spec = load_model_spec("kimi-k2.5")
    assert matching_profiles(spec, 16 * 2**30) == []
    assert Path(matching_profiles(spec, 24 * 2**30)[0][0]).name == "kimi-k2.5_reference_24GiB.yaml"
    assert Path(matching_profiles(spec, 80 * 2**30)[0][0]).name == "kimi-k2.5_reference_80GiB.yaml"
    other = spec_from_config({**KIMI_K25_CONFIG, "hidden_size": 64, "n_routed_experts": 8,
                              "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                              "num_hidden_layers": 2, "num_attention_heads": 2}, "tiny")
    assert matching_profiles(other, 80 * 2**30) == []


def test_shipped_demo_profile_is_recorded_and_loads():
    root = Path(__file__).resolve().parent.parent
    demo = root / "hybrid" / "demo_model"
    if not (demo / "config.json").is_file():
        pytest.skip("no embedded demo model in this tree")
    import yaml

    import hybrid

    path = root / "profiles" / "demo-model_reference_542MiB.yaml"
    spec = load_model_spec(str(demo))
    p = profiles.load(str(path), model=spec, vram_bytes=542 * 2**20)
    t = p.data["trace"]
    assert t["synthetic"] is False and "profiles/prompts/demo.jsonl" in t["source"]
    assert "RECORDED TRACE" in path.read_text().splitlines()[1]
    summary = yaml.safe_load((root / "profiles" / "demo-model_demo-prompts_trace-summary.yaml")
                             .read_text())
    trace = traces.load(str(root / t["path"]))
    assert summary["tokens"] == trace.tokens == t["tokens"]
    assert summary["config_hash"] == trace.config_hash == spec.config_hash
    model = hybrid.load(demo, profile=str(path), max_vram=542 * 2**20, max_len=2048,
                        progress=False)
    held = {i: sorted(m.device_experts().experts) for i, m in model.moe_layers().items()
            if m.device_experts() is not None}
    assert held == {k: v for k, v in p.cached.items() if v}
