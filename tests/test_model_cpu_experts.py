"""The model with its routed experts on the C++ CPU engine (hybrid.experts.cpu_moe).

Bounds:
  INT4 checkpoint, precise mode (fp32 activations): the engine multiplies exactly the
    checkpoint's nibbles and scales, so it is held to the fp32 bound, 1e-3.
  INT4 checkpoint, fast mode (int8 activations per group of 32): each expert input is off by
    at most amax/254 of its group (~0.4%), through two matmuls per expert and two MoE layers:
    mean per-position error <= 2% of the logit scale, top-1 agreement >= 90% (reported).
  bf16 checkpoint packed to int4 / int8 (expert_format): quantisation error of the experts
    themselves (int4: step amax/7.5 per group, int8: amax/127); compared against the torch
    backend on the same model with the tolerance each format costs, top-1 agreement reported.
"""

import os

import pytest
import torch

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

from checkpoints import build, reference_logits  # noqa: E402
from checkpoints import load_model  # noqa: E402
from test_model_vs_transformers import _ids, _matches_transformers, _prefill, _report  # noqa: E402


def _load(path, dtype=torch.float32, **kw):
    """-> (config, network, the expert factory's counters)."""
    from hybrid.runtime.build import build_model

    kw.setdefault("mode", "precise" if dtype == torch.float32 else "fast")
    b = build_model(path, "cpu", dtype, experts_backend="cpu", progress=False, split_threads=False, **kw)
    return b.config, b.network, b.stats()["experts"]


def test_int4_passthrough_precise(tmp_path):
    path, ref = build(tmp_path, variant="int4")
    cfg, net, stats = _load(path)
    assert stats["int4_passthrough"] == cfg.num_hidden_layers - cfg.first_k_dense_replace
    _matches_transformers(ref, cfg, net, "int4/cpu/precise")


def test_int4_passthrough_fast(tmp_path):
    path, ref = build(tmp_path, variant="int4")
    cfg, net, _ = _load(path, mode="fast")
    ids = _ids(cfg.vocab_size)
    r, _ = reference_logits(ref, ids)
    err, agree = _report("int4/cpu/fast", _prefill(net, cfg, ids), r)
    assert err.mean() <= 0.02 * r.abs().max()
    assert agree >= 0.9


@pytest.mark.parametrize("fmt,rel", [("int4", 0.15), ("int8", 0.02), ("bf16", 0.01)])
def test_float_experts_packed(tmp_path, fmt, rel):
    """rel: mean logit error allowed, as a fraction of the logit scale. int4 group-32 weights
    are off by up to 1/15 of their group's range (~7% relative), two matmuls per expert;
    int8 by 1/254; bf16 by 2^-9."""
    path, _ = build(tmp_path)
    cfg, ref_net = load_model(path, "cpu", torch.float32, experts_backend="torch", progress=False)
    cfg, net, stats = _load(path, expert_format=fmt)
    assert stats["quantised"] == cfg.num_hidden_layers - cfg.first_k_dense_replace
    ids = _ids(cfg.vocab_size)
    r = _prefill(ref_net, cfg, ids)
    err, agree = _report(f"bf16->{fmt}/cpu/precise", _prefill(net, cfg, ids), r)
    assert err.mean() <= rel * r.abs().max()
    assert agree >= (0.75 if fmt == "int4" else 0.9)


def test_packed_cache_roundtrip(tmp_path):
    path, _ = build(tmp_path, variant="int4")
    before = sorted(p.name for p in path.iterdir())
    cfg, net1, _ = _load(path, packed_cache=True)
    cache_dir = path / ".hybrid-cache"
    files = sorted(p.name for p in cache_dir.iterdir())
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert len(files) == n_moe and all(f.endswith(".packed") for f in files), files
    assert sorted(p.name for p in path.iterdir()) == sorted(before + [".hybrid-cache"])
    cfg, net2, stats = _load(path, packed_cache=True)
    assert stats["from_cache"] == n_moe
    ids = _ids(cfg.vocab_size)
    assert torch.equal(_prefill(net1, cfg, ids), _prefill(net2, cfg, ids))


