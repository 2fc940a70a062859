"""Random valid GGUF blocks of the types the native kernels run, for measurements: the doctor's
expert-kernel probe (hybrid/runtime/measure.py) and the benches (bench/moe_layer.py,
bench/kernel_speed.py) time the kernels on them. The kernels' speed does not depend on the values;
the fp16 fields are set so the weights are of a trained model's size (~0.002-0.02), finite and
normal (no subnormal slow paths).

GGUF_BLOCK: per type (inputs per block, bytes per block, byte offsets of the block's fp16 fields
(ggml's block_* structs), the largest |sub-scale x quant| of a random block, which the fp16
fields are divided by). IQ1_M keeps its fp16 d in the top nibbles of its 4 scale words.
"""

from __future__ import annotations

GGUF_BLOCK = {
    "q4_0": (32, 18, (0,), 8), "q8_0": (32, 34, (0,), 128),
    "q4_k": (256, 144, (0, 2), 63 * 15), "q5_k": (256, 176, (0, 2), 63 * 31), "q6_k": (256, 210, (208,), 128 * 32),
    "q3_k": (256, 110, (108,), 32 * 4), "q2_k": (256, 84, (80, 82), 15 * 3), "iq4_xs": (256, 136, (0,), 32 * 127),
    # the lattice types (any grid index is valid)
    "iq2_xxs": (256, 66, (0,), 31 * 43 / 8), "iq2_xs": (256, 74, (0,), 31 * 43 / 8),
    "iq3_xxs": (256, 98, (0,), 31 * 62 / 4), "iq1_s": (256, 50, (0,), 15 * 9 / 8), "iq1_m": (256, 56, (), 15 * 9 / 8),
}
GGUF_FORMATS = tuple(GGUF_BLOCK)


def gguf_row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of k inputs of type fmt."""
    bs, ts = GGUF_BLOCK[fmt][:2]
    return k // bs * ts


def gguf_rows(rng, fmt: str, n: int, k: int):
    """uint8 [n, row bytes] of random valid `fmt` blocks (random bits, fp16 fields of weight size);
    rng: a numpy Generator."""
    import numpy as np

    bs, ts, f16, span = GGUF_BLOCK[fmt]
    rows = rng.integers(0, 256, size=(n, k // bs, ts), dtype=np.uint8)
    for at in f16:
        d = (rng.uniform(0.002, 0.02, size=(n, k // bs)) / span).astype(np.float16)
        rows[:, :, at:at + 2] = d.view(np.uint8).reshape(n, k // bs, 2)
    if fmt == "iq1_m":  # nibble i of d's fp16 bits in the top nibble of scale word i (bytes 48..55)
        d = (rng.uniform(0.002, 0.02, size=(n, k // bs)) / span).astype(np.float16).view(np.uint16)
        sc = rows[:, :, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for i in range(4):
            sc[:, :, i] |= ((d >> np.uint16(4 * i)) & np.uint16(15)) << np.uint16(12)
        rows[:, :, 48:56] = sc.view(np.uint8)
    return rows.reshape(n, -1)
