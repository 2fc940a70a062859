"""Layerwise prefill (hybrid/experts/layer_stream.py, hybrid/runtime/layerwise.py, the cost
model's prefill rule): on the CPU, with the device ops in their torch form and the streams as
in-order no-ops.

- the rule on numbers: K2.5 on the reference workstation, PCIe 4 x16 (25 GB/s) vs 5 x16
  (50 GB/s); the VRAM budget counts the two layer buffers or says why they are off;
- the double buffer: which buffer holds which layer, and which event each copy and kernel
  waits for (HostStreams' log);
- the logits: a tiny checkpoint prefilled layerwise equals the CPU engine's prefill within
  1e-4 (fp32), chunk by chunk, with the threshold crossed by some chunks and not others and
  chunks so short that most experts get no token; once with the Triton kernel interpreted.
"""

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU

from checkpoints import build  # noqa: E402

from hybrid import native  # noqa: E402
from hybrid.models.spec import load_model_spec  # noqa: E402
from hybrid.planner.cost import CostModel, reference_workstation  # noqa: E402
from hybrid.planner.device_memory import PREFILL_CHUNK, activation_bytes, layerwise_bytes  # noqa: E402
from hybrid.planner.plan import compute_budget, layerwise_need  # noqa: E402

needs_native = pytest.mark.skipif(not native.available(), reason="hybrid._native is not built")


# ---- the rule on numbers ----------------------------------------------------------------------

def spec_facts():
    return load_model_spec("kimi-k2.5").facts


def _k25(pcie_gbps: float, vram="24GiB"):
    spec = load_model_spec("kimi-k2.5")
    m = dataclasses.replace(reference_workstation(vram), pcie_gbps=pcie_gbps)
    cost = CostModel(spec, m, layerwise_prefill=True)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    return cost, np.full((L, E), K / E), np.zeros((L, E), dtype=bool)


def test_threshold_k25_pcie4_vs_pcie5():
    c4, freq, mask = _k25(25.0)
    c5, _, _ = _k25(50.0)
    t4, t5 = c4.layerwise_threshold(freq, mask), c5.layerwise_threshold(freq, mask)
    # A layer's 384 experts are 9.5 GB: 0.38 s over PCIe 4, while the CPU's 40 T op/s take
    # 8 x 88 MFLOP / 40e12 = 17.6 us per token and layer, plus the hidden states' round trip
    # over PCIe (4 x 7168 B per token): about 15K tokens break even. PCIe 5 halves the copy but
    # not the unpack, the pinned fill or the round trip: about 9.6K.
    assert 12_000 < t4 < 20_000 and 7_000 < t5 < 12_000, (t4, t5)
    assert 0.5 < t5 / t4 < 0.75
    for cost, t in ((c4, t4), (c5, t5)):
        below, above = cost.prefill(freq, mask, t - 1), cost.prefill(freq, mask, t)
        assert below["mode"] == "cpu" and above["mode"] == "layerwise"
        assert above["tok_s"] == above["tok_s_layerwise"] > above["tok_s_cpu"]
        assert below["tok_s"] == below["tok_s_cpu"] >= below["tok_s_layerwise"]
    off = dataclasses.replace(c4, layerwise_prefill=False)
    assert off.layerwise_threshold(freq, mask) is None
    assert off.prefill(freq, mask, 10 * t4)["mode"] == "cpu"


