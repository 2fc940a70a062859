"""Quantised checkpoints: compressed-tensors INT4 routed experts and DeepSeek-V3 FP8 blocks.

Both are compared in fp32 against transformers running on the weights the checkpoint decodes
to (tests/checkpoints.py puts exactly those into the reference), so the bound is the fp32 one:
1e-3 outside near-tie positions. The INT4 checkpoint is packed by compressed_tensors' own
pack_to_int32, so its layout is the real one.
"""

import pytest
import torch

from checkpoints import build, reference_logits
from checkpoints import load_model
from hybrid.loaders.quant import unpack_int4
from test_model_vs_transformers import _ids, _matches_transformers, _prefill, _report


def test_unpack_int4_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-8, 8, (16, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_to_int32(q, 4)
    assert torch.equal(unpack_int4(packed, 16, 96), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([16, 96])), q)


def test_int4_experts_torch_backend(tmp_path):
    path, ref = build(tmp_path, variant="int4")
    cfg, net = load_model(path, "cpu", torch.float32, progress=False)
    assert cfg.quant.method == "compressed-tensors" and cfg.quant.group_size == 32
    _matches_transformers(ref, cfg, net, "int4/torch")


def test_fp8_block_checkpoint(tmp_path):
    path, ref = build(tmp_path, variant="fp8")
    cfg, net = load_model(path, "cpu", torch.float32, progress=False)
    assert cfg.quant.method == "fp8" and cfg.quant.block_size == (16, 16)
    _matches_transformers(ref, cfg, net, "fp8/torch")


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_device_weights_quantised(tmp_path, fmt):
    """Weight-only device tensors with a per-row scale. int8: 127 levels, each weight off by
    at most amax/254 of its row; fp8 e4m3: 3 mantissa bits, relative error up to 2^-4. Outputs
    drift by ~0.3% (int8) / ~3% (fp8) per matmul, so mean logit error stays within 5% / 15% of
    the logit scale; top-1 agreement reported."""
    from hybrid.runtime.memory import device_formats_option

    path, ref = build(tmp_path)
    cfg, net = load_model(path, "cpu", torch.float32, progress=False,
                          device_formats=device_formats_option(fmt))
    assert net.layers[0].attn.o_proj.format == fmt and net.lm_head.format == fmt
    ids = _ids(cfg.vocab_size)
    r, _ = reference_logits(ref, ids)
    err, agree = _report(f"{fmt} device weights", _prefill(net, cfg, ids), r)
    assert err.mean() <= (0.05 if fmt == "int8" else 0.15) * r.abs().max()
    assert agree >= (0.8 if fmt == "int8" else 0.6)


def test_quantised_linear_row_chunks(monkeypatch):
    """Converting a quantised weight in row chunks gives the same product as all at once."""
    import hybrid.ops.linear as lin
    from hybrid.loaders.quant import quantize_rows

    w = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    for fmt in ("int8", "fp8"):
        q, s = quantize_rows(w, fmt)
        layer = lin.Linear(q, torch.randn(50), s, name="t")
        whole = layer(x)
        monkeypatch.setattr(lin, "DEQUANT_ROWS", 16)
        assert torch.allclose(layer(x), whole, atol=1e-6)
        monkeypatch.undo()
        assert torch.allclose(whole, x @ layer.dense(torch.float32).T + layer.bias, atol=1e-4)
