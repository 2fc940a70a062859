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
