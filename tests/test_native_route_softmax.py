"""The native softmax top-k router (csrc/models/router.h, hybrid._native.route_softmax: Qwen3-MoE,
Mixtral) against a plain torch reference, softmax(F.linear(x.float(), gate)) -> topk -> renorm.

Bounds: the same picks in the same order, and weights within 1e-5. The logits are fp32 sums in
another order than torch's GEMM and exp is another implementation, so two experts whose
probabilities are closer than that may come out in either order: such tokens (a gap under 1e-5
between any two of the K + 1 most probable experts, by the fp64 logits) are left out of the pick
comparison, and there must be few of them. Exact ties are tested on their own: equal
probabilities go to the lower expert index first.

ISA paths: the router is one plain C++ body compiled for baseline x86-64 (no KernelTable entry),
so every HYBRID_ISA runs this same code, as for the noaux_tc `route` (test_native_decode_ops.py).

Legend: T tokens, H hidden, E experts, K picked.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

from hybrid import native  # noqa: E402

L = native.lib()
GAP = 1e-5  # closer probabilities may be picked in either order (see above)


def _torch_route(x, gate, k, norm):
    probs = F.linear(x.float(), gate).softmax(dim=-1)  # [T, E]
    w, ids = probs.topk(k, dim=-1)  # [T, K]
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return ids, w


def _native_route(x, gate, k, norm):
    ids = torch.full((x.shape[0], k), -1, dtype=torch.int32)
    w = torch.full((x.shape[0], k), float("nan"))
    assert L.route_softmax(x, gate, k, norm, ids, w) is None
    return ids, w


def _clear(x, gate, k):
    """[T] bool: tokens whose K + 1 most probable experts are all more than GAP apart."""
    p = F.linear(x.double(), gate.double()).softmax(dim=-1)
    top = p.topk(min(k + 1, p.shape[1]), dim=-1).values  # [T, K+1], descending
    if top.shape[1] < 2:
        return torch.ones(x.shape[0], dtype=torch.bool)
    return (top[:, :-1] - top[:, 1:]).min(dim=-1).values > GAP


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("T,H,E,K", [(1, 64, 8, 2), (3, 100, 8, 8), (17, 64, 60, 4), (9, 2048, 128, 8),
                                     (33, 48, 64, 1), (5, 31, 16, 6)])
def test_route_softmax_matches_torch(T, H, E, K, norm):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + K)
    x = torch.randn(T, H, generator=g).bfloat16()
    gate = torch.randn(E, H, generator=g) * (2.0 / H**0.5)  # logits of order 1, as trained routers
    ids, w = _native_route(x, gate, K, norm)
    ref_ids, ref_w = _torch_route(x, gate, K, norm)
    clear = _clear(x, gate, K)
    assert clear.float().mean() >= 0.9, "too many near-ties for a meaningful comparison"
    assert torch.equal(ids[clear].long(), ref_ids[clear])
    # Weights in the reference's order even for near-tie tokens: the pick of equal-probability
    # experts changes no weight beyond the bound.
    assert (w - ref_w).abs().max() <= 1e-5
    if norm:
        assert torch.allclose(w.sum(-1), torch.ones(T), atol=1e-6)
    assert ((ids >= 0) & (ids < E)).all()
    assert all(len(set(r.tolist())) == K for r in ids)  # no expert picked twice


def test_route_softmax_ties_go_to_the_lower_index():
    g = torch.Generator().manual_seed(0)
    E, H = 8, 32
    x = torch.randn(4, H, generator=g).bfloat16()
    gate = torch.randn(E, H, generator=g) * 0.01
    big = torch.randn(H, generator=g)
    gate[5] = gate[2] = big  # experts 2 and 5: the same logit, by far the largest
    ids, w = _native_route(x * torch.sign(x.float() @ big).bfloat16()[:, None], gate, 3, True)
    assert ids[:, 0].tolist() == [2] * 4 and ids[:, 1].tolist() == [5] * 4
    assert torch.equal(w[:, 0], w[:, 1])
    # All-equal logits (zero gate): the K lowest indices, in order, each weight 1 / K.
    ids, w = _native_route(x, torch.zeros(E, H), 3, True)
    assert ids.tolist() == [[0, 1, 2]] * 4
    assert torch.allclose(w, torch.full((4, 3), 1 / 3))
    ids, w = _native_route(x, torch.zeros(E, H), 3, False)
    assert torch.allclose(w, torch.full((4, 3), 1 / E))


def test_route_softmax_bad_input():
    x = torch.randn(2, 16).bfloat16()
    gate = torch.randn(6, 16)
    ids, w = torch.empty(2, 2, dtype=torch.int32), torch.empty(2, 2)
    bad = [
        ((x.float(), gate, 2, True, ids, w), TypeError, "x must have dtype torch.bfloat16"),
        ((x[0], gate, 2, True, ids, w), ValueError, "x must have 2 dimensions"),
        ((x, gate.bfloat16(), 2, True, ids, w), TypeError, "gate must have dtype torch.float32"),
        ((x, gate[:, :8].contiguous(), 2, True, ids, w), ValueError, r"gate must have shape \[6, 16\]"),
        ((x, gate.t().contiguous().t(), 2, True, ids, w), ValueError, "gate must be contiguous"),
        ((x, gate, 0, True, ids, w), ValueError, r"top_k 0 must be in 1..6"),
        ((x, gate, 7, True, torch.empty(2, 7, dtype=torch.int32), torch.empty(2, 7)), ValueError, "top_k 7"),
        ((x, gate, 2, True, ids.long(), w), TypeError, "ids_out must have dtype torch.int32"),
        ((x, gate, 2, True, ids[:, :1].contiguous(), w), ValueError, r"ids_out must have shape \[2, 2\]"),
        ((x, gate, 2, True, ids, w.double()), TypeError, "w_out must have dtype torch.float32"),
        ((x, gate, 2, True, ids, torch.empty(3, 2)), ValueError, r"w_out must have shape \[2, 2\]"),
        ((x[:0], gate, 2, True, ids[:0], w[:0]), ValueError, "x must not be empty"),
        (("x", gate, 2, True, ids, w), TypeError, "x must be a torch.Tensor"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            L.route_softmax(*args)
