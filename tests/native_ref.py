"""float64 numpy references for the native engine's tests (tests/test_native_*.py).

Legend: B tokens, K picks, E experts, H hidden, I expert width, N rows, G = 32 inputs/group.
"""

from __future__ import annotations

import numpy as np

G = 32


def quant_a8(v: np.ndarray) -> np.ndarray:
    """The int8 activation rule of quantize_row_a8 (kernels.h), returned dequantised, float64:
    per row and group of 32, scale = amax / 127, q = round_half_even(v * 127 / amax)."""
    v = np.asarray(v, dtype=np.float32)
    shape = v.shape
    g = v.reshape(-1, G)
    amax = np.abs(g).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(g * inv), -127, 127)
    return (q.astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(shape)


def bf16_round(v: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 (nearest even), returned as float64."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def moe_reference(experts, x, ids, weights, skip=None, act=None) -> np.ndarray:
    """y [B, H] float64. experts: per expert (gate [I, H], up [I, H], down [H, I]) arrays (the
    dequantised packed weights); act(v): activation rounding applied to x and to h (None: exact)."""
    x = np.asarray(x, dtype=np.float64)
    B, K = ids.shape
    H = x.shape[1]
    y = np.zeros((B, H))
    xa = x if act is None else act(x.astype(np.float32))
    for b in range(B):
        for k in range(K):
            e = int(ids[b, k])
            if skip is not None and skip[e]:
                continue
            gate, up, down = experts[e]
            h = silu(gate @ xa[b]) * (up @ xa[b])
            if act is not None:
                h = act(h.astype(np.float32)[None])[0]
            y[b] += float(weights[b, k]) * (down @ h)
    return y


def rel_err(y, ref) -> float:
    """max |y - ref| / max |ref| (ref not all zero)."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(y, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def random_experts(rng, E, H, I, scale=None):
    """gate/up [E, I, H], down [E, H, I] float32 with Kaiming-like scale so activations stay O(1)."""
    sg = scale or 1.0 / np.sqrt(H)
    sd = scale or 1.0 / np.sqrt(I)
    gate = (rng.standard_normal((E, I, H)) * sg).astype(np.float32)
    up = (rng.standard_normal((E, I, H)) * sg).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) * sd).astype(np.float32)
    return gate, up, down
