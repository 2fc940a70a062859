"""ggml's own MoE kernel on the bench's layer: ggml_mul_mat_id for gate, up and down, ggml's SwiGLU,
the routing weights multiplied in and the K expert outputs summed, as llama.cpp's build_moe_ffn
builds a deepseek2 layer's routed experts, on ggml's CPU backend through the libggml that
llama-cpp-python ships (bench/peers/ggml_lib.py).

Weights. A GGUF --format gives ggml the very rows hybrid packs (spec.bank). INT4 (Kimi's
compressed-tensors g32) runs twice: repacked into Q4_0 (d = the group's scale as fp16, nibble =
q + 8: the same values, exact when every bf16 scale is an fp16 value, which is checked and said),
and quantised to Q4_K by ggml itself (ggml_quantize_chunk on the dequantised weights, no imatrix),
the type most Kimi GGUF files use for their experts (that one is not exact: its check difference
includes Q4_K's rounding).

Buffers. Each weight tensor goes to the first buffer type that runs MUL_MAT_ID on it, extra ones
(CPU_REPACK: interleaved rows for AVX2/AVX-512 GEMM kernels) before plain CPU, which is how
llama.cpp's loader places weights by default; the engine string says which ran. On x86 ggml
repacks Q4_0, Q4_K, IQ4_NL (and Q2_K with AVX-512); the other types run from plain CPU memory.

Threads: ggml_backend_cpu_set_n_threads(spec.threads); this libggml is built with OpenMP, so its
workers are OpenMP's (persistent across calls), as in llama.cpp, and each graph node ends in an
OpenMP barrier. libgomp's default is to spin at a barrier: on a loaded machine (more runnable
threads than cores) a spinning worker holds the core its late partner needs, and every barrier
costs a time slice (a 0.7 ms decode took 140 ms on this 2-core host at load 8). Run the bench with
OMP_WAIT_POLICY=passive there; the engine string shows the policy when it is set. Decode routing
weights are 1/K, as hybrid's decode runs.

Legend: E experts, K picked per token, H hidden, I expert width, T tokens, N rows, G groups of 32.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from . import PeerSkipped
from .ggml_lib import TYPE, Ggml, GgmlMissing, InitParams

GRAPH_NODES = 64  # 3 mul_mat_id, swiglu, mul, K views and K - 1 adds, for K up to ~28


def ct_nibbles(qweight: np.ndarray) -> np.ndarray:
    """uint8 [N, Kin] of compressed-tensors INT4 nibbles (q + 8), from int32 [N, Kin / 8]."""
    w = np.ascontiguousarray(qweight).view(np.uint32)
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return ((w[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(w.shape[0], -1)


def int4_to_q4_0(qweight: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint8 [N, G x 18] Q4_0 rows of the same values, count of scales fp16 does not hold exactly).

    Q4_0 block (ggml block_q4_0): fp16 d, then 16 bytes whose low nibbles are inputs 0-15 and high
    nibbles 16-31, w = d x (nibble - 8): Kimi's rule with the same nibbles."""
    nib = ct_nibbles(qweight)                                        # [N, Kin]
    n, g = scale.shape
    nib = nib.reshape(n, g, 32)
    qs = nib[:, :, :16] | (nib[:, :, 16:] << 4)                      # [N, G, 16]
    d = scale.astype(np.float16)                                     # [N, G]
    inexact = int(np.count_nonzero(d.astype(np.float32) != scale))
    rows = np.concatenate([d.view(np.uint8).reshape(n, g, 2), qs], axis=2)
    return rows.reshape(n, g * 18), inexact


