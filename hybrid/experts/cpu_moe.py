"""The CPU MoE engine's Python face: packed expert layers and the fused operator.

Legend: E experts, H hidden, I expert intermediate, B tokens, K picks per token.

    layer = PackedLayer.from_compressed_int4(gate_packed, gate_scale, up_packed, up_scale,
                                             down_packed, down_scale)   # per-expert sequences
    layer = PackedLayer.from_float(gate, up, down, format="int4")       # [E, I, H], [E, H, I]
    layer = PackedLayer.from_gguf(gate, up, down, gate_type, up_type, down_type)  # raw GGUF blocks
    layer.save(path); layer = PackedLayer.load(path)                    # file = packed layout, mmap
    moe = CpuMoE(layer, mode="fast")
    y = moe.forward(x, ids, weights, skip_mask=None)                    # [B, H] fp32
    moe.submit(x, ids, weights); ...; y = moe.sync()                    # asynchronous

Everything runs in csrc/ (hybrid._native); this module converts arguments (torch or numpy, no
copies) and keeps the arrays of a pending job alive until sync().
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from hybrid import native
from hybrid.experts.executor import Capabilities

FORMATS = ("int4", "int8", "bf16")  # from_float's formats
# The formats whose bytes the GPU expert cache (device_layout.compact_from_packed) reads bit for
# bit; it holds GGUF formats' experts dequantised (their scales are fp16 / sub-block tables).
DEVICE_CACHEABLE_FORMATS = FORMATS
# GGUF block types the native kernels run in their own bits (hybrid.native.GGUF_NATIVE, by ggml's
# type name); the packed layer's format of each is the name in lower case. GGUF_NATIVE_TYPES (the
# same as gguf.GGMLQuantizationType values) is built on first access, so importing this module
# does not import gguf.
GGUF_NATIVE = native.GGUF_NATIVE
MODES = ("fast", "precise")


def __getattr__(name: str):
    if name == "GGUF_NATIVE_TYPES":
        from gguf import GGMLQuantizationType  # noqa: PLC0415

        return frozenset(GGMLQuantizationType[n] for n in GGUF_NATIVE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _gguf_format(qtype, name: str) -> str:
    """The packed format of a GGUF tensor type (gguf.GGMLQuantizationType, its int value or its
    name); ValueError naming the tensor when the native kernels do not run that type."""
    from gguf import GGMLQuantizationType  # noqa: PLC0415

    try:
        t = GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{name}: {qtype!r} is not a GGUF tensor type") from None
    if t.name not in GGUF_NATIVE:
        raise ValueError(f"{name}: GGUF type {t.name} has no native CPU kernel (native: "
                         f"{', '.join(GGUF_NATIVE)})")
    return t.name.lower()

Progress = Callable[[int, int], None]  # progress(experts_done, experts_total)


def _seq(arg, name: str) -> Sequence:
    """A per-expert sequence: a list/tuple, or a stacked array/tensor (indexed on dim 0)."""
    if isinstance(arg, (list, tuple)):
        return arg
    shape = getattr(arg, "shape", None)
    if shape is None or len(shape) != 3:
        raise TypeError(f"{name} must be a sequence over experts or a stacked [E, rows, cols] "
                        f"array/tensor, got {type(arg).__name__} with shape {shape}")
    return arg


def _first_matrix(seq: Sequence, name: str, layout: str) -> tuple[int, int]:
    """(rows, cols) of the first expert's matrix in `seq`, which must be 2-D (`layout`)."""
    m = native.as_numpy(seq[0], f"{name}[0]")
    if m.ndim != 2:
        raise ValueError(f"{name}[0] must be {layout}, got shape {list(m.shape)}")
    return int(m.shape[0]), int(m.shape[1])


