"""bench/gpu_check.py --dry-run: the GPU machine's prepared check runs end to end on the CPU
(device = the CPU with the torch op set, no graphs) and writes its JSON and table."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = _script().main(["--dry-run", "--out", str(out), "--steps", "2", "--prompt", "16",
                         "--prompt-check", "8", "--follow", "4"])
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu (dry run)"
    rows = {(m["model"], r["dtype"], r["mode"], r["kv"], r["cache_fraction"]): r
            for m in result["models"] for r in m["rows"]}
    # 2 models x 2 dtypes x (eager, static) x (slot KV: no cache, 25% cached; paged KV: no cache)
    assert len(rows) == 24
    assert {k[3:] for k in rows} == {("slot", 0.0), ("slot", 0.25), ("paged", 0.0)}
    for (model, dtype, mode, kv, frac), r in rows.items():
        if dtype == "float32":  # the correctness check: the same math, another order
            assert r["ok"] and r["rel_err"] <= 1e-3, (model, mode, kv, frac, r)
            assert r["decode_tok_s_b1"] is None
        else:
            assert r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b4"] > 0 and r["step_ms_b1"] > 0
        if mode == "static" and frac == 0.0:
            assert r["host_syncs"] == 0, r["sync_sites"]
        if mode == "eager":
            assert r["host_syncs"] > 0  # forward()'s own (cache bounds, slot groups)
        assert r["aten_ops"] > 0 and r["graph_launches"] is None  # no graphs on a CPU
    assert rc == (0 if result["ok"] else 1)
    assert all(m["prefill_tok_s_device"] > 0 for m in result["models"])
    for m in result["models"]:  # deferral rows: k = 0 is the model itself
        assert {(r["k"], r["mode"]) for r in m["deferral"]} == {(0, "eager"), (0, "static"), (2, "eager"), (2, "static")}
        assert all(r["top1"] == 1.0 and abs(r["kl_mean"]) < 1e-6 for r in m["deferral"] if r["k"] == 0)
    table = capsys.readouterr().out
    assert "| demo | bfloat16 | static | slot | 0% |" in table and "| demo | bfloat16 | static | paged | 0% |" in table and "k25-shaped: prefill" in table
    assert "| demo | 2 | static |" in table


def test_without_cuda_the_real_run_refuses(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _script().main(["--out", "/dev/null"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_dry_run_layerwise_rows(capsys):
    """gpu_check_layerwise's rows alone (gpu_check.py runs them after its models)."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check_layerwise as lw

    r = lw.check(None, "cpu", dry_run=True, log=lambda m: None)
    assert r["ok"] and r["threshold"] is not None
    f32 = [x for x in r["layerwise"] if x["dtype"] == "float32"]
    assert f32 and all(x["rel_err"] <= 1e-3 for x in f32)
    assert all(x["tok_s_layerwise"] > 0 for x in r["layerwise"] if x["dtype"] == "bfloat16")
    assert len(r["overlap"]) == 4 and all(0 <= o["efficiency"] <= 1 for o in r["overlap"])
    assert r["stream_layer"]["s_per_layer"] > 0
    assert "layerwise prefill (threshold" in lw.table(r)
