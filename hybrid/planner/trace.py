"""Routing traces: which experts each MoE layer picked, counted (and optionally in order).

A Trace holds
  counts [L, E] uint64   picks of expert e in MoE layer l over all tokens seen
  seq    [N, L, K] int16 (optional) the picks of every token, in order, for replaying
                         time-varying policies (hybrid/planner/simulate.py)
plus a self-describing header: model id, config hash, the decoder-layer index of each MoE layer,
experts, top-k, tokens seen, source ("recorded: ..." or "synthetic: ..."), synthetic flag, and
free-form notes. Legend: N tokens, L MoE layers, E routed experts, K experts per token, T tokens
in one forward call.

File format: safetensors (tensors "counts" and optionally "seq"), with the header as JSON in the
metadata key "hybrid_trace". safetensors because any tool can open it and its plain layout lets
load() memory-map the sequence instead of reading it (a 1M-token sequence is 1M x 60 x 8 x 2
bytes = 960 MB: loading is instant and pages are read as the replay walks them).

Recording hook contract (for hybrid/experts/moe_layer.py):
    recorder = TraceRecorder.for_spec(spec, keep_sequence=True)
    moe_layer.add_observer(on_routing=recorder.record)   # MoELayer calls it as below
    ... for every MoE layer in every forward, after the router chose ids [T, K]:
    recorder.record(layer_idx, ids)
`layer_idx` is the decoder-layer index (e.g. 1..60 for K2.5), `ids` an integer torch tensor or
numpy array [T, K] (any device; it is copied to host). Calls for one forward must come in layer
order, every MoE layer once, with the same T: then row t of each layer's record is the same
token. Padding tokens should not be recorded (slice them off first). record() is cheap (a copy
of T*K ints and a bincount) and never synchronises more than that copy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np

TRACE_FORMAT = "hybrid-trace/1"


class TraceError(ValueError):
    """A trace file or operation that cannot be honoured; the message names the file/field."""


@dataclass
class Trace:
    model_id: str
    config_hash: str
    layers: list            # decoder-layer index of each MoE layer, length L
    num_experts: int        # E
    top_k: int              # K
    counts: np.ndarray      # [L, E] uint64
    tokens: int             # tokens seen (each contributes K picks per layer)
    source: str = ""
    synthetic: bool = False
    seq: np.ndarray | None = None   # [N, L, K] int16, N == tokens when present
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = [int(x) for x in self.layers]
        self.validate()

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, where: str = "trace") -> None:
        L, E = len(self.layers), self.num_experts
        c = self.counts
        if c.ndim != 2 or c.shape != (L, E):
            raise TraceError(f"{where}: counts has shape {tuple(c.shape)}, expected [L={L}, E={E}]")
        if c.dtype not in (np.uint32, np.uint64):
            raise TraceError(f"{where}: counts dtype {c.dtype}, expected uint32 or uint64")
        if not 0 < self.top_k <= E:
            raise TraceError(f"{where}: top_k={self.top_k} must be in 1..{E}")
        if len(set(self.layers)) != L:
            raise TraceError(f"{where}: layer indices repeat: {self.layers}")
        if self.tokens < 0:
            raise TraceError(f"{where}: tokens={self.tokens} is negative")
        sums = c.sum(axis=1, dtype=np.uint64)
        bad = np.nonzero(sums != np.uint64(self.tokens * self.top_k))[0]
        if bad.size:
            i = int(bad[0])
            raise TraceError(f"{where}: layer {self.layers[i]} has {int(sums[i])} picks, expected "
                             f"tokens x top_k = {self.tokens} x {self.top_k}")
        if self.seq is not None:
            s = self.seq
            if s.ndim != 3 or s.shape[1:] != (L, self.top_k) or s.shape[0] != self.tokens:
                raise TraceError(f"{where}: seq has shape {tuple(s.shape)}, expected "
                                 f"[N={self.tokens}, L={L}, K={self.top_k}]")
            if s.dtype != np.int16:
                raise TraceError(f"{where}: seq dtype {s.dtype}, expected int16")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def frequencies(self) -> np.ndarray:
        """[L, E] float64: probability that one token picks expert e in layer l (rows sum to K)."""
        if self.tokens == 0:
            raise TraceError("trace has no tokens: cannot derive expert frequencies")
        return self.counts.astype(np.float64) / float(self.tokens)

    def header(self) -> dict:
        return {"format": TRACE_FORMAT, "model_id": self.model_id,
                "config_hash": self.config_hash, "layers": self.layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "source": self.source, "synthetic": self.synthetic,
                "has_sequence": self.seq is not None, "notes": self.notes}

    def describe(self) -> str:
        kind = "SYNTHETIC" if self.synthetic else "recorded"
        return (f"{kind} trace, {self.tokens} tokens, {self.num_layers} MoE layers x "
                f"{self.num_experts} experts, top-{self.top_k}; source: {self.source}")

    def summary(self, fractions=(0.1, 0.25, 0.5), top: int = 8) -> dict:
        """A short, human-readable account of the routing (what profiles/ ships beside a
        profile): per layer, how many experts were used at all, the share of picks the most
        picked fraction of experts takes (the hit rate of caching exactly those), and the most
        picked experts with their shares."""
        if self.tokens == 0:
            raise TraceError("trace has no tokens: nothing to summarise")
        E = self.num_experts
        layers = {}
        total = np.zeros(len(fractions))
        for i, layer in enumerate(self.layers):
            c = self.counts[i].astype(np.float64)
            order = np.argsort(-c, kind="stable")
            share = np.cumsum(c[order]) / c.sum()                 # [E] top-n share of picks
            cover = [float(share[max(1, int(round(f * E))) - 1]) for f in fractions]
            total += cover
            layers[int(layer)] = {
                "experts_used": int((c > 0).sum()),
                "top_share": {f"{f:g}": round(v, 4) for f, v in zip(fractions, cover)},
                "most_picked": {int(e): round(float(c[e] / c.sum()), 4) for e in order[:top]},
            }
        return {"model_id": self.model_id, "config_hash": self.config_hash,
                "source": self.source, "synthetic": bool(self.synthetic),
                "tokens": int(self.tokens), "moe_layers": self.num_layers, "experts": E,
                "top_k": self.top_k, "notes": self.notes,
                "mean_top_share": {f"{f:g}": round(float(v / self.num_layers), 4)
                                   for f, v in zip(fractions, total)},
                "layers": layers}

    # ---- slicing and merging -----------------------------------------------------------------
    def slice_layers(self, layer_indices) -> "Trace":
        """Keep only the given decoder-layer indices (in the given order)."""
        pos = []
        for li in layer_indices:
            if int(li) not in self.layers:
                raise TraceError(f"slice_layers: layer {li} is not in this trace "
                                 f"(layers {self.layers[0]}..{self.layers[-1]})")
            pos.append(self.layers.index(int(li)))
        seq = None if self.seq is None else np.ascontiguousarray(self.seq[:, pos, :])
        return replace(self, layers=[self.layers[p] for p in pos],
                       counts=self.counts[pos].copy(), seq=seq)

    def slice_tokens(self, start: int, stop: int) -> "Trace":
        """Tokens [start, stop) of the sequence; counts are recomputed from it."""
        if self.seq is None:
            raise TraceError("slice_tokens: this trace has counts only (no sequence); "
                             "record it with keep_sequence=True")
        if not 0 <= start <= stop <= self.tokens:
            raise TraceError(f"slice_tokens: range [{start}, {stop}) outside [0, {self.tokens})")
        seq = self.seq[start:stop]
        return replace(self, seq=seq, tokens=stop - start,
                       counts=counts_from_sequence(seq, self.num_experts),
                       notes={**self.notes, "token_range": [start, stop]})


def counts_from_sequence(seq: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, K] int16 -> [L, E] uint64 pick counts."""
    n, L, k = seq.shape
    out = np.zeros((L, num_experts), dtype=np.uint64)
    for l in range(L):
        ids = np.asarray(seq[:, l, :]).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise TraceError(f"sequence layer {l}: expert ids outside 0..{num_experts - 1}")
        out[l] = np.bincount(ids, minlength=num_experts).astype(np.uint64)
    return out


