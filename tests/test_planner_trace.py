"""Trace files: round trip, merge, slicing, the recorder, and clear errors on bad input."""

import numpy as np
import pytest

from hybrid.planner import trace as traces
from hybrid.planner.trace import Trace, TraceError, TraceRecorder


def _random_trace(seed=0, n=50, layers=(1, 2, 3), E=16, K=4, source="test"):
    rng = np.random.default_rng(seed)
    seq = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in layers]) for _ in range(n)])
    seq = seq.astype(np.int16)
    return Trace(model_id="tiny", config_hash="sha256:abc", layers=list(layers), num_experts=E,
                 top_k=K, counts=traces.counts_from_sequence(seq, E), tokens=n, source=source,
                 synthetic=True, seq=seq)


def test_round_trip_keeps_everything(tmp_path):
    t = _random_trace()
    p = str(tmp_path / "t.safetensors")
    traces.save(t, p)
    u = traces.load(p)
    assert u.header() == t.header()
    np.testing.assert_array_equal(u.counts, t.counts)
    np.testing.assert_array_equal(u.seq, t.seq)
    assert u.counts.dtype == np.uint64 and u.seq.dtype == np.int16
    # counts-only load leaves the sequence on disk
    assert traces.load(p, with_sequence=False).seq is None


def test_merge_sums_counts_and_concatenates_sequences():
    a, b = _random_trace(1, n=30, source="a"), _random_trace(2, n=20, source="b")
    m = traces.merge([a, b])
    assert m.tokens == 50
    np.testing.assert_array_equal(m.counts, a.counts + b.counts)
    np.testing.assert_array_equal(m.seq, np.concatenate([a.seq, b.seq]))
    assert "a" in m.source and "b" in m.source


def test_merge_refuses_other_model():
    a = _random_trace()
    b = _random_trace()
    b.config_hash = "sha256:other"
    with pytest.raises(TraceError, match="config_hash"):
        traces.merge([a, b])


def test_slices():
    t = _random_trace(n=40)
    s = t.slice_tokens(10, 25)
    assert s.tokens == 15
    np.testing.assert_array_equal(s.counts, traces.counts_from_sequence(t.seq[10:25], 16))
    ls = t.slice_layers([3, 1])
    assert ls.layers == [3, 1]
    np.testing.assert_array_equal(ls.counts[0], t.counts[2])
    np.testing.assert_array_equal(ls.seq[:, 1], t.seq[:, 0])
    with pytest.raises(TraceError, match="layer 7"):
        t.slice_layers([7])
    with pytest.raises(TraceError, match="range"):
        t.slice_tokens(5, 100)


def test_counts_must_match_tokens():
    t = _random_trace()
    c = t.counts.copy()
    c[0, 0] += 1
    with pytest.raises(TraceError, match="layer 1 has"):
        Trace("tiny", "h", t.layers, 16, 4, c, t.tokens)


def test_load_rejects_non_trace_files(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TraceError, match="junk.safetensors"):
        traces.load(str(p))
    with pytest.raises(TraceError, match="no such trace"):
        traces.load(str(tmp_path / "missing.safetensors"))


def test_recorder_matches_direct_counting():
    torch = pytest.importorskip("torch")
    rec = TraceRecorder("tiny", "sha256:abc", [1, 2], num_experts=16, top_k=4,
                        keep_sequence=True)
    rng = np.random.default_rng(0)
    all_ids = {1: [], 2: []}
    for T in (5, 1, 1, 3):                  # a prefill then decode steps
        for layer in (1, 2):
            ids = np.stack([rng.choice(16, 4, replace=False) for _ in range(T)])
            all_ids[layer].append(ids)
            rec.record(layer, torch.from_numpy(ids))
    tr = rec.to_trace()
    assert tr.tokens == 10
    for i, layer in enumerate((1, 2)):
        ids = np.concatenate(all_ids[layer])
        np.testing.assert_array_equal(tr.counts[i], np.bincount(ids.ravel(), minlength=16))
        np.testing.assert_array_equal(tr.seq[:, i], ids)


def test_recorder_errors():
    rec = TraceRecorder("tiny", "h", [1, 2], 16, 4)
    with pytest.raises(TraceError, match="layer 5"):
        rec.record(5, np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(TraceError, match="shape"):
        rec.record(1, np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(TraceError, match="outside"):
        rec.record(1, np.full((1, 4), 16))
    rec.record(1, np.arange(4)[None])
    with pytest.raises(TraceError, match="different token counts"):
        rec.to_trace()


def test_summary_shares_are_cache_hit_rates():
    # Layer 1: expert 3 takes half the picks; the rest spread evenly over 4 more experts.
    counts = np.zeros((2, 10), dtype=np.uint64)
    counts[0, 3] = 40
    counts[0, [0, 1, 2, 4]] = 10
    counts[1, :] = 8
    t = Trace(model_id="tiny", config_hash="sha256:abc", layers=[1, 2], num_experts=10,
              top_k=1, counts=counts, tokens=80, source="recorded: test", synthetic=False)
    s = t.summary(fractions=(0.1, 0.5), top=2)
    l1, l2 = s["layers"][1], s["layers"][2]
    assert l1["experts_used"] == 5 and l2["experts_used"] == 10
    assert l1["top_share"] == {"0.1": 0.5, "0.5": 1.0}      # top 1 expert, top 5 experts
    assert l2["top_share"] == {"0.1": 0.1, "0.5": 0.5}
    assert list(l1["most_picked"].items())[0] == (3, 0.5)
    assert s["mean_top_share"]["0.1"] == pytest.approx(0.3)
    assert not s["synthetic"] and s["tokens"] == 80
    empty = Trace(model_id="tiny", config_hash="sha256:abc", layers=[1], num_experts=4, top_k=1,
                  counts=np.zeros((1, 4), dtype=np.uint64), tokens=0, source="x", synthetic=False)
    with pytest.raises(TraceError, match="no tokens"):
        empty.summary()
