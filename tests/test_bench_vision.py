"""bench/vs_llamacpp_vision.py on a tiny random tower: the random tower goes through hybrid's mmproj
writer and loader and encodes; when llama-cpp-python is installed (a bench extra, not in CI),
llama.cpp's libmtmd encodes the same file and the embeddings agree (an f32 file and hybrid's fp32
tower; llama.cpp's CPU flash attention holds K and V in f16, which is most of the difference:
max |d| / max 5e-4 to 7e-4 here, cosine 0.9999996); otherwise the bench says llama.cpp was
skipped and why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import vs_llamacpp_vision as vv  # noqa: E402


def test_tiny_tower_both_runtimes(tmp_path, capsys):
    # 56 x 56: 4 x 4 patches (the 8 x 8 position table resampled); 112 x 112: the table as it is
    assert vv.main(["--shape", "tiny", "--type", "f32", "--sizes", "56x56,112x112", "--runs", "1",
                    "--dtypes", "fp32", "--dir", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = res["rows"]
    assert [r["tokens"] for r in rows] == [4, 16]
    assert all(r["hybrid_s"] > 0 for r in rows)
    if res["llamacpp"] is None:
        assert res["llamacpp_skipped"]
        return
    for r in rows:
        assert r["same_tokens"] and r["cosine"] > 0.99999 and r["rel_max_diff"] < 2e-3, r