def test_budget_counts_the_two_layer_buffers():
    small, _, _ = _k25(25.0, "24GiB")
    b = compute_budget(small, 32768)
    assert b.layerwise_bytes == 0 and "two layer buffers and a" in b.layerwise_note
    big, _, _ = _k25(50.0, "141GiB")
    b = compute_budget(big, 32768)
    buffers = layerwise_bytes(384, big.gpu_expert_bytes, big.cpu_expert_bytes)
    need, t = layerwise_need(big, 32768)
    assert buffers > 2 * 384 * 24e6 and t > PREFILL_CHUNK
    # the buffers, and a threshold-sized chunk's activations beyond the 512 tokens' counted
    acts = [activation_bytes(spec_facts(), n, 2) for n in (t, PREFILL_CHUNK)]
    assert b.layerwise_bytes == need == buffers + acts[0] - acts[1] and acts[0] - acts[1] > 2**30
    assert layerwise_need(big, t - 1) == (0, None)   # a context under the threshold: nothing streams
    without = compute_budget(dataclasses.replace(big, layerwise_prefill=False), 32768)
    assert without.slots - b.slots == pytest.approx(need / big.gpu_expert_bytes, abs=1)
    assert any("layerwise prefill" in line for line in b.lines())


# ---- the double buffer ------------------------------------------------------------------------

def _packed_layers(n, fmt="int4", E=8, H=64, I=32, seed=0):
    from hybrid.experts.cpu_moe import PackedLayer

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = [torch.randn(E, *s, generator=g) * 0.1 for s in ((I, H), (I, H), (H, I))]
        out.append(PackedLayer.from_float(*w, format=fmt))
    return out


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_double_buffer_holds_each_layer_and_waits_on_its_events(fmt):
    from hybrid.experts.layer_stream import HostStreams, LayerStreamer

    layers = _packed_layers(5, fmt)
    streams = HostStreams()
    st = LayerStreamer(layers, "cpu", torch.float32, streams=streams, group=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g)
    ids = torch.randint(0, 8, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    for rnd in range(2):   # two chunks: the second starts with buffers holding layers 3 and 4
        streams.log.clear()
        st.begin()
        assert st.held == [0, 1]
        for j in range(5):
            ex = st.executor(j)
            ex.submit(x, ids, w)
            y = ex.sync()
            # Buffer j % 2 held layer j: the result is layer j's own experts' (CpuMoE precise).
            from hybrid.experts.cpu_moe import CpuMoE

            ref = CpuMoE(layers[j], mode="precise")(x, ids.int(), w)
            assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), (fmt, j)
            assert st.held[j % 2] == (j + 2 if j + 2 < 5 else j)
        with pytest.raises(RuntimeError, match="buffer"):
            st.acquire(0)   # layers run in order after begin()
        log = streams.log
        for j in range(5):
            ready = log.index(("record", "copy", f"ready {j}"))
            assert log.index(("wait", "compute", f"ready {j}")) > ready   # kernel j waits for copy j
            done = log.index(("record", "compute", f"done {j}"))
            if j + 2 < 5:   # copy j + 2 into the same buffer waits for kernel j, after it
                wait = log.index(("wait", "copy", f"done {j}"))
                assert done < wait < log.index(("record", "copy", f"ready {j + 2}"))
                # and the host refills staging j % 2 only after copy j is read out of it
                assert ready < log.index(("host_wait", "host", f"ready {j}")) < wait
        if rnd == 1:   # a new chunk's copies wait for the last kernels on their buffers
            assert log.index(("wait", "copy", "done 4")) < log.index(("record", "copy", "ready 0"))
            assert log.index(("wait", "copy", "done 3")) < log.index(("record", "copy", "ready 1"))


@needs_native
def test_gguf_layers_stay_on_the_cpu_path():
    from hybrid.experts.layer_stream import check_streamable

    class Fake:
        format = up_format = down_format = "q4_k"
        num_experts, hidden, intermediate = 8, 256, 256

    with pytest.raises(ValueError, match="GGUF block types stay on the CPU path"):
        check_streamable([Fake()])


# ---- the logits -------------------------------------------------------------------------------