@contextmanager
def _naming_expert(e: int):
    """A packing error (ValueError/TypeError) raised again, prefixed with the expert it is about."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise type(err)(f"expert {e}: {err}") from err


def _fact(path: str, doc: str | None = None) -> property:
    """A read-only property that reads `path` (dotted, e.g. "_h.hidden") on the object."""
    return property(operator.attrgetter(path), doc=doc)


def _pack_each(pack, arrays: dict, E: int, progress: Progress | None) -> None:
    """pack(e, *arrays[k][e] in order) for every expert, naming the expert in any error."""
    for e in range(E):
        conv = [native.as_numpy(v[e], f"{k}[{e}]") for k, v in arrays.items()]
        with _naming_expert(e):
            pack(e, *conv)
        if progress is not None:
            progress(e + 1, E)


class PackedLayer:
    """One MoE layer's routed experts in the packed layout (csrc/core/packed_layer.h). The buffer is
    anonymous memory (from_*) or a read-only mmap of a packed layer file (load)."""

    def __init__(self, handle):
        self._h = handle  # hybrid._native.Layer

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_compressed_int4(cls, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale,
                             progress: Progress | None = None) -> "PackedLayer":
        """compressed-tensors pack-quantized INT4 group-32 experts (Kimi K2.5): per expert,
        weight_packed int32 [out, in/8] and weight_scale bf16 (or bf16-exact fp32) [out, in/32].
        The nibbles and scales are copied bit-exactly, never dequantised."""
        args = {"gate_packed": gate_packed, "gate_scale": gate_scale, "up_packed": up_packed,
                "up_scale": up_scale, "down_packed": down_packed, "down_scale": down_scale}
        seqs = {k: _seq(v, k) for k, v in args.items()}
        E = len(seqs["gate_packed"])
        for k, v in seqs.items():
            if len(v) != E:
                raise ValueError(f"{k} has {len(v)} experts, gate_packed has {E}")
        if E == 0:
            raise ValueError("gate_packed: no experts")
        I, H8 = _first_matrix(seqs["gate_packed"], "gate_packed", "[I, H/8]")
        h = native.lib().Layer.create("int4", E, H8 * 8, I)
        _pack_each(h.pack_expert_ct, seqs, E, progress)
        return cls(h)

    @classmethod
    def from_float(cls, gate, up, down, format: str = "int4",
                   progress: Progress | None = None) -> "PackedLayer":
        """Float experts (fp32 or bf16; torch or numpy), stacked gate/up [E, I, H] and down
        [E, H, I] or per-expert sequences of [I, H] / [H, I], quantised to `format`:
        int4 (compressed-tensors' symmetric group-32 rule), int8 (group 32) or bf16."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        gate, up, down = _seq(gate, "gate"), _seq(up, "up"), _seq(down, "down")
        E = len(gate)
        if E == 0 or len(up) != E or len(down) != E:
            raise ValueError(f"gate, up, down must hold the same number (>= 1) of experts, got "
                             f"{len(gate)}, {len(up)}, {len(down)}")
        I, H = _first_matrix(gate, "gate", "[I, H]")
        h = native.lib().Layer.create(format, E, H, I)
        _pack_each(h.pack_expert_float, {"gate": gate, "up": up, "down": down}, E, progress)
        return cls(h)

    @staticmethod
    def gguf_bytes(gate_type, up_type, down_type, num_experts: int, hidden: int, intermediate: int) -> int:
        """Bytes of the layer from_gguf packs from experts of these GGUF types, as the kernels'
        layout has them (csrc/core/packed_layer.cpp layer_layout): what RAM holds, not the file's
        bytes (the lattice types' tiles are larger: IQ1_S 1.16x, IQ2_XXS 1.12x)."""
        fmt = _gguf_format(gate_type, "gate")
        up_fmt, down_fmt = _gguf_format(up_type, "up"), _gguf_format(down_type, "down")
        total, _ = native.lib().Layer.layout_bytes(fmt, num_experts, hidden, intermediate, down_fmt, up_fmt)
        return int(total)

    @classmethod
    def from_gguf(cls, gate, up, down, gate_type, up_type, down_type,
                  progress: Progress | None = None) -> "PackedLayer":
        """Routed experts kept in their GGUF blocks, repacked losslessly (same values, the same
        fp16 scale bits) into the kernels' layout; never dequantised.

        gate, up: raw blocks of ffn_gate_exps / ffn_up_exps, uint8 (numpy or torch): stacked
            [E, I, row_bytes(H)], which is the shape of gguf's ReaderTensor.data for a quantised
            [H, I, E] tensor (a view of the mapped file: only the expert being packed is read), or
            a sequence over experts of [I, row_bytes(H)] arrays.
        down: ffn_down_exps the same way, [E, H, row_bytes(I)].
        gate_type, up_type, down_type: each tensor's gguf.GGMLQuantizationType (or its int value or
            name), each in GGUF_NATIVE_TYPES; any mix (gate and up of one type are interleaved into
            one matrix, of two types kept apart and run by two kernel calls). row_bytes(K) = K / block size x type size
            (gguf.GGML_QUANT_SIZES), so I is gate's row count and H down's. H and I must be
            multiples of 32, and of 256 where a K type (Q2_K..Q6_K, IQ4_XS, the IQ1/2/3 lattice types) has them as inputs
            (H for gate/up, I for down); every row count a multiple of 16.
        ValueError names the tensor and expert (and the sizes) for a type without a native
        kernel, mismatched expert counts or shapes, or rows of the wrong byte length."""
        fmt = _gguf_format(gate_type, "gate")
        up_fmt, down_fmt = _gguf_format(up_type, "up"), _gguf_format(down_type, "down")
        seqs = {"gate": _seq(gate, "gate"), "up": _seq(up, "up"), "down": _seq(down, "down")}
        E = len(seqs["gate"])
        if E == 0 or any(len(v) != E for v in seqs.values()):
            raise ValueError(f"gate, up, down must hold the same number (>= 1) of experts, got "
                             f"{', '.join(str(len(v)) for v in seqs.values())}")
        I, _ = _first_matrix(seqs["gate"], "gate", "[I, row bytes]")
        H, _ = _first_matrix(seqs["down"], "down", "[H, row bytes]")
        h = native.lib().Layer.create(fmt, E, H, I, down_fmt, up_fmt)
        _pack_each(h.pack_expert_gguf, seqs, E, progress)
        return cls(h)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PackedLayer":
        """mmap a packed layer file (read-only); the header is validated against the file
        (ValueError naming the file and field when it is not a valid packed layer file)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"packed layer file not found: {path!r}")
        return cls(native.lib().Layer.open(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write the packed layer file atomically (temp file in the same folder, fsync, rename)."""
        self._h.save(os.fspath(path))

    def place(self) -> None:
        """Touch every page from the thread (and NUMA node) that computes on it. Optional: pages
        are otherwise faulted in, wherever, on first use."""
        self._h.place()

    # ---- facts (the native layer's own) ------------------------------------------------------
    num_experts = _fact("_h.num_experts", "E (int)")
    hidden = _fact("_h.hidden", "H (int)")
    intermediate = _fact("_h.intermediate", "I (int)")
    format = _fact("_h.format", "gate's format: one of FORMATS, or a GGUF type in lower case (str)")
    up_format = _fact("_h.up_format", "up's format (str; from_gguf layers may differ from format)")
    down_format = _fact("_h.down_format", "down's format (str; from_gguf layers may differ from format)")
    nbytes = _fact("_h.nbytes", "Bytes of the whole layout (file size when saved).")
    expert_nbytes = _fact("_h.expert_nbytes", "Bytes of one expert (gate_up + down, weights + scales, page-padded).")

    @property
    def path(self) -> str | None:
        return self._h.path or None

    def unpack_expert(self, e: int):
        """Expert e dequantised: (gate [I, H], up [I, H], down [H, I]) float32 torch tensors."""
        import torch  # noqa: PLC0415

        if not isinstance(e, int) or isinstance(e, bool):
            e = int(e)
        g, u, d = self._h.unpack_expert(e)
        return torch.from_numpy(g), torch.from_numpy(u), torch.from_numpy(d)

    def expert_arrays(self, e: int):
        """Expert e's packed bytes (gate_up qweight uint8, gate_up scales uint16 or None, down
        qweight, down scales): read-only numpy views into the layer's buffer (kernels.h layout)."""
        return self._h.expert_arrays(int(e))

    def compact_expert(self, e: int, device="cpu"):
        """Expert e in its own bits (hybrid.experts.device_layout.CompactExpert): int4/int8 q
        and bf16 scales, or bf16 weights ("dense"), read from the packed layout without loss;
        its tensors on `device` (the packed bytes go there once and are unpacked there)."""
        from hybrid.experts.device_layout import CompactExpert, compact_from_packed  # noqa: PLC0415

        fmts = {self.format, self.up_format, self.down_format}
        if len(fmts) != 1 or self.format not in DEVICE_CACHEABLE_FORMATS:
            # GGUF blocks (fp16 scales, sub-block tables): the cache holds their exact dequantised
            # values as dense weights (in the compute dtype), as the planner counts them (bf16).
            return CompactExpert.dense(*(t.to(device) for t in self.unpack_expert(e)))
        arrays = self.expert_arrays(e)
        return compact_from_packed(self.format, arrays, self.hidden, self.intermediate, device)

    def __repr__(self) -> str:
        src = f", path={self.path!r}" if self.path else ""
        fmts = (self.format, self.up_format, self.down_format)
        fmt = self.format if len(set(fmts)) == 1 else "+".join(fmts)
        return (f"PackedLayer(format={fmt!r}, E={self.num_experts}, H={self.hidden}, "
                f"I={self.intermediate}, nbytes={self.nbytes}{src})")


class CpuMoE:
    """Fused routed-expert MoE of one layer on the CPU (csrc/core/moe.h).

    y[b] = sum_k weights[b, k] * down_e(SiLU(gate_e x[b]) * up_e x[b]),  e = ids[b, k],
    skipping experts with skip_mask[e] set (they run elsewhere, e.g. cached on the GPU).

    threads: pool threads this operator uses (None: all; more than the pool has grows the pool).
    caller: the thread that calls sync() computes a share of the job too (threads counts it, so
          the pool needs one worker fewer). For synchronous use on a CPU-only machine, where that
          thread would otherwise spin-wait on a core a worker needs: there a pool round trip took
          110 us with 2 workers + a waiting caller on 2 vCPUs, 6 us with 1 worker + the caller.
          submit() then only starts the workers; the caller's share runs in sync().
    mode: "fast" (int8 activations for int4/int8 weights, bf16 activations for bf16 weights
          where the CPU has avx512_bf16) or "precise" (fp32 activations and accumulation).
    isa:  None for the process's path (HYBRID_ISA or the best); a name forces one (tests).

    One job in flight per operator: submit() while this operator's previous job has not been
    sync()ed raises RuntimeError (nothing is started). sync() returns the y of the job submitted
    last, or None when nothing is pending. Several operators (layers, Python threads) may have
    jobs in flight at once: the shared thread pool runs them in submission order. Calls from
    several Python threads on one operator are safe (errors, never crashes); give each thread
    its own operator to get its own results.
    """

    def __init__(self, layer: PackedLayer, threads: int | None = None, mode: str = "fast",
                 isa: str | None = None, caller: bool = False):
        if not isinstance(layer, PackedLayer):
            raise TypeError(f"layer must be a PackedLayer, got {type(layer).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'fast' or 'precise', got {mode!r}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        n = native.lib()
        if threads is not None and threads > n.max_threads:
            raise ValueError(f"threads must be at most {n.max_threads}, got {threads}")
        workers = None if threads is None else threads - (1 if caller else 0)
        if workers and workers > n.num_threads():
            n.set_num_threads(workers)
        self.layer = layer
        self.caller = bool(caller)
        self._args = (threads, mode, isa)
        self._op = n.MoE(layer._h, mode, threads or 0, isa or "", self.caller)
        self._lock = threading.Lock()
        self._pending: tuple[Any, bool] | None = None  # (y, return torch)

    mode = _fact("_op.mode", "one of MODES (str)")
    isa = _fact("_op.isa", "the ISA path the operator runs (str)")
    pending = _fact("_op.pending", "a job is submitted and not yet sync()ed (bool)")
    num_experts = _fact("layer.num_experts", "E (int)")

    def capabilities(self) -> Capabilities:
        # caller: the thread that syncs computes a share, so nothing else may run on it meanwhile.
        return Capabilities(device="cpu", overlaps_caller=not self.caller, accumulates=True)

    def unpack_expert(self, e: int):
        return self.layer.unpack_expert(e)

    def compact_expert(self, e: int, device="cpu"):
        return self.layer.compact_expert(e, device)

    def twin(self) -> "CpuMoE":
        """A second operator over the same packed layer (no copy of the weights): a second job
        in flight (expert deferral). Its workers do all of its job (caller=False): the pool runs
        jobs in submission order, so a job that waits for its caller's share until a later
        sync() would hold up this operator's next job, whose caller waits on it first."""
        threads, mode, isa = self._args
        return CpuMoE(self.layer, threads=threads, mode=mode, isa=isa, caller=False)

    def forward(self, x, ids, weights, skip_mask=None, out=None, accumulate: bool = False):
        """y [B, H] float32, same kind as x (numpy in -> numpy out, torch in -> torch out).
        out: an optional [B, H] fp32/bf16 CPU buffer written (accumulate=False) or added to
        (accumulate=True) instead; it is returned."""
        self.submit(x, ids, weights, skip_mask, out=out, accumulate=accumulate)
        return self.sync()

    __call__ = forward

    def submit(self, x, ids, weights, skip=None, out=None, accumulate: bool = False) -> None:
        """Start the job and return at once. x [B, H] fp32/bf16, ids [B, K] int32/int64,
        weights [B, K] fp32, skip_mask [E] bool/uint8 or None, out as in forward(); CPU and
        contiguous. Do not touch the arrays until sync()."""
        import numpy as np  # noqa: PLC0415

        as_torch = not isinstance(x, np.ndarray)
        xn = native.as_numpy(x, "x")
        idn = native.as_numpy(ids, "ids")
        wn = native.as_numpy(weights, "weights")
        sn = None if skip is None else native.as_numpy(skip, "skip_mask")
        if xn.ndim != 2:
            raise ValueError(f"x must be [B, H], got shape {list(xn.shape)}")
        if out is not None:
            y, yn = out, native.as_numpy(out, "out")
        elif accumulate:
            raise ValueError("accumulate=True needs an out= buffer to add to")
        elif as_torch:
            import torch  # noqa: PLC0415

            y = torch.empty((xn.shape[0], self.layer.hidden), dtype=torch.float32)
            yn = y.numpy()
        else:
            y = yn = np.empty((xn.shape[0], self.layer.hidden), dtype=np.float32)
        try:
            self._op.submit(xn, idn, wn, sn, yn, bool(accumulate))  # RuntimeError if pending
        except (TypeError, ValueError) as e:
            if out is not None and str(e).startswith("y "):
                raise type(e)("out" + str(e)[1:]) from None
            raise
        with self._lock:
            self._pending = (y, as_torch)

    def sync(self):
        """Wait for the job; its y, or None when nothing was pending. A worker error comes back
        here as RuntimeError."""
        with self._lock:
            pending, self._pending = self._pending, None
        self._op.sync()
        return None if pending is None else pending[0]
