"""The native-boundary area: every bound function of hybrid._native called with valid arguments
of a random small size, then one or two of them replaced by a wrong one (dtype, shape, a strided
or transposed view, a read-only or aliased output, None, a scalar, an out-of-range number). The
binding must answer TypeError / ValueError / RuntimeError / OverflowError / IndexError with a
message, or compute; never a signal.

Each CALLS entry: name -> builder(rng) returning (function, [arguments]); arguments are mutated
by position.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from hybrid import native

L = native.lib()
ACCEPT = ("TypeError", "ValueError", "RuntimeError", "OverflowError", "IndexError")


def _np(rng: random.Random, shape, dtype=np.float32):
    g = np.random.default_rng(rng.randrange(2**32))
    a = g.standard_normal(shape).astype(np.float32)
    return a.astype(dtype) if dtype != np.uint16 else (a.view(np.uint32) >> 16).astype(np.uint16)


def _t(rng: random.Random, shape, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(shape, generator=g).to(dtype)


def _dims(rng):
    return 16 * rng.randint(1, 3), 32 * rng.randint(1, 3)


def quantize_pack(rng):
    n, k = _dims(rng)
    return L.quantize_pack, [_np(rng, (n, k)), rng.choice(["int4", "int8", "bf16"])]


def unpack(rng):
    n, k = _dims(rng)
    fmt = rng.choice(["int4", "int8", "bf16"])
    q, s = L.quantize_pack(_np(rng, (n, k)), fmt)
    return L.unpack, [fmt, q, s, n, k]


def pack_int4_from_ct(rng):
    n, k = _dims(rng)
    g = np.random.default_rng(rng.randrange(2**32))
    return L.pack_int4_from_ct, [g.integers(-2**31, 2**31, (n, k // 8), dtype=np.int64).astype(np.int32),
                                 _np(rng, (n, k // 32), np.uint16)]


def dense_gemv(rng):
    n, k = _dims(rng)
    t = rng.randint(1, 3)
    return L.dense_gemv, [_np(rng, (n, k), np.uint16), _np(rng, (t, k), np.uint16), np.empty((t, n), np.float32),
                          rng.choice(["", "scalar", *L.available_isas()]), rng.random() < 0.5]


def dense_gemv_torch(rng):
    n, k = _dims(rng)
    t = rng.randint(1, 3)
    return L.dense_gemv_torch, [_t(rng, (n, k)), _t(rng, (t, k)), rng.choice([None, torch.empty(t, n)]), "", True]


def rms_norm(rng):
    t, h = rng.randint(1, 4), 32 * rng.randint(1, 4)
    x = _t(rng, (t, h))
    return L.rms_norm, [x, _t(rng, (h,)), 1e-6, torch.empty_like(x), rng.choice([None, _t(rng, (t, h))])]


def route(rng):
    t, h, e = rng.randint(1, 4), 32, 16
    k = rng.randint(1, 4)
    return L.route, [_t(rng, (t, h)), _t(rng, (e, h), torch.float32), rng.choice([None, _t(rng, (e,), torch.float32)]),
                     4, 2, k, True, 2.5, torch.empty(t, k, dtype=torch.int32), torch.empty(t, k)]


def route_softmax(rng):
    t, h, e = rng.randint(1, 4), 32, 16
    k = rng.randint(1, 4)
    return L.route_softmax, [_t(rng, (t, h)), _t(rng, (e, h), torch.float32), k, rng.random() < 0.5,
                             torch.empty(t, k, dtype=torch.int32), torch.empty(t, k)]


def mla_decode(rng):
    nh, d, r, v, c, s, lmax = rng.randint(1, 3), 16, 16, 16, 32, 2, 64
    t = rng.randint(1, 2)
    return L.mla_decode, [
        _t(rng, (t, nh * (d + r))), _t(rng, (t, c + r)), _t(rng, (c,)), torch.rand(t, r // 2), torch.rand(t, r // 2),
        _t(rng, (s, lmax, c + r)), torch.arange(t) % s, torch.full((t,), rng.randint(0, lmax - 1)),
        _t(rng, (nh * (d + v), c)), torch.empty(t, nh * v, dtype=torch.bfloat16), nh, d, v, 1e-6, 0.3,
        rng.random() < 0.5]


def _layer(rng, fmt=None):
    e, h, i = rng.randint(1, 3), 32 * rng.randint(1, 3), 32 * rng.randint(1, 3)
    return L.Layer.create(fmt or rng.choice(["int4", "int8", "bf16"]), e, h, i), e, h, i


def layer_create(rng):
    e, h, i = rng.randint(1, 4), 32 * rng.randint(1, 3), 32 * rng.randint(1, 3)
    return L.Layer.create, [rng.choice(["int4", "int8", "bf16"]), e, h, i]


def pack_expert_float(rng):
    layer, e, h, i = _layer(rng)
    return layer.pack_expert_float, [rng.randrange(e), _np(rng, (i, h)), _np(rng, (i, h)), _np(rng, (h, i))]


def unpack_expert(rng):
    layer, e, _, _ = _layer(rng)
    return layer.unpack_expert, [rng.randrange(e)]


def moe_submit(rng):
    layer, e, h, i = _layer(rng)
    moe = L.MoE(layer, rng.choice(["fast", "precise"]), rng.randint(0, 2), "", rng.random() < 0.5)
    b, k = rng.randint(1, 5), rng.randint(1, 3)
    g = np.random.default_rng(rng.randrange(2**32))

    def submit_and_sync(*args):
        moe.submit(*args)
        moe.sync()

    return submit_and_sync, [_np(rng, (b, h)), g.integers(0, e, (b, k)).astype(np.int32),
                             _np(rng, (b, k)), rng.choice([None, np.zeros(e, np.bool_)]),
                             np.empty((b, h), np.float32), rng.random() < 0.3]


def moe_create(rng):
    layer, _, _, _ = _layer(rng)
    return L.MoE, [layer, rng.choice(["fast", "precise"]), rng.randint(0, 4), rng.choice(["", "scalar"]),
                   rng.random() < 0.5]


def pool(rng):
    which = rng.randrange(3)
    if which == 0:
        return L.split_units, [rng.randint(0, 100), [0] * rng.randint(1, 4)]
    if which == 1:
        return L.set_sync_threads, [rng.randint(-2, 4)]
    return L.read_bandwidth, [rng.choice([4096, 1 << 16]), 1]


CALLS = {f.__name__: f for f in (quantize_pack, unpack, pack_int4_from_ct, dense_gemv, dense_gemv_torch, rms_norm,
                                 route, route_softmax, mla_decode, layer_create, pack_expert_float, unpack_expert,
                                 moe_submit, moe_create, pool)}

_SCALARS = [None, -1, 0, 1, 3, 2**31, 2**62, -(2**62), 10**30, math.nan, math.inf, -0.0, "", "int4", "fast",
            True, [], [1, 2], object()]


def _wrong_array(rng: random.Random, a, others):
    is_t = isinstance(a, torch.Tensor)
    op = rng.randrange(10)
    if op == 0:
        return a.to(rng.choice([torch.float64, torch.int8, torch.float16, torch.bool, torch.int64, torch.float32,
                                torch.bfloat16])) if is_t else \
            a.astype(rng.choice([np.float64, np.int8, np.float16, np.bool_, np.uint16, np.int64, np.float32]))
    if op == 1 and a.ndim >= 1:
        return a[..., : max(0, a.shape[-1] - rng.choice([1, 16, a.shape[-1]]))]
    if op == 2:
        return a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1)
    if op == 3 and a.ndim >= 2:
        return a.T if not is_t else a.t() if a.ndim == 2 else a.transpose(0, 1)
    if op == 4 and a.ndim >= 1 and a.shape[-1] >= 2:
        return a[..., ::2]
    if op == 5:
        return a[None] if rng.random() < 0.5 else (a[0] if a.ndim else a)
    if op == 6 and not is_t:
        b = a.copy()
        b.setflags(write=False)
        return b
    if op == 7 and others:
        return rng.choice(others)  # an alias of another argument
    if op == 8:
        return a.numpy() if is_t and a.dtype != torch.bfloat16 else torch.from_numpy(a) if not is_t else a.float()
    return rng.choice(_SCALARS)


def build(rng: random.Random):
    """-> (call name, function, arguments): a valid call, then 1-2 arguments replaced."""
    name = rng.choice(sorted(CALLS))
    fn, args = CALLS[name](rng)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(args))
        a = args[i]
        arrays = [x for x in args if isinstance(x, (np.ndarray, torch.Tensor)) and x is not a]
        if isinstance(a, (np.ndarray, torch.Tensor)):
            args[i] = _wrong_array(rng, a, arrays)
        elif isinstance(a, bool) or isinstance(a, (int, float, str)) or a is None:
            args[i] = rng.choice(_SCALARS + ([rng.choice(arrays)] if arrays else []))
        else:
            args[i] = rng.choice(_SCALARS)
    return name, fn, args
