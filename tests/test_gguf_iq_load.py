"""A tiny deepseek2 GGUF whose routed experts are lattice ("IQ") types loads on the CPU engine with
its experts in their own blocks (no dequantise-and-requantise warning) and gives the logits of its
dequantised safetensors twin to fp32 accumulation order (fp32 activations: the weights are exact).
The kernels themselves are checked type by type in tests/test_native_gguf.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import gguf_files
from test_gguf_load import SMALL_K, _cfg, _experts_as, _logits


@pytest.mark.parametrize("types", [
    {1: ("IQ2_XXS",) * 3, 2: ("IQ2_XXS",) * 3},
    {1: ("IQ3_XXS", "IQ3_XXS", "IQ2_XXS"), 2: ("IQ2_XS", "IQ2_XS", "IQ1_S")},
], ids=["iq2_xxs", "mixed"])
def test_iq_experts_native_equal_twin(tmp_path, types):
    from hybrid.runtime.build import build_model

    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    iq = gguf_files.rewrite(g, tmp_path / "iq.gguf", tensors=_experts_as(types))
    twin = gguf_files.twin(iq, ref, _cfg(ref), tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no native CPU kernel.*")
        built = build_model(iq, "cpu", torch.float32, experts_backend="cpu", progress=False, split_threads=False)
    assert built.stats()["experts"]["gguf_native"] == len(types)
    got = _logits(iq, experts_backend="cpu")
    want = _logits(twin)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_doctor_counts_the_packed_bytes(tmp_path):
    """The RAM hybrid doctor and the planner count for experts kept in their blocks is what the
    packed layers hold (the lattice types' tiles are larger than the file's blocks: IQ1_S 1.48x),
    not the file's bytes."""
    from hybrid.loaders.gguf_config import config_dict
    from hybrid.loaders.gguf_file import GGUFFile
    from hybrid.loaders.gguf_source import GGUFSource
    from hybrid.models import config_from_dict
    from hybrid.runtime.gguf_experts import describe_gguf, pack_gguf_layer

    types = {1: ("IQ1_S",) * 3, 2: ("Q4_K", "Q4_K", "Q6_K")}
    g, _, ref = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    mixed = gguf_files.rewrite(g, tmp_path / "mixed.gguf", tensors=_experts_as(types))
    d = describe_gguf(mixed)
    assert [x["held_as"] for x in d["expert_layers"]] == ["native", "native"]
    c = _cfg(ref)
    E, H, I = c["n_routed_experts"], c["hidden_size"], c["moe_intermediate_size"]
    f = GGUFFile(mixed)
    try:
        src = GGUFSource(config_from_dict(config_dict(f), source=str(mixed)), f, "cpu", torch.float32)
        packed = [pack_gguf_layer(src, x["layer"], E, H, I, "native").nbytes for x in d["expert_layers"]]
    finally:
        f.close()
    assert [x["ram_bytes"] for x in d["expert_layers"]] == packed
    assert d["routed_ram_bytes"] == sum(packed)
    # at K2.5 size (page padding aside): IQ1_S tiles take 1.8125 bits per weight, the file 1.5625
    from hybrid.experts.cpu_moe import PackedLayer

    weights = 384 * 3 * 7168 * 2048
    assert PackedLayer.gguf_bytes("IQ1_S", "IQ1_S", "IQ1_S", 384, 7168, 2048) == pytest.approx(weights * 1.8125 / 8, rel=1e-3)
    assert PackedLayer.gguf_bytes("IQ1_M", "IQ1_M", "IQ1_M", 384, 7168, 2048) == pytest.approx(weights * 2.0625 / 8, rel=1e-3)


def test_native_lattice_layers_cached(tmp_path):
    """Lattice experts kept in their blocks go to the packed cache and come back from it (the
    key holds the layout's size: a pack in an older IQ1 layout is never read as the new one)."""
    from hybrid.runtime.build import build_model

    g, _, _ = gguf_files.deepseek2_gguf(tmp_path, "f32", **SMALL_K)
    iq = gguf_files.rewrite(g, tmp_path / "iq1.gguf", tensors=_experts_as({1: ("IQ1_S",) * 3, 2: ("IQ2_XXS",) * 3}))

    def build():
        return build_model(iq, "cpu", torch.float32, experts_backend="cpu", packed_cache=True, progress=False,
                           split_threads=False)

    ids = torch.tensor([2, 3, 4, 5])

    def logits(net):
        pos = torch.arange(len(ids))
        return net.forward(ids, pos, torch.zeros_like(pos), net.make_cache(1, 16))

    first = build()
    assert first.stats()["experts"]["gguf_native"] == 2
    assert len(sorted((iq.parent / ".hybrid-cache").glob("iq1.layer*.native.*.packed"))) == 2
    second = build()
    assert second.stats()["experts"]["from_cache"] == 2
    assert torch.equal(logits(second.network), logits(first.network))