def _machine_with_threshold(spec, want: int):
    """A MachineSpec whose PCIe rate puts the tiny model's threshold near `want` tokens."""
    from hybrid.planner.cost import local_machine

    base = dataclasses.replace(local_machine(measure=False), gpu_present=True,
                               cpu_matmul_tops=1e-3, cpu_read_gbps=50.0, gpu_tflops=1e3,
                               gpu_mem_gbps=1e4, layer_overhead_us=0.0)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    freq, mask = np.full((L, E), K / E), np.zeros((L, E), dtype=bool)
    lo, hi = 1e-6, 1e3
    for _ in range(60):   # bisect the PCIe rate (a faster one lowers the threshold)
        mid = (lo * hi) ** 0.5
        t = CostModel(spec, dataclasses.replace(base, pcie_gbps=mid),
                      layerwise_prefill=True).layerwise_threshold(freq, mask, 4096)
        lo, hi = (mid, hi) if t is None or t > want else (lo, mid)
    return dataclasses.replace(base, pcie_gbps=hi)


def _prefill_chunks(net, cfg, ids, chunks, lw=None):
    """Logits of every position, the prompt fed in `chunks` (sizes), and the mode of each."""
    cache = net.make_cache(1, ids.numel())
    out, modes, at = [], [], 0
    for n in chunks:
        pos = torch.arange(at, at + n)
        if lw is None:
            out.append(net.forward(ids[at:at + n], pos, torch.zeros_like(pos), cache))
            modes.append("cpu")
        else:
            with lw.chunk(n) as mode:
                out.append(net.forward(ids[at:at + n], pos, torch.zeros_like(pos), cache))
            modes.append(mode)
        at += n
    return torch.cat(out), modes


@needs_native
@pytest.mark.parametrize("variant,backend", [("int4", "torch"), ("plain", "torch"), ("int4", "triton")])
def test_layerwise_logits_equal_cpu_prefill(tmp_path, monkeypatch, variant, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HYBRID_DEVICE_OPS", "torch")
    from checkpoints import load_model

    from hybrid.config import read_config_json
    from hybrid.experts.layer_stream import LayerStreamer
    from hybrid.models.spec import spec_from_config
    from hybrid.runtime.layerwise import attach_layerwise

    path, _ = build(tmp_path, variant=variant, seed=3, shards=1)
    kw = dict(experts_backend="cpu", mode="precise", layerwise_prefill=False)
    if variant == "plain":
        kw["expert_format"] = "int8"
    cfg, net = load_model(path, "cpu", torch.float32, **kw)
    raw, where = read_config_json(path)
    spec = spec_from_config(raw, model_id="tiny", where=where)
    machine = _machine_with_threshold(spec, 12)
    lw = attach_layerwise(net, True, "cpu", torch.float32, machine, None, spec=spec)
    if backend == "triton":   # the same rule over a streamer whose kernel is the Triton one
        layers = [m.host_experts().layer for m in net.moe_layers().values()]
        lw = lw.with_streamer(LayerStreamer(layers, "cpu", torch.float32, backend="triton"))
    t = lw.threshold
    assert t is not None and 4 <= t <= 40, t
    # chunks below, at and above the threshold; a 2-token chunk streams nothing (16 picks of 64
    # experts), a t-token chunk leaves most of the 64 experts without a token
    chunks = [t - 1, t, 2, t + 5] if backend == "torch" else [t, 3]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (sum(chunks),), generator=g)
    ref, _ = _prefill_chunks(net, cfg, ids, chunks)
    seen = []   # the experts each chunk's tokens picked in the first MoE layer
    first = next(iter(net.moe_layers().values()))
    def watch(layer, i):
        seen.append(int(i.unique().numel()))

    first.add_observer(on_routing=watch)
    got, modes = _prefill_chunks(net, cfg, ids, chunks, lw)
    first.remove_observer(watch)
    streamed = [n for n, m in zip(seen, modes) if m == "layerwise"]
    assert streamed and min(streamed) < cfg.n_routed_experts   # experts with no token streamed too
    want_modes = ["layerwise" if n >= t else "cpu" for n in chunks]
    assert modes == want_modes and "cpu" in modes + ["cpu"] and "layerwise" in modes
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, err
    assert lw.predict(t)["mode"] == "layerwise" and lw.predict(t - 1)["mode"] == "cpu"