def merge(traces: list) -> Trace:
    """Sum counts (and concatenate sequences when every trace has one). All traces must describe
    the same model (config hash), layers, experts and top-k."""
    if not traces:
        raise TraceError("merge: no traces given")
    a = traces[0]
    for i, t in enumerate(traces[1:], 1):
        for f in ("config_hash", "layers", "num_experts", "top_k"):
            if getattr(t, f) != getattr(a, f):
                raise TraceError(f"merge: trace {i} has {f}={getattr(t, f)!r}, trace 0 has "
                                 f"{getattr(a, f)!r}")
    counts = np.zeros_like(a.counts, dtype=np.uint64)
    for t in traces:
        counts += t.counts.astype(np.uint64)
    seq = None
    if all(t.seq is not None for t in traces):
        seq = np.concatenate([np.asarray(t.seq) for t in traces], axis=0)
    sources = [t.source for t in traces]
    return Trace(model_id=a.model_id, config_hash=a.config_hash, layers=list(a.layers),
                 num_experts=a.num_experts, top_k=a.top_k, counts=counts,
                 tokens=sum(t.tokens for t in traces),
                 source="merged: " + " + ".join(sources),
                 synthetic=any(t.synthetic for t in traces), seq=seq,
                 notes={"merged_from": sources})