def int4_dequant(qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp32 [N, Kin]: scale[n, k // 32] x (nibble - 8), exact."""
    nib = ct_nibbles(qweight).astype(np.float32) - 8
    return (nib.reshape(scale.shape[0], scale.shape[1], 32) * scale[:, :, None]).reshape(nib.shape)


def quantize(g: Ggml, fmt: str, w: np.ndarray) -> np.ndarray:
    """uint8 [N, row bytes]: ggml's own quantiser (ggml_quantize_chunk, no imatrix) of fp32 [N, Kin]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    n, k = w.shape
    out = np.empty((n, g.ggml_row_size(TYPE[fmt], k)), np.uint8)
    wrote = g.ggml_quantize_chunk(TYPE[fmt], w.ctypes.data, out.ctypes.data, 0, n, k, None)
    if wrote != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk({fmt}) wrote {wrote} bytes, expected {out.nbytes}")
    return out


def variants(g: Ggml, spec):
    """Yields (weights label, gate/up type, down type, bank of (gate, up, down) uint8 rows) for
    each way spec's weights reach ggml; built lazily so that one variant's rows are alive at once."""
    if spec.fmt != "int4":
        yield f"the same {spec.fmt.upper()} blocks" + (
            f" (down {spec.down_fmt.upper()})" if spec.down_fmt != spec.fmt else ""), \
            spec.fmt, spec.down_fmt, spec.bank
        return
    bank, inexact, total = [], 0, 0
    for ex in spec.bank:
        rows = []
        for q, s in ex:
            r, bad = int4_to_q4_0(q, s)
            rows.append(r)
            inexact, total = inexact + bad, total + s.size
        bank.append(tuple(rows))
    label = "INT4 -> Q4_0, exact" if inexact == 0 else \
        f"INT4 -> Q4_0, NOT exact: {inexact} of {total} scales rounded to fp16"
    yield label, "q4_0", "q4_0", bank
    del bank
    bank = [tuple(quantize(g, "q4_k", int4_dequant(q, s)) for q, s in ex) for ex in spec.bank]
    yield "INT4 -> Q4_K by ggml_quantize_chunk (requantised: check includes Q4_K rounding)", \
        "q4_k", "q4_k", bank


class GgmlMoE:
    """One routed-expert layer in ggml: gate, up [H, I, E] and down [I, H, E] (ggml's ne order:
    inputs, outputs, experts), each in the first buffer type that runs MUL_MAT_ID on it, and one
    compute graph per token count (cached)."""

    def __init__(self, g: Ggml, spec, fmt: str, down_fmt: str, bank):
        self.g, self.E, self.H, self.I, self.K = g, spec.experts, spec.hidden, spec.intermediate, spec.topk
        self.backend = g.ggml_backend_cpu_init()
        if not self.backend:
            raise RuntimeError("ggml_backend_cpu_init failed")
        g.ggml_backend_cpu_set_n_threads(self.backend, spec.threads)
        self.dev = g.ggml_backend_get_device(self.backend)
        self.cpu_buft = g.ggml_backend_cpu_buffer_type()
        self._ctxs, self._bufs, self._graphs = [], [], {}
        self.placed = {}  # weight name -> (type, buffer type name)
        self.weights = {}
        for j, (name, t, n_in, n_out) in enumerate((("gate", fmt, self.H, self.I), ("up", fmt, self.H, self.I),
                                                    ("down", down_fmt, self.I, self.H))):
            self.weights[name] = self._weight(name, t, n_in, n_out, [ex[j] for ex in bank])
        self.expert_nbytes = sum(g.ggml_nbytes(w) for w in self.weights.values()) // self.E

    # ---- weights ------------------------------------------------------------------------------

    def _ctx(self, n_tensors: int, graph: bool = False):
        mem = self.g.ggml_tensor_overhead() * n_tensors + (
            self.g.ggml_graph_overhead_custom(GRAPH_NODES, False) if graph else 0)
        ctx = self.g.ggml_init(InitParams(mem, None, True))
        if not ctx:
            raise RuntimeError("ggml_init failed")
        self._ctxs.append(ctx)
        return ctx

    def _runs_mul_mat_id(self, buft, t: str, n_in: int, n_out: int) -> bool:
        """Does buft run MUL_MAT_ID on a [n_in, n_out, E] weight of type t? Asked of the device with
        a two-expert tensor allocated there, as llama.cpp's loader asks with a dummy buffer."""
        g = self.g
        if buft == self.cpu_buft:
            return True
        wctx, actx = self._ctx(1), self._ctx(3)
        w = g.ggml_new_tensor_3d(wctx, TYPE[t], n_in, n_out, 2)
        buf = g.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
        if not buf:
            return False
        try:
            b = g.ggml_new_tensor_3d(actx, TYPE["f32"], n_in, self.K, 512)  # not allocated: host input
            ids = g.ggml_new_tensor_2d(actx, TYPE["i32"], self.K, 512)
            return bool(g.ggml_backend_dev_supports_op(self.dev, g.ggml_mul_mat_id(actx, w, b, ids)))
        finally:
            g.ggml_backend_buffer_free(buf)

    def _weight(self, name: str, t: str, n_in: int, n_out: int, bank_rows: list):
        g = self.g
        rb = g.ggml_row_size(TYPE[t], n_in)
        for rows in bank_rows:
            if rows.shape != (n_out, rb) or rows.dtype != np.uint8:
                raise ValueError(f"{name}: bank rows {rows.dtype} {rows.shape}, expected uint8 ({n_out}, {rb}) "
                                 f"of {t}")
        bufts = g.extra_bufts(self.backend) + [self.cpu_buft]
        buft = next(b for b in bufts if self._runs_mul_mat_id(b, t, n_in, n_out))
        ctx = self._ctx(1)
        w = g.ggml_new_tensor_3d(ctx, TYPE[t], n_in, n_out, self.E)
        buf = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if not buf:
            raise MemoryError(f"ggml could not allocate {name} ({g.ggml_nbytes(w) / 1e9:.1f} GB)")
        self._bufs.append(buf)
        # One whole-tensor write, as llama.cpp's loader does: a repacking buffer takes no partial
        # writes. Expert e is bank[e % len(bank)], each slot its own memory.
        src = np.empty((self.E, n_out, rb), np.uint8)                # [E, N, row bytes]
        for e in range(self.E):
            src[e] = bank_rows[e % len(bank_rows)]
        g.ggml_backend_tensor_set(w, src.ctypes.data, 0, src.nbytes)
        del src
        self.placed[name] = (t, g.ggml_backend_buft_name(buft).decode())
        return w

    def engine(self) -> str:
        (gt, gb), (_, ub), (dt, db) = self.placed["gate"], self.placed["up"], self.placed["down"]
        head = f"ggml {gt.upper()} ({gb if gb == ub else gb + ' gate, ' + ub + ' up'})"
        head = head if (dt, db) == (gt, gb) else f"{head}, down {dt.upper()} ({db})"
        wait = os.environ.get("OMP_WAIT_POLICY")
        return f"{head} OMP_WAIT_POLICY={wait}" if wait else head

    # ---- graphs -------------------------------------------------------------------------------

    def _graph(self, T: int):
        """(graph, x [H, T], ids [K, T], w [1, K, T], out [H, T]) for T tokens, built once."""
        if T in self._graphs:
            return self._graphs[T]
        g, H, K = self.g, self.H, self.K
        f32 = TYPE["f32"]
        ctx = self._ctx(2 * K + 16, graph=True)
        x = g.ggml_new_tensor_2d(ctx, f32, H, T)
        ids = g.ggml_new_tensor_2d(ctx, TYPE["i32"], K, T)
        w = g.ggml_new_tensor_3d(ctx, f32, 1, K, T)
        for t in (x, ids, w):
            g.ggml_set_input(t)
        gf = g.ggml_new_graph_custom(ctx, GRAPH_NODES, False)
        cur = g.ggml_reshape_3d(ctx, x, H, 1, T)                              # [H, 1, T]
        up = g.ggml_mul_mat_id(ctx, self.weights["up"], cur, ids)            # [I, K, T]
        gate = g.ggml_mul_mat_id(ctx, self.weights["gate"], cur, ids)        # [I, K, T]
        h = g.ggml_swiglu_split(ctx, gate, up)                               # [I, K, T] silu(gate) * up
        ex = g.ggml_mul_mat_id(ctx, self.weights["down"], h, ids)            # [H, K, T]
        ex = g.ggml_mul(ctx, ex, w)                                          # [H, K, T] x weights
        g.ggml_build_forward_expand(gf, ex)
        views = []
        for k in range(K):  # expert k of every token: [H, T], row stride H x K floats
            views.append(g.ggml_view_2d(ctx, ex, H, T, H * K * 4, k * H * 4))
            g.ggml_build_forward_expand(gf, views[-1])
        out = views[0]
        for v in views[1:]:
            out = g.ggml_add(ctx, out, v)                                    # [H, T]
            g.ggml_build_forward_expand(gf, out)
        if K == 1:
            out = g.ggml_cont(ctx, out)
        g.ggml_set_output(out)
        g.ggml_build_forward_expand(gf, out)
        galloc = g.ggml_gallocr_new(self.cpu_buft)
        if not galloc or not g.ggml_gallocr_alloc_graph(galloc, gf):
            raise MemoryError(f"ggml could not allocate the compute buffer for {T} tokens")
        self._graphs[T] = (gf, x, ids, w, out, galloc)
        return self._graphs[T]

    def set_inputs(self, x: np.ndarray, ids: np.ndarray, w: np.ndarray):
        """x fp32 [T, H], ids int32 [T, K], w fp32 [T, K] into the T-token graph; returns it."""
        T = x.shape[0]
        gr = self._graph(T)
        for t, a, dt in ((gr[1], x, np.float32), (gr[2], ids, np.int32), (gr[3], w, np.float32)):
            a = np.ascontiguousarray(a, dtype=dt)
            self.g.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)
        return gr

    def compute(self, gr) -> None:
        status = self.g.ggml_backend_graph_compute(self.backend, gr[0])
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute failed (ggml_status {status})")

    def output(self, gr, T: int) -> np.ndarray:
        y = np.empty((T, self.H), np.float32)                                # [T, H]
        self.g.ggml_backend_tensor_get(gr[4], y.ctypes.data, 0, y.nbytes)
        return y

    def __call__(self, x, ids, w) -> np.ndarray:
        gr = self.set_inputs(x, ids, w)
        self.compute(gr)
        return self.output(gr, x.shape[0])

    def close(self) -> None:
        g = self.g
        for gr in self._graphs.values():
            g.ggml_gallocr_free(gr[5])
        for buf in self._bufs:
            g.ggml_backend_buffer_free(buf)
        for ctx in self._ctxs:
            g.ggml_free(ctx)
        g.ggml_backend_free(self.backend)
        self._graphs, self._bufs, self._ctxs = {}, [], []


def measure_layer(moe: GgmlMoE, spec) -> dict:
    """Timings and check output of one built layer, with spec's tokens and routing."""
    K = spec.topk
    decs = []
    for r in range(spec.runs + 1):  # run 0 is the warm-up
        x, ids = spec.decode_x[r], spec.decode_ids[r]
        w = np.full((1, K), 1.0 / K, np.float32)
        t0 = time.perf_counter()
        moe(x, ids, w)
        if r:
            decs.append(time.perf_counter() - t0)
    dec = statistics.median(decs)
    B = spec.prefill_x.shape[0]
    gr = moe.set_inputs(spec.prefill_x, spec.prefill_ids, spec.prefill_w)
    moe.compute(gr)  # warm-up
    pres = []
    for _ in range(spec.runs):
        t0 = time.perf_counter()
        moe.compute(gr)
        pres.append(time.perf_counter() - t0)
    pre = statistics.median(pres)
    return {
        "engine": moe.engine(),
        "decode_ms": dec * 1e3,
        "decode_gbps": K * moe.expert_nbytes / dec / 1e9,
        "prefill_tok_s": B / pre,
        "check_y": moe(spec.check_x, spec.check_ids, spec.check_w),
        "expert_mb": moe.expert_nbytes / 1e6,
    }


def measure(spec) -> list[dict]:
    """One result per way spec's weights reach ggml (two for INT4, one for a GGUF type)."""
    try:
        g = Ggml()
    except GgmlMissing as exc:
        raise PeerSkipped(f"ggml: {exc}") from None
    from .ggml_lib import TYPE

    missing = [f for f in {spec.fmt, spec.down_fmt} if f != "int4" and f not in TYPE]
    if missing:  # the IQ lattice types: ggml has them, this peer's type table does not yet
        raise PeerSkipped(f"ggml: this peer does not map {', '.join(sorted(missing))} to a ggml type "
                          f"(bench/peers/ggml_lib.py TYPE)")
    out = []
    for label, fmt, down_fmt, bank in variants(g, spec):
        moe = GgmlMoE(g, spec, fmt, down_fmt, bank)
        del bank
        try:
            out.append({"weights": label, **measure_layer(moe, spec)})
        finally:
            moe.close()
    return out