@needs_native
def test_load_option_runs_in_model_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_DEVICE_OPS", "torch")
    import hybrid

    path, _ = build(tmp_path, variant="int4", seed=4, shards=1)
    base = hybrid.load(path, device="cpu", dtype=torch.float32, progress=False)
    assert base.layerwise() is None   # auto: off on the CPU
    lw_model = hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, layerwise_prefill=True)
    lw = lw_model.layerwise()
    assert lw is not None and lw.streamer.nbytes > 0
    ids = list(range(2, 40))
    ref, got = base.logits(ids), lw_model.logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="layerwise_prefill"):
        hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, layerwise_prefill="yes")
    from hybrid.models import config_from_dir, facts_of
    from hybrid.runtime.memory import check_fits

    need = check_fits(facts_of(config_from_dir(path)), path, "cpu", torch.float32, {}, max_len=512).total
    with pytest.raises(ValueError, match="layer buffers need"):   # the load fits, the buffers not
        hybrid.load(path, device="cpu", dtype=torch.float32, progress=False, layerwise_prefill=True,
                    max_vram=need + 1000)


@needs_native
def test_long_chunks_activations_bound_the_chunk(tmp_path, monkeypatch):
    """A layerwise chunk holds more tokens than the PREFILL_CHUNK the load counted activations
    for: what the layer buffers leave of the device memory bounds it (Model.layerwise_chunks),
    and layerwise is refused when not even the threshold's activations fit."""
    import hybrid
    from hybrid.config import read_config_json
    from hybrid.models import config_from_dir, facts_of
    from hybrid.models.spec import spec_from_config
    from hybrid.planner.device_memory import PREFILL_CHUNK, activation_bytes, layerwise_bytes
    from hybrid.runtime import layerwise as layerwise_module
    from hybrid.runtime.memory import check_fits

    path, _ = build(tmp_path, variant="int4", seed=4, shards=1)
    raw, where = read_config_json(path)
    machine = _machine_with_threshold(spec_from_config(raw, model_id="tiny", where=where), 900)
    monkeypatch.setattr(layerwise_module, "machine_for", lambda prof, device=None: machine)
    kw = dict(device="cpu", dtype=torch.float32, progress=False, max_len=4096, layerwise_prefill=True)
    unbounded = hybrid.load(path, **kw)
    t, most = unbounded.layerwise_chunks()
    assert PREFILL_CHUNK < t <= 900 and most is None, (t, most)   # no max_vram: unbounded
    facts = facts_of(config_from_dir(path))
    need = check_fits(facts, path, "cpu", torch.float32, {}, max_len=4096).total
    layer = unbounded.layerwise().streamer.layers[0]
    buffers = layerwise_bytes(layer.num_experts, layer.expert_nbytes, layer.expert_nbytes)

    def extra(tokens):
        return activation_bytes(facts, tokens, 4, {}) - activation_bytes(facts, PREFILL_CHUNK, 4, {})

    want = t + t // 3
    model = hybrid.load(path, max_vram=need + buffers + extra(want), **kw)
    assert model.layerwise_chunks() == (t, want)
    model = hybrid.load(path, max_vram=need + buffers + extra(4 * t), **kw)
    assert model.layerwise_chunks() == (t, 2 * t - 1)   # the engine's chunks never exceed 2t - 1
    with pytest.raises(ValueError, match=f"a chunk of {t} tokens"):
        hybrid.load(path, max_vram=need + buffers + extra(t) - 1, **kw)