# ---- files ---------------------------------------------------------------------------------

def save(trace: Trace, path: str) -> None:
    from safetensors.numpy import save_file

    trace.validate()
    tensors = {"counts": np.ascontiguousarray(trace.counts.astype(np.uint64))}
    if trace.seq is not None:
        tensors["seq"] = np.ascontiguousarray(trace.seq)
    meta = {"hybrid_trace": json.dumps(trace.header(), sort_keys=True)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _memmap_tensor(path: str, name: str) -> np.ndarray:
    """Map one tensor of a safetensors file read-only without reading it (layout: 8-byte
    little-endian header size, JSON header with dtype/shape/data_offsets, then the data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    info = header[name]
    dtypes = {"I16": np.int16, "U64": np.uint64, "U32": np.uint32}
    if info["dtype"] not in dtypes:
        raise TraceError(f"{path}: tensor {name!r} has dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dt = np.dtype(dtypes[info["dtype"]]).newbyteorder("<")
    if end - begin != int(np.prod(shape)) * dt.itemsize:
        raise TraceError(f"{path}: tensor {name!r} byte range does not match its shape")
    if end == begin:
        return np.zeros(shape, dtype=dt)
    return np.memmap(path, dtype=dt, mode="r", offset=8 + n + begin, shape=shape)


def load(path: str, with_sequence: bool = True) -> Trace:
    """Load a trace file. Counts are read; the sequence is memory-mapped (read on use)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise TraceError(f"{path}: no such trace file")
    try:
        f = safe_open(path, framework="np")
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise TraceError(f"{path}: not a safetensors trace file ({e})") from None
    with f:
        meta = f.metadata() or {}
        if "hybrid_trace" not in meta:
            raise TraceError(f"{path}: safetensors file without a 'hybrid_trace' header")
        try:
            h = json.loads(meta["hybrid_trace"])
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}: header is not valid JSON ({e})") from None
        if h.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path}: format {h.get('format')!r}, expected {TRACE_FORMAT!r}")
        keys = set(f.keys())
        if "counts" not in keys:
            raise TraceError(f"{path}: tensor 'counts' missing")
        counts = f.get_tensor("counts")
    seq = _memmap_tensor(path, "seq") if with_sequence and "seq" in keys else None
    try:
        return Trace(model_id=h["model_id"], config_hash=h["config_hash"], layers=h["layers"],
                     num_experts=int(h["num_experts"]), top_k=int(h["top_k"]), counts=counts,
                     tokens=int(h["tokens"]), source=h.get("source", ""),
                     synthetic=bool(h.get("synthetic", False)), seq=seq,
                     notes=h.get("notes", {}))
    except KeyError as e:
        raise TraceError(f"{path}: header field {e} missing") from None
    except TraceError as e:
        raise TraceError(f"{path}: {e}") from None


