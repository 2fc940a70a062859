"""bench/peers/kt_kernel_moe.py without kt-kernel (CI): the peer skips with a sentence that says
how to get it, and skips a GGUF layer it cannot run; the --status command says the venv is absent."""

import importlib
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("peers")


def _spec(peers, fmt="int4"):
    E, H, I, K, B, C = 4, 64, 32, 2, 3, 2
    z = np.zeros
    ct = lambda n, k: (z((n, k // 8), np.int32), z((n, k // 32), np.float32))  # noqa: E731
    return peers.LayerSpec(fmt, fmt, E, H, I, K, B, 1, 1, [(ct(I, H), ct(I, H), ct(H, I))],
                           [z((1, H), np.float32)] * 2, [np.arange(K, dtype=np.int32)[None]] * 2,
                           z((B, H), np.float32), z((B, K), np.int32), z((B, K), np.float32),
                           z((C, H), np.float32), z((C, K), np.int32), z((C, K), np.float32))


def test_skips_without_its_venv(peers, monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_KT_VENV", str(tmp_path / "absent"))
    with pytest.raises(peers.PeerSkipped) as exc:
        peers.measure("kt-kernel", _spec(peers))
    msg = str(exc.value)
    assert str(tmp_path / "absent") in msg and "kt_kernel_moe.py --install" in msg


def test_skips_a_gguf_layer(peers, monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")  # a venv is there; the layer's format is the reason
    monkeypatch.setenv("HYBRID_KT_VENV", str(tmp_path))
    with pytest.raises(peers.PeerSkipped, match="q4_k"):
        peers.measure("kt-kernel", _spec(peers, "q4_k"))


def test_status_without_venv(peers, tmp_path, capsys):
    mod = importlib.import_module("peers.kt_kernel_moe")
    assert mod.main(["--status", "--venv", str(tmp_path / "absent")]) == 1
    assert "--install" in capsys.readouterr().err


def _wheel(dirpath: Path) -> Path:
    """A minimal pure-python wheel (no network needed to install it) standing in for the package."""
    import zipfile

    whl = dirpath / "hybrid_kt_probe-0.1-py3-none-any.whl"
    info = "hybrid_kt_probe-0.1.dist-info"
    files = {"hybrid_kt_probe.py": "", f"{info}/METADATA": "Metadata-Version: 2.1\nName: hybrid-kt-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return whl


def test_install_creates_the_venv_and_a_venv_without_kt_kernel_skips(peers, monkeypatch, tmp_path):
    """install() makes a venv and pip-installs the requirement into it (a local wheel here); the
    runner started under that venv cannot import kt_kernel (nor numpy), and the peer says so."""
    mod = importlib.import_module("peers.kt_kernel_moe")
    venv = tmp_path / "venv"
    mod.install(venv, str(_wheel(tmp_path)))
    py = mod.venv_python(venv)
    assert py.exists() and list(venv.glob("lib/python*/site-packages/hybrid_kt_probe.py"))
    monkeypatch.setenv("HYBRID_KT_VENV", str(venv))
    with pytest.raises(peers.PeerSkipped, match="importing kt_kernel failed"):
        peers.measure("kt-kernel", _spec(peers))
