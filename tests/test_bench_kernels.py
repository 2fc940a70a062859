"""bench/kernel_speed.py's plumbing at its smallest sizes (one 16 x 32 matrix, one run): each mode
finds its kernel entry points (hybrid._native_testing) and prints a row per token count and ISA;
bad sizes are refused. Nothing here reads the timings."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_speed.py"


@pytest.fixture
def kernels():
    pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out: str, first: str) -> list[list[str]]:
    """Whitespace-split table rows whose first cell is `first`."""
    return [line.split() for line in out.splitlines() if line.split()[:1] == [first]]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_matmul_a8_default_mode(kernels, capsys, fmt):
    from hybrid import native

    isa = native.available_isas()[-1]
    assert kernels.main(["--format", fmt, "--n", "16", "--k", "32", "--tokens", "1", "2",
                         "--runs", "1", "--isa", isa]) == 0
    out = capsys.readouterr().out
    assert f"matmul_a8 {fmt} N=16 K=32" in out
    assert len(_rows(out, "1")) == 1 and "GB/s" in _rows(out, "1")[0][-1]
    assert len(_rows(out, "2")) == 1


def test_gemv_t_mode(kernels, capsys):
    assert kernels.main(["--gemv-t", "--shapes", "32x16", "--tokens", "1", "--runs", "1",
                         "--isa", "scalar"]) == 0
    out = capsys.readouterr().out
    assert "gemv_t_bf16" in out and "32x16 (80)" in out and "1.0x" in out


def test_bad_sizes_are_refused(kernels):
    with pytest.raises(SystemExit):
        kernels.main(["--n", "15"])
