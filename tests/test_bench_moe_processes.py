"""bench/moe_layer.py --processes N: N fresh processes, their figures folded into median / min / max
(settings kept as they are), every process's own object kept; and the folding rule on its own."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "moe_layer.py"


def _script():
    spec = importlib.util.spec_from_file_location("moe_layer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_aggregate_folds_numbers_keeps_settings():
    agg = _script().aggregate([
        {"isa": "avx512", "experts": 16, "decode_gbps": 10.0, "ok": True, "bw": None, "note": "a",
         "peers": {"ggml": {"decode_gbps": 1.0, "engine": "x"}}},
        {"isa": "avx512", "experts": 16, "decode_gbps": 30.0, "ok": True, "bw": 5.0, "note": "b",
         "peers": {"ggml": {"decode_gbps": 3.0, "engine": "x"}}},
        {"isa": "avx512", "experts": 16, "decode_gbps": 20.0, "ok": True, "bw": 7.0, "note": "a",
         "peers": {"ggml": {"decode_gbps": 2.0, "engine": "x"}, "kt-kernel": {"skipped": "no venv"}}},
    ])
    assert agg["processes"] == 3 and len(agg["per_process"]) == 3
    med, lo, hi = agg["median"], agg["min"], agg["max"]
    assert (med["decode_gbps"], lo["decode_gbps"], hi["decode_gbps"]) == (20.0, 10.0, 30.0)
    assert med["isa"] == "avx512" and med["experts"] == 16 and isinstance(med["experts"], int)
    assert med["ok"] is True                              # a bool is a setting, not a number
    assert (med["bw"], lo["bw"], hi["bw"]) == (6.0, 5.0, 7.0)  # None: absent in that process
    assert med["note"] == ["a", "b", "a"]                 # disagreeing non-numbers: all of them
    assert (med["peers"]["ggml"]["decode_gbps"], hi["peers"]["ggml"]["decode_gbps"]) == (2.0, 3.0)
    assert med["peers"]["ggml"]["engine"] == "x"
    assert med["peers"]["kt-kernel"] == [None, None, {"skipped": "no venv"}]


def test_two_processes_end_to_end(capsys):
    pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")
    rc = _script().main(["--experts", "16", "--hidden", "256", "--intermediate", "128", "--tokens", "16",
                         "--runs", "1", "--bank", "1", "--no-torch", "--processes", "2", "--json"])
    assert rc == 0
    agg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert agg["processes"] == 2 and len(agg["per_process"]) == 2
    per = agg["per_process"]
    for p in per:  # each is one whole measurement of its own
        assert p["experts"] == 16 and p["decode_gbps"] > 0 and p["prefill_tok_s"] > 0
    for key in ("decode_gbps", "prefill_tok_s", "bandwidth_gbps"):
        vals = [p[key] for p in per]
        assert agg["median"][key] == pytest.approx(statistics.median(vals))
        assert agg["min"][key] == min(vals) and agg["max"][key] == max(vals)
    assert agg["median"]["experts"] == 16 and agg["median"]["runs"] == 1


def test_processes_must_be_positive():
    with pytest.raises(SystemExit):
        _script().parse_args(["--processes", "0"])


def test_aggregate_folds_peer_rows_row_by_row():
    """--peers gives a list of rows (ggml runs the layer two ways); --processes folds each row,
    so the spread table can print it (it once got the three lists back unfolded)."""
    rows = lambda a, b: [{"engine": "ggml q4_0", "decode_gbps": a}, {"engine": "ggml q4_k", "decode_gbps": b}]
    agg = _script().aggregate([{"peers": rows(1.0, 4.0)}, {"peers": rows(3.0, 6.0)}, {"peers": rows(2.0, 5.0)}])
    med, hi = agg["median"]["peers"], agg["max"]["peers"]
    assert [r["engine"] for r in med] == ["ggml q4_0", "ggml q4_k"]
    assert [r["decode_gbps"] for r in med] == [2.0, 5.0] and [r["decode_gbps"] for r in hi] == [3.0, 6.0]