@needs_native
def test_engine_reads_a_long_prompt_in_layerwise_chunks(tmp_path, monkeypatch):
    """The engine (serve / chat / run) makes chunks that reach the model's threshold when nothing
    decodes, and keeps its per-step budget beside a decoding request. The user's prefill_chunk
    (4 here) stands in for the 512 default, the tiny threshold for K2.5's 15K."""
    monkeypatch.setenv("HYBRID_DEVICE_OPS", "torch")
    import hybrid
    from checkpoints import add_tokenizer

    from hybrid.config import read_config_json
    from hybrid.engine import Engine, SamplingParams
    from hybrid.models.spec import spec_from_config
    from hybrid.runtime import layerwise as layerwise_module

    path, _ = build(tmp_path, variant="int4", seed=4, shards=1)
    raw, where = read_config_json(path)
    add_tokenizer(path, raw["vocab_size"])
    machine = _machine_with_threshold(spec_from_config(raw, model_id="tiny", where=where), 12)
    monkeypatch.setattr(layerwise_module, "machine_for", lambda prof, device=None: machine)
    kw = dict(device="cpu", dtype=torch.float32, progress=False, max_len=128)
    model = hybrid.load(path, layerwise_prefill=True, **kw)
    t, most = model.layerwise_chunks()
    assert t == model.layerwise().threshold and 4 <= t <= 12 and most is None, (t, most)
    log = model.layerwise().streamer.streams.log   # HostStreams: a streamed chunk copies layer 0
    steps = []   # (tokens, mode) of each forward
    forward, go = model.forward, threading.Event()   # a step waits for go

    def recording(input_ids, *args, **kwargs):
        assert go.wait(timeout=10), "test gate never opened"
        before = log.count(("record", "copy", "ready 0"))
        out = forward(input_ids, *args, **kwargs)
        streamed = log.count(("record", "copy", "ready 0")) > before
        steps.append((input_ids.numel(), "layerwise" if streamed else "cpu"))
        return out

    monkeypatch.setattr(model, "forward", recording)
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    long, other = torch.randint(2, raw["vocab_size"], (2, 3 * t + 2), generator=g).tolist()
    go.set()
    with Engine(model, max_seqs=2, prefill_chunk=4) as eng:
        # alone: t, t, then the t + 2 left (under 2t: no CPU-path tail), all layerwise
        alone = eng.generate(long, greedy, max_tokens=4)
        assert steps == [(t, "layerwise"), (t, "layerwise"), (t + 2, "layerwise")] + [(1, "cpu")] * 3
        # beside a decoding request: the budget of 4 prompt tokens per step, on the CPU path
        # (held at the gate, the first can make no token before the second is in: it decodes
        # for 60 steps, the second's prompt takes at most 10 of them)
        del steps[:]
        go.clear()
        decoding = eng.submit([5, 6], greedy, max_tokens=60)
        handle = eng.submit(other, greedy, max_tokens=4)
        go.set()
        mixed = handle.result().token_ids
        assert len(decoding.result().token_ids) == 60
    assert all(n <= 1 + 4 and mode == "cpu" for n, mode in steps), steps
    assert (1 + 4, "cpu") in steps
    with Engine(hybrid.load(path, layerwise_prefill=False, **kw), max_seqs=1, prefill_chunk=4) as ref:
        assert ref.generate(long, greedy, max_tokens=4) == alone   # layerwise changed no token
        assert ref.generate(other, greedy, max_tokens=4) == mixed


def test_doctor_says_where_layerwise_fits():
    from hybrid.commands.doctor import _layerwise_line
    from hybrid.planner.expect import expectations
    from hybrid.planner.units import fmt_bytes

    spec = load_model_spec("kimi-k2.5")
    small = expectations(spec, reference_workstation("24GiB"))["layerwise_prefill"]
    assert not small["fits"] and "off (its two layer buffers and a" in _layerwise_line(small, fmt_bytes)
    assert small["chunk_activation_bytes"] > 2**30
    big = expectations(spec, reference_workstation("80GiB"))["layerwise_prefill"]
    assert big["fits"] and big["threshold_tokens"] > 0
    assert f">= {big['threshold_tokens']} tokens" in _layerwise_line(big, fmt_bytes)


def test_h2d_probe_needs_a_cuda_device():
    from hybrid import hardware

    if torch.cuda.is_available():
        assert hardware.h2d_bandwidth_gbps(0, 1 << 20, 1) > 0
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            hardware.h2d_bandwidth_gbps()
