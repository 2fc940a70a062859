"""The op set is chosen once at load (hybrid/ops): native CPU forms for a bf16 CPU device with the
extension, torch forms otherwise or when asked (device_ops= / HYBRID_DEVICE_OPS=torch, the exact
path a CUDA device runs); both give the same greedy continuation of the demo model."""

import pytest
import torch

import hybrid
from hybrid.ops import select_ops

native = pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")


def test_choice_and_environment(monkeypatch):
    assert select_ops("cpu", torch.bfloat16).name == "native"
    assert select_ops("cpu", torch.float32).name == "torch"  # fp32 is the torch reference path
    assert select_ops("cpu", torch.bfloat16, "torch").name == "torch"
    monkeypatch.setenv("HYBRID_DEVICE_OPS", "torch")
    assert select_ops("cpu", torch.bfloat16).name == "torch"
    monkeypatch.setenv("HYBRID_DEVICE_OPS", "fast")
    with pytest.raises(ValueError, match="device ops must be one of auto, torch, native .*'fast'"):
        select_ops("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="'native' need a bf16 CPU device"):
        select_ops("cpu", torch.float32, "native")


def test_torch_ops_and_native_ops_agree_on_the_demo_model():
    a = hybrid.load(progress=False, device_ops="native")
    b = hybrid.load(progress=False, device_ops="torch")
    assert a.stats()["ops"] == "native" and b.stats()["ops"] == "torch"
    ids = a.tokenizer.encode("The Python tutorial")
    la, lb = a.logits(ids), b.logits(ids)  # prefill: torch matmuls in both, native norms in one
    assert (la - lb).abs().max() <= 0.05 * lb.abs().max()
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() >= 0.9
    # Greedy decode: native attention / GEMV / router in one, torch in the other.
    ga, gb = a.generate(ids, 8, stop_at_eos=False), b.generate(ids, 8, stop_at_eos=False)
    assert sum(x == y for x, y in zip(ga, gb)) >= 6, (ga, gb)
