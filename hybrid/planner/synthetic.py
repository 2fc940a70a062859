"""Synthetic routing traces, K2.5-shaped by default, for planning before any real run exists.

Each MoE layer l ranks its experts by a random permutation and picks K distinct experts per
token, drawn without replacement with weights proportional to 1 / (rank + 1)^s_l (Zipf with
exponent s_l). The exponents go linearly from `zipf_first` (first MoE layer) to `zipf_last`
(last). Optional drift models a change of topic: every `drift_every` tokens, each layer's
ranking gets round(drift_fraction x E) random transpositions. Every trace made here has
synthetic=True and says how it was made in its source string and notes, and the profile made
from it carries that label.

Legend: N tokens, L MoE layers, E experts, K picks per token.
"""

from __future__ import annotations

import numpy as np

from hybrid.planner.trace import Trace

_SAMPLE = None


def _sampler():
    global _SAMPLE
    if _SAMPLE is None:
        import numba

        @numba.njit(cache=False)
        def sample(cum, perm, n, k, seed, out, counts):
            # cum [L, E] cumulative rank weights (last = 1), perm [L, E] rank -> expert,
            # out [n, L, k] int16 (or a [0, L, k] array when only counting), counts [L, E].
            np.random.seed(seed)
            L, E = cum.shape
            keep = out.shape[0] > 0
            chosen = np.zeros(k, dtype=np.int64)
            for t in range(n):
                for l in range(L):
                    got = 0
                    while got < k:           # rejection keeps picks distinct
                        u = np.random.random()
                        r = np.searchsorted(cum[l], u, side="right")
                        if r >= E:
                            r = E - 1
                        e = perm[l, r]
                        dup = False
                        for j in range(got):
                            if chosen[j] == e:
                                dup = True
                                break
                        if not dup:
                            chosen[got] = e
                            got += 1
                    for j in range(k):
                        counts[l, chosen[j]] += 1
                        if keep:
                            out[t, l, j] = chosen[j]

        _SAMPLE = sample
    return _SAMPLE


def make_trace(model, tokens: int, zipf_first: float = 0.6, zipf_last: float = 1.0,
               drift_every: int = 0, drift_fraction: float = 0.0, seed: int = 0,
               keep_sequence: bool = True, progress=None) -> Trace:
    """A synthetic Trace for `model` (a ModelSpec). progress(done_tokens) is called per segment."""
    L, E, K = len(model.moe_layers), model.num_experts, model.top_k
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if not (zipf_first >= 0 and zipf_last >= 0):
        raise ValueError("Zipf exponents must be >= 0")
    if drift_every < 0 or not 0 <= drift_fraction <= 1:
        raise ValueError("drift_every must be >= 0 and drift_fraction in [0, 1]")
    rng = np.random.default_rng(seed)
    exps = np.linspace(zipf_first, zipf_last, L)
    w = 1.0 / np.power(np.arange(1, E + 1, dtype=np.float64)[None, :], exps[:, None])
    cum = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
    cum[:, -1] = 1.0
    perm = np.stack([rng.permutation(E) for _ in range(L)]).astype(np.int64)
    seq = np.empty((tokens, L, K), dtype=np.int16) if keep_sequence else None
    counts = np.zeros((L, E), dtype=np.uint64)
    sample = _sampler()
    seg = drift_every if drift_every > 0 else min(tokens, 65536)
    swaps = int(round(drift_fraction * E))
    done, segment = 0, 0
    while done < tokens:
        n = min(seg, tokens - done)
        out = seq[done:done + n] if seq is not None else np.empty((0, L, K), dtype=np.int16)
        sample(cum, perm, n, K, int(rng.integers(2**31)), out, counts)
        done += n
        segment += 1
        if drift_every > 0 and swaps:
            for l in range(L):
                a = rng.integers(0, E, size=swaps)
                b = rng.integers(0, E, size=swaps)
                for i, j in zip(a, b):
                    perm[l, i], perm[l, j] = perm[l, j], perm[l, i]
        if progress is not None:
            progress(done)
    drift = (f", drift {drift_fraction:g} of ranks every {drift_every} tokens"
             if drift_every and drift_fraction else ", no drift")
    source = (f"synthetic: Zipf exponent {zipf_first:g} (first MoE layer) .. {zipf_last:g} "
              f"(last){drift}, seed {seed}")
    return Trace(model_id=model.model_id, config_hash=model.config_hash,
                 layers=list(model.moe_layers), num_experts=E, top_k=K, counts=counts,
                 tokens=tokens, source=source, synthetic=True, seq=seq,
                 notes={"generator": "hybrid.planner.synthetic.make_trace",
                        "zipf_exponents": [round(float(x), 4) for x in exps],
                        "drift_every": drift_every, "drift_fraction": drift_fraction,
                        "seed": seed})