# ---- recording -----------------------------------------------------------------------------

class TraceRecorder:
    """Collects the router's choices while a model runs; `to_trace()` makes the Trace.

    See the module docstring for the hook contract.
    """

    def __init__(self, model_id: str, config_hash: str, layers, num_experts: int, top_k: int,
                 keep_sequence: bool = False, source: str = "recorded"):
        self.model_id, self.config_hash = model_id, config_hash
        self.layers = [int(x) for x in layers]
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.keep_sequence, self.source = keep_sequence, source
        if keep_sequence and self.num_experts > np.iinfo(np.int16).max + 1:
            raise TraceError(f"TraceRecorder: {num_experts} experts do not fit the int16 sequence")
        self._pos = {li: i for i, li in enumerate(self.layers)}
        self.counts = np.zeros((len(self.layers), self.num_experts), dtype=np.uint64)
        self.tokens_per_layer = np.zeros(len(self.layers), dtype=np.int64)
        self._chunks: list[list[np.ndarray]] = [[] for _ in self.layers]

    @classmethod
    def for_spec(cls, spec, **kw) -> "TraceRecorder":
        return cls(spec.model_id, spec.config_hash, spec.moe_layers, spec.num_experts,
                   spec.top_k, **kw)

    def record(self, layer_idx: int, ids) -> None:
        i = self._pos.get(int(layer_idx))
        if i is None:
            raise TraceError(f"TraceRecorder.record: layer {layer_idx} is not a MoE layer "
                             f"of this recorder ({self.layers[0]}..{self.layers[-1]})")
        if hasattr(ids, "detach"):  # torch tensor, any device
            ids = ids.detach().to("cpu").numpy()
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != self.top_k:
            raise TraceError(f"TraceRecorder.record: layer {layer_idx}: ids shape "
                             f"{tuple(ids.shape)}, expected [T, K={self.top_k}]")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise TraceError(f"TraceRecorder.record: layer {layer_idx}: expert id outside "
                             f"0..{self.num_experts - 1}")
        self.counts[i] += np.bincount(ids.reshape(-1).astype(np.int64),
                                      minlength=self.num_experts).astype(np.uint64)
        self.tokens_per_layer[i] += ids.shape[0]
        if self.keep_sequence:
            self._chunks[i].append(ids.astype(np.int16))

    def to_trace(self, notes: dict | None = None) -> Trace:
        t = self.tokens_per_layer
        if t.size and (t != t[0]).any():
            lo = int(np.argmin(t))
            raise TraceError(f"TraceRecorder: layers saw different token counts (layer "
                             f"{self.layers[lo]}: {int(t[lo])}, max {int(t.max())}); every MoE "
                             f"layer must record every token")
        n = int(t[0]) if t.size else 0
        seq = None
        if self.keep_sequence:
            seq = np.empty((n, len(self.layers), self.top_k), dtype=np.int16)
            for i, chunks in enumerate(self._chunks):
                if chunks:
                    seq[:, i, :] = np.concatenate(chunks, axis=0)
        return Trace(model_id=self.model_id, config_hash=self.config_hash, layers=self.layers,
                     num_experts=self.num_experts, top_k=self.top_k, counts=self.counts.copy(),
                     tokens=n, source=self.source, synthetic=False, seq=seq,
                     notes=dict(notes or {}))
