"""Peer engines that bench/moe_layer.py runs beside hybrid on the very same MoE layer.

A peer is a module in this package with one function, `measure(spec: LayerSpec) -> dict`, that
builds the layer from `spec`'s weights in the peer's own format, times it with the same threads,
tokens and routing as hybrid, and returns the figures named in RESULT_KEYS (None where the peer
cannot say). A peer that runs the weights in more than one way (ggml: INT4 as exact Q4_0 and as
requantised Q4_K) returns a list of such dicts, one per way; `measure` below always gives a list.
When the peer is not installed, or cannot run this layer on this machine, it raises PeerSkipped
with a sentence a user can act on; moe_layer.py prints it in the table.

Every peer also returns `check_y`: its output for spec.check_x, so the bench can tell a peer that
runs a different layer (wrong packing, wrong scale) from one that is merely fast.

Legend: E experts, K picked per token, H hidden, I expert width, B tokens, C check tokens.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

# name -> module under bench.peers (imported only when asked for: peers pull heavy packages)
PEERS = {
    "ggml": "ggml_moe",          # ggml_mul_mat_id through the libggml llama-cpp-python ships
    "kt-kernel": "kt_kernel_moe",  # KTransformers' kt-kernel, in its own venv, as a subprocess
}

RESULT_KEYS = (
    "engine",          # str: what ran, e.g. "ggml Q4_K (CPU_REPACK)"
    "weights",         # str: how spec's weights reached the peer, e.g. "INT4 -> Q4_0, exact"
    "decode_ms",       # float: median of spec.runs, B = 1, spec.decode_ids[r] per run
    "decode_gbps",     # float: the peer's own bytes of the K experts read / decode time
    "prefill_tok_s",   # float: median of spec.runs, B tokens with spec.prefill_ids / _w
    "check_y",         # numpy fp32 [C, H]: the peer's output for check_x, check_ids, check_w
)


class PeerSkipped(Exception):
    """The peer cannot run here; str(exc) says why, in words a user can act on."""


@dataclass
class LayerSpec:
    """One MoE layer as every engine in a bench run sees it.

    Weights come as a bank of a few distinct experts; expert e is bank[e % len(bank)] (a full
    K2.5 layer of distinct random experts would not fit twice in this machine's RAM). Each bank
    entry is (gate, up, down):
      fmt "int4": each of the three is (qweight int32 [N, Kin/8] compressed-tensors nibbles,
                  scale fp32 [N, Kin/32] holding bf16-exact values), Kimi's INT4 g32 symmetric:
                  w[n, k] = scale[n, k // 32] * q[n, k], q in -8..7, nibble j of word k // 8 is k % 8
      fmt a GGUF type (q4_k, ...): each is uint8 [N, row bytes] of that type's blocks (gate and up
                  in fmt, down in down_fmt), as a GGUF file stores the expert's rows
    with gate, up [I, H] and down [H, I] (row-major, out x in, as F.linear takes them).
    """

    fmt: str
    down_fmt: str
    experts: int       # E
    hidden: int        # H
    intermediate: int  # I
    topk: int          # K
    tokens: int        # B for prefill
    threads: int
    runs: int
    bank: list = field(repr=False)
    decode_x: list = field(repr=False)     # [runs + 1] of fp32 [1, H] (the first is the warm-up)
    decode_ids: list = field(repr=False)   # [runs + 1] of int32 [1, K], fresh experts each run
    #                                        (routing weights 1/K, as hybrid's decode runs)
    prefill_x: object = field(repr=False)  # fp32 [B, H]
    prefill_ids: object = field(repr=False)  # int32 [B, K]
    prefill_w: object = field(repr=False)    # fp32 [B, K], rows sum to 1
    check_x: object = field(repr=False)      # fp32 [C, H]
    check_ids: object = field(repr=False)    # int32 [C, K]
    check_w: object = field(repr=False)      # fp32 [C, K]


def measure(name: str, spec: LayerSpec) -> list[dict]:
    """Run peer `name` on spec: its results, one per way it ran the weights; raises PeerSkipped
    (not installed, cannot run here) or KeyError."""
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    try:
        mod = importlib.import_module(f"{__name__}.{PEERS[name]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(__name__):
            raise PeerSkipped(f"{name}: not built into this checkout ({exc.name})") from None
        raise
    out = mod.measure(spec)
    out = [out] if isinstance(out, dict) else list(out)
    for r in out:
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise RuntimeError(f"peer {name} returned no {', '.join(missing)}")
    return out
