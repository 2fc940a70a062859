"""Micro-benchmarks (pytest-benchmark) of hybrid's expert kernels on one expert: the decode GEMV
(B = 1) and the prefill GEMM (B tokens) of gate, up, SiLU and down, per weight format and per ISA
path this machine runs, through the extension's MoE with the expert as the one pick (top-1, weight 1).

    python -m pip install -e '.[bench]'          # pytest-benchmark
    python -m pytest bench/micro -p no:cacheprovider --benchmark-columns=median,min,max,rounds
    HYBRID_MICRO_FORMATS=int4,q4_k HYBRID_MICRO_ISAS=avx512_vnni python -m pytest bench/micro -k decode

Not part of the test run: pyproject's testpaths is tests/, so `python -m pytest tests` never
collects these; they time things, tests never do. extra_info of each benchmark holds the roofline
units from its median: decode gbps (packed bytes of the expert / time; the layer cycles through
enough experts (>= 256 MB) that each call reads its expert from RAM, as decode does) and prefill
gflops (2 x 3 x H x I x B / time; the expert's B tokens make it a GEMM), with fmt, isa, threads.
`--benchmark-json out.json` keeps them.

Settings (environment, defaults in brackets):
  HYBRID_MICRO_FORMATS   int4 and GGUF block types, comma-separated [int4,q4_0,q8_0,q4_k,q6_k]
  HYBRID_MICRO_ISAS      ISA paths [every one available but scalar, the slow reference]
  HYBRID_MICRO_HIDDEN / HYBRID_MICRO_INTERMEDIATE   H x I of the expert [7168 x 2048, Kimi K2.5]
  HYBRID_MICRO_TOKENS    prefill B [128]
  HYBRID_MICRO_ROUNDS    timed rounds per benchmark [20]
  HYBRID_NUM_THREADS     the extension's pool [one thread per core]

Weights are random: int4 / int8 quantised from random floats by the extension, GGUF types random
valid blocks (bench/moe_layer.py's gguf_rows). Speed does not depend on the values.

Legend: E experts in the layer, H hidden, I expert width, B tokens.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[bench]')")
native = pytest.importorskip("hybrid.native", reason="hybrid is not installed (pip install -e .)")
np = pytest.importorskip("numpy")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: moe_layer's GGUF block maker
import moe_layer  # noqa: E402

COLD_BYTES = 256 << 20  # the layer's size at least: beyond any last-level cache


def _env_list(name: str, default: list[str]) -> list[str]:
    v = os.environ.get(name, "")
    return [s.strip() for s in v.split(",") if s.strip()] or default


H = int(os.environ.get("HYBRID_MICRO_HIDDEN", 7168))
I = int(os.environ.get("HYBRID_MICRO_INTERMEDIATE", 2048))
B = int(os.environ.get("HYBRID_MICRO_TOKENS", 128))
ROUNDS = int(os.environ.get("HYBRID_MICRO_ROUNDS", 20))
FORMATS = _env_list("HYBRID_MICRO_FORMATS", ["int4", "q4_0", "q8_0", "q4_k", "q6_k"])


def _isas() -> list[str]:
    try:
        have = native.available_isas()
    except ImportError:  # the extension is not built: every benchmark skips in the fixture
        return ["unbuilt"]
    return _env_list("HYBRID_MICRO_ISAS", [i for i in have if i != "scalar"])


@functools.lru_cache(maxsize=None)
def _layer(fmt: str):
    """A packed layer of E copies of one random expert, E x expert bytes >= COLD_BYTES."""
    n = native.lib()
    rng = np.random.default_rng(0)
    probe = n.Layer.create(fmt, 1, H, I)
    E = max(2, -(-COLD_BYTES // probe.expert_nbytes))
    layer = n.Layer.create(fmt, E, H, I)
    layer.place()
    if fmt in moe_layer.GGUF_FORMATS:
        bank = (moe_layer.gguf_rows(rng, fmt, I, H), moe_layer.gguf_rows(rng, fmt, I, H),
                moe_layer.gguf_rows(rng, fmt, H, I))
        for e in range(E):
            layer.pack_expert_gguf(e, *bank)
    else:
        bank = tuple((rng.standard_normal(s, dtype=np.float32) * 0.02) for s in ((I, H), (I, H), (H, I)))
        for e in range(E):
            layer.pack_expert_float(e, *bank)
    return layer


@pytest.fixture(params=FORMATS)
def fmt(request):
    return request.param


@pytest.fixture(params=_isas())
def moe(request, fmt):
    if request.param == "unbuilt":
        pytest.skip("the C++ extension is not built (pip install -e .)")
    reason = native.lib().isa_unavailable_reason(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    layer = _layer(fmt)
    try:
        op = native.lib().MoE(layer, "fast", 0, request.param)
    except ValueError as exc:  # a format this path has no kernel for
        pytest.skip(f"{fmt} on {request.param}: {exc}")
    return layer, op


def _run(benchmark, layer, op, tokens: int):
    """Time top-1 calls on the next expert each round (submit + sync); returns the median seconds."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, H), dtype=np.float32)       # [B, H]
    y = np.zeros((tokens, H), np.float32)                        # [B, H]
    w = np.ones((tokens, 1), np.float32)                         # [B, 1]
    ids = [np.full((tokens, 1), e, np.int32) for e in range(layer.num_experts)]  # [B, 1] each
    turn = iter(range(1 << 62))

    def call():
        op.submit(x, ids[next(turn) % len(ids)], w, None, y)
        op.sync()

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(fmt=layer.format, down_fmt=layer.down_format, isa=op.isa, hidden=H,
                                intermediate=I, tokens=tokens, threads=native.num_threads(),
                                expert_mb=layer.expert_nbytes / 1e6, experts_cycled=layer.num_experts)
    return benchmark.stats.stats.median


def test_decode_gemv(benchmark, moe):
    layer, op = moe
    t = _run(benchmark, layer, op, 1)
    benchmark.extra_info["gbps"] = layer.expert_nbytes / t / 1e9


def test_prefill_gemm(benchmark, moe):
    layer, op = moe
    t = _run(benchmark, layer, op, B)
    benchmark.extra_info["gflops"] = 2.0 * 3 * H * I * B / t / 1e9
    benchmark.extra_info["gbps"] = layer.expert_nbytes / t / 1e9