def test_packed_cache_holds_only_regular_files(tmp_path):
    """A checkpoint shipping `.hybrid-cache` as a link (to a folder elsewhere) or a cached layer as
    a link or a FIFO is refused, naming it; nothing is written through the link."""
    from hybrid.loaders.safetensors_files import CheckpointError

    path, _ = build(tmp_path / "ckpt", variant="int4")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / ".hybrid-cache").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"\.hybrid-cache: the packed cache must be a folder inside"):
        _load(path, packed_cache=True)
    assert list(elsewhere.iterdir()) == []
    (path / ".hybrid-cache").unlink()
    _load(path, packed_cache=True)
    first = sorted((path / ".hybrid-cache").iterdir())[0]
    first.unlink()
    os.mkfifo(first)  # opening a FIFO would block forever
    with pytest.raises(CheckpointError, match=f"{first.name}: not a regular file"):
        _load(path, packed_cache=True)
    first.unlink()
    first.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=f"{first.name}: not a regular file"):
        _load(path, packed_cache=True)


def test_hybrid_load_default_backend_greedy(tmp_path):
    """hybrid.load picks the CPU engine when it is built; fp32 = precise mode; greedy
    generation through the latent cache equals transformers' generate."""
    import hybrid
    from hybrid.experts.cpu_moe import CpuMoE

    path, ref = build(tmp_path, variant="int4")
    model = hybrid.load(path, device="cpu", dtype=torch.float32, progress=False)
    host = model.moe_layers()[model.config.num_hidden_layers - 1].host_experts()
    assert isinstance(host, CpuMoE)
    assert host.mode == "precise"
    prompt = _ids(model.config.vocab_size, 8, seed=7)
    with torch.no_grad():
        want = ref.generate(prompt[None], max_new_tokens=16, do_sample=False, min_new_tokens=16,
                            pad_token_id=0)[0, 8:].tolist()
    assert model.generate(prompt.tolist(), 16, stop_at_eos=False) == want


def test_placement_profile_gpu_cache(tmp_path):
    """A profile (hybrid plan's format) that caches some experts on the device: the CPU engine
    skips them, the device computes them from the same INT4 weights, and the logits equal the
    all-CPU run (both exact fp32 on the same weights: 1e-4)."""
    import json

    import yaml

    import hybrid
    from hybrid.models.spec import spec_from_config

    path, _ = build(tmp_path, variant="int4")
    spec = spec_from_config(json.loads((path / "config.json").read_text()), model_id="tiny")
    prof = {"format": "hybrid-profile/1",
            "model": {"id": "tiny", "config_hash": spec.config_hash, "experts": spec.num_experts},
            "budget": {"device_weights": {"bytes": 0}, "kv_cache": {"bytes": 0}, "activations": {"bytes": 0},
                       "cuda_reserve": {"bytes": 0}, "experts": {"bytes_per_expert": 1, "format": "bf16"}},
            "cached": {layer: ",".join(str(e) for e in range(0, 64, 3)) for layer in spec.moe_layers}}
    pfile = tmp_path / "tiny.yaml"
    pfile.write_text(yaml.safe_dump(prof))
    base = hybrid.load(path, device="cpu", dtype=torch.float32, progress=False)
    cached = hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, profile=pfile)
    layer = cached.moe_layers()[cached.config.num_hidden_layers - 1]
    assert layer.device_experts() is not None and int(layer.device_experts().held_mask().sum()) == 22
    ids = _ids(cached.config.vocab_size).tolist()
    assert (cached.logits(ids) - base.logits(ids)).abs().max() <= 1e-4
    with pytest.raises(MemoryError, match="cached experts"):
        hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, profile=pfile,
                    max_vram=device_need(cached) + 1000)


def device_need(model):
    from hybrid.planner.device_memory import device_bytes

    return device_bytes(model.facts, model.dtype.itemsize, {}, model.max_len).total


def test_fp8_checkpoint_experts_to_int8(tmp_path):
    """FP8 block experts are dequantised once and packed as int8 group 32 by default (8 bits,
    step amax/127 per 32 inputs): mean logit error within 2% of the scale."""
    path, ref = build(tmp_path, variant="fp8")
    cfg, net, _ = _load(path)
    assert net.moe_layers()[cfg.num_hidden_layers - 1].host_experts().layer.format == "int8"
    ids = _ids(cfg.vocab_size)
    r, _ = reference_logits(ref, ids)
    err, agree = _report("fp8->int8/cpu/precise", _prefill(net, cfg, ids), r)
    assert err.mean() <= 0.02 * r.abs().max()
    assert agree >= 0.9
