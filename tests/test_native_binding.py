"""The binding checks every argument before anything runs: dtype, shape, contiguity, expert id
range, buffer sizes; errors are TypeError / ValueError naming the argument, and a rejected call
leaves the operator usable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from native_ref import random_experts

from hybrid import native
from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
E, H, I, B, K = 16, 64, 32, 3, 4


@pytest.fixture(scope="module")
def moe():
    rng = np.random.default_rng(0)
    return CpuMoE(PackedLayer.from_float(*random_experts(rng, E, H, I), format="int8"))


def good():
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((B, H)).astype(np.float32),
        "ids": rng.integers(0, E, (B, K)).astype(np.int32),
        "weights": rng.random((B, K)).astype(np.float32),
        "skip_mask": np.zeros(E, dtype=bool),
    }


def strided(a):
    """Same shape and dtype as a, not contiguous (every other element of a wider array)."""
    wide = np.zeros(a.shape[:-1] + (a.shape[-1] * 2,), dtype=a.dtype)
    return wide[..., ::2]


BAD = [
    ("x", lambda a: a.astype(np.float64), TypeError, "x must have dtype float32 or bf16"),
    ("x", lambda a: a.astype(np.float16), TypeError, "x must have dtype float32 or bf16"),
    ("x", lambda a: a[:, :-16].copy(), ValueError, r"x must have shape \[\*, 64\]"),
    ("x", lambda a: a[0].copy(), ValueError, "x must be"),
    ("x", strided, ValueError, "x must be C-contiguous"),
    ("x", lambda a: a.tolist(), TypeError, "x must be a numpy array or a torch tensor"),
    ("ids", lambda a: a.astype(np.float32), TypeError, "ids must have dtype int32 or int64"),
    ("ids", lambda a: a.astype(np.int16), TypeError, "ids must have dtype int32 or int64"),
    ("ids", lambda a: a[:-1].copy(), ValueError, r"ids must have shape \[3, \*\]"),
    ("ids", lambda a: a[:, :0].copy(), ValueError, "at least one pick"),
    ("ids", strided, ValueError, "ids must be C-contiguous"),
    ("ids", lambda a: np.where(np.arange(K) == 2, E, a).astype(np.int32), ValueError,
     r"ids\[0, 2\] = 16 is out of range \[0, 16\)"),
    ("ids", lambda a: np.where(np.arange(K) == 1, -1, a).astype(np.int64), ValueError,
     r"ids\[0, 1\] = -1 is out of range"),
    ("weights", lambda a: a.astype(np.float64), TypeError, "weights must have dtype float32"),
    ("weights", lambda a: a[:, :-1].copy(), ValueError, r"weights must have shape \[3, 4\]"),
    ("weights", strided, ValueError, "weights must be C-contiguous"),
    ("skip_mask", lambda a: a.astype(np.int32), TypeError, "skip_mask must have dtype bool or uint8"),
    ("skip_mask", lambda a: a[:-1].copy(), ValueError, r"skip_mask must have shape \[16\]"),
    ("skip_mask", lambda a: np.zeros((E, 2), bool)[:, 0], ValueError, "skip_mask must be C-contiguous"),
]


@pytest.mark.parametrize("arg,bad,exc,msg", BAD, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD)])
def test_submit_rejects(moe, arg, bad, exc, msg):
    kw = good()
    kw[arg] = bad(kw[arg])
    with pytest.raises(exc, match=msg):
        moe.forward(**kw)
    assert not moe.pending
    y = moe.forward(**good())  # still usable
    assert y.shape == (B, H)


def test_torch_specific_rejections(moe):
    kw = good()
    with pytest.raises(TypeError, match="weights: torch dtype"):
        moe.forward(kw["x"], kw["ids"], torch.zeros((B, K)).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="weights must have dtype float32"):
        moe.forward(kw["x"], kw["ids"], torch.zeros((B, K), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        moe.forward(torch.from_numpy(kw["x"]).t().contiguous().t(), kw["ids"], kw["weights"])


def test_output_buffer_checks(moe):
    """The raw binding takes y from the caller: size, dtype, writability, aliasing are checked."""
    kw = good()
    op = N.MoE(moe.layer._h, "fast", 0, "")
    args = (kw["x"], kw["ids"], kw["weights"], None)
    with pytest.raises(ValueError, match=r"y must have shape \[3, 64\]"):
        op.submit(*args, np.zeros((B, H - 16), np.float32))
    with pytest.raises(TypeError, match="y must have dtype"):
        op.submit(*args, np.zeros((B, H), np.float64))
    ro = np.zeros((B, H), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y must be writable"):
        op.submit(*args, ro)
    with pytest.raises(ValueError, match="y must not be the same buffer as x"):
        op.submit(kw["x"], kw["ids"], kw["weights"], None, kw["x"])
    assert not op.pending


def test_bf16_and_accumulating_outputs(moe):
    kw = good()
    ref = moe.forward(**kw)
    op = N.MoE(moe.layer._h, "fast", 0, "")
    y = np.full((B, H), 1.5, np.float32)
    op.submit(kw["x"], kw["ids"], kw["weights"], kw["skip_mask"], y, accumulate=True)
    op.sync()
    np.testing.assert_allclose(y, ref + 1.5, rtol=1e-6, atol=1e-6)
    yb = torch.zeros((B, H), dtype=torch.bfloat16)
    op.submit(kw["x"], kw["ids"], kw["weights"], kw["skip_mask"], yb.view(torch.int16).numpy().view(np.uint16))
    op.sync()
    np.testing.assert_allclose(yb.float().numpy(), ref, rtol=2**-8, atol=1e-6)  # bf16 rounding


def test_out_argument(moe):
    kw = good()
    ref = moe.forward(**kw)
    out = torch.ones((B, H))
    assert moe.forward(torch.from_numpy(kw["x"]), kw["ids"], kw["weights"], kw["skip_mask"], out=out,
                       accumulate=True) is out
    np.testing.assert_allclose(out.numpy(), ref + 1, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"out must have shape \[3, 64\]"):
        moe.forward(**kw, out=np.zeros((B, 2 * H), np.float32))
    with pytest.raises(ValueError, match="accumulate=True needs an out= buffer"):
        moe.forward(**kw, accumulate=True)


def test_constructor_checks(moe):
    with pytest.raises(TypeError, match="layer must be a PackedLayer"):
        CpuMoE("layer.packed")
    with pytest.raises(ValueError, match="mode must be 'fast' or 'precise'"):
        CpuMoE(moe.layer, mode="quick")
    with pytest.raises(ValueError, match="threads must be a positive int"):
        CpuMoE(moe.layer, threads=0)
    with pytest.raises(ValueError, match="ISA 'sse9' cannot run here: unknown ISA"):
        CpuMoE(moe.layer, isa="sse9")


KQ = np.zeros(16 * 64 // 2, np.uint8)  # one int4 block, K = 64
KS = np.zeros(16 * 2, np.uint16)
X = np.zeros((2, 64), np.float32)

KERNEL_BAD = [
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ[:-1], KS, 16, 64, X), ValueError, r"qweight must have shape \[512\]"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ.view(np.int8), KS, 16, 64, X), TypeError, "qweight must have dtype uint8"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, None, 16, 64, X), ValueError, "scales are required"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, KS[:-1], 16, 64, X), ValueError, r"scales must have shape \[32\]"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, KS, 24, 64, X), ValueError, "multiple of 16"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, KS, 16, 48, X), ValueError, "multiple of 32"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, KS, 16, 64, X[:, :32].copy()), ValueError, r"x must have shape \[\*, 64\]"),
    (lambda: NT.kernel_matmul_f32("scalar", "int4", KQ, KS, 16, 64, X, 0, 2), ValueError, r"block range"),
    (lambda: NT.kernel_matmul_f32("scalar", "int5", KQ, KS, 16, 64, X), ValueError, "format must be"),
    (lambda: NT.kernel_matmul_a8("scalar", "bf16", KQ, None, 16, 64, X, X, X), ValueError, "int4 or int8"),
    (lambda: NT.kernel_matmul_a8("scalar", "int4", KQ, KS, 16, 64, X, X[:, :2].copy(), X[:, :2].copy()), TypeError, "q must have dtype int8"),
    (lambda: NT.kernel_quantize_row_a8("scalar", X[:, :40].copy()), ValueError, "multiple of 32"),
    (lambda: NT.kernel_matmul_a16("scalar", KQ, 16, 32, X[:, :32].copy()), ValueError, "matmul_a16"),
    (lambda: N.quantize_pack(np.zeros((16, 64), np.float64), "int4"), TypeError, "w must have dtype float32 or bf16"),
    (lambda: N.pack_int4_from_ct(np.zeros((16, 8), np.int32), np.zeros((16, 3), np.uint16)), ValueError,
     r"weight_scale must have shape \[16, 2\]"),
]


@pytest.mark.parametrize("call,exc,msg", KERNEL_BAD, ids=[str(i) for i in range(len(KERNEL_BAD))])
def test_kernel_entries_reject(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_layer_checks(moe):
    with pytest.raises(ValueError, match="expert index 16 is out of range"):
        moe.layer.unpack_expert(16)
    with pytest.raises(ValueError, match="format must be"):
        N.Layer.create("fp8", 2, 64, 64)
    with pytest.raises(ValueError, match=r"num_experts must be in 1\.\.65536"):
        N.Layer.create("int4", 0, 64, 64)


def test_layer_read_bandwidth():
    """The plain read of some experts' own pages (bench/moe_layer.py's decode_pages_gbps): every
    byte of each listed expert, once per repeat; a bad expert id or repeat count is refused."""
    native_layer = N.Layer.create("int4", E, H, I)
    r = native_layer.read_bandwidth([0, 3, 3], 2)
    assert r["bytes"] == 3 * native_layer.expert_nbytes and len(r["runs"]) == 2 and r["gbps"] > 0
    with pytest.raises(ValueError, match="expert index 16 is out of range"):
        native_layer.read_bandwidth([16])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        native_layer.read_bandwidth([0], 0)
    with pytest.raises(ValueError, match="no regions"):
        native_layer.read_bandwidth([])


def test_test_entry_points_only_in_the_testing_module():
    """hybrid._native (what users load) has none of the test-only entry points; they are in
    hybrid._native_testing, which shares its core library (one thread pool: a pool test job runs
    on the pool N.set_num_threads sizes)."""
    test_only = {"kernel_entries", "kernel_quantize_row_a8", "kernel_matmul_a8", "kernel_matmul_f32",
                 "kernel_matmul_a16", "reference_matmul_a16", "kernel_gemv_t_bf16", "pool_test_job", "PoolTestJob",
                 "inject_fault"}
    assert not test_only & set(dir(N)) and not hasattr(N.MoE, "inject_fault")
    assert test_only <= set(dir(NT))
    before = N.num_threads()
    N.set_num_threads(1)
    try:
        job = NT.pool_test_job(2)
        job.wait()
        assert job.phase_counts == [1, 1]
    finally:
        N.set_num_threads(before)
