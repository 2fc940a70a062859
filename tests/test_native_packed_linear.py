"""The packed-weight linear (hybrid.native.packed_linear, csrc/core/dense.h's dense_packed): every
ISA this machine runs against the exact product of the unpacked weight and the int8-rounded
activations (the kernels' own rounding: weights exact, activations quantised per 32 inputs), for
the GGUF block types and INT4, decode and prefill shapes, threaded and not; and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from hybrid import native  # noqa: E402

if not native.available():
    pytest.skip("hybrid._native is not built", allow_module_level=True)

from gguf.constants import GGMLQuantizationType as QT  # noqa: E402

from hybrid import _native_testing as NT  # noqa: E402
from test_native_gguf import bound, fmt_of, modest_f16, random_blocks  # noqa: E402

N = native.lib()
ISAS = N.available_isas()
TYPES = [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.Q2_K, QT.IQ4_XS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_M]


def packed(t: QT, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = random_blocks(rng, t, n, k, modest_f16(t))
    q, s = N.pack_gguf(rows, fmt_of(t), n, k)
    w = N.unpack(fmt_of(t), q, s, n, k).astype(np.float64)  # [N, K], exact
    qt = torch.from_numpy(q)
    st = torch.from_numpy(s.view(np.int16)) if s.size else None
    return qt, st, w


def rounded(x: torch.Tensor) -> np.ndarray:
    """x bf16 [T, K] as the kernels see it: int8 per 32 inputs times the group's scale."""
    xq, xs, _ = NT.kernel_quantize_row_a8("scalar", x.float().numpy())
    return xq.astype(np.float64) * np.repeat(xs, 32, axis=1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t", TYPES, ids=fmt_of)
@pytest.mark.parametrize("T", [1, 3, 17])
def test_packed_linear_matches_unpacked(isa, t, T):
    n, k = 48, 512
    q, s, w = packed(t, n, k, seed=T)
    x = torch.randn(T, k).to(torch.bfloat16)
    xd = rounded(x)
    y = native.packed_linear(q, s, fmt_of(t), n, k, x, torch.empty(T, n), isa=isa)  # fp32 out
    err = np.abs(y.numpy() - xd @ w.T)
    assert (err <= bound(w, xd)).all(), f"{isa} {t.name} T={T}: max error {err.max()}"
    yb = native.packed_linear(q, s, fmt_of(t), n, k, x, isa=isa)  # bf16 out: one rounding of the same sums
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, y.to(torch.bfloat16))


def test_packed_linear_threads_split_gives_the_same_bits():
    n, k = 4096, 1024  # Q8_0: 4.5 MB packed, over the 4 MiB from which the pool is used
    q, s, w = packed(QT.Q8_0, n, k, seed=1)
    x = torch.randn(5, k).to(torch.bfloat16)
    one = native.packed_linear(q, s, "q8_0", n, k, x, torch.empty(5, n), threads=False)
    many = native.packed_linear(q, s, "q8_0", n, k, x, torch.empty(5, n), threads=True)
    assert torch.equal(one, many)
    xd = rounded(x)
    assert (np.abs(one.numpy() - xd @ w.T) <= bound(w, xd)).all()


def test_packed_linear_errors():
    q, s, _ = packed(QT.Q4_0, 32, 64, seed=0)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(TypeError, match="qweight must have dtype torch.uint8"):
        native.packed_linear(q.view(torch.int8), s, "q4_0", 32, 64, x)
    with pytest.raises(ValueError, match="qweight must have shape"):
        native.packed_linear(q[:-1], s, "q4_0", 32, 64, x)
    with pytest.raises(ValueError, match="scales are required"):
        native.packed_linear(q, None, "q4_0", 32, 64, x)
    with pytest.raises(ValueError, match="inputs per row"):
        native.packed_linear(q, s, "q4_0", 32, 64, torch.randn(2, 32).to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        native.packed_linear(q, s, "q4_0", 32, 64, x, torch.empty(2, 16))
    with pytest.raises(TypeError, match="x must"):
        native.packed_linear(q, s, "q4_0", 32, 64, x.float())
    with pytest.raises(ValueError, match="not bf16"):
        native.packed_linear(q, s, "bf16", 32, 64, x)
    with pytest.raises(ValueError):
        native.packed_linear(q, s, "q4_k", 32, 64, x)  # K types need K % 256 == 0
