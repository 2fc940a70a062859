"""KTransformers' kt-kernel as a bench peer: the same Kimi INT4 g32 layer through its RAWINT4 MoE.

kt-kernel (PyPI `kt-kernel`) pins its own CUDA build of torch (about 7 GB with its nvidia-*
wheels), which cannot share hybrid's environment, so it lives in a venv of its own and runs as a
subprocess in the same sitting, with the same thread count:

    python bench/peers/kt_kernel_moe.py --install     # creates $HYBRID_KT_VENV (default
                                                      # ~/.cache/hybrid/kt-venv), pip-installs kt-kernel
    python bench/peers/kt_kernel_moe.py --status      # what is installed there and which backend runs

measure(spec) (bench/peers/__init__.py's protocol) writes spec's weight bank, routing and inputs
to a temporary directory, runs bench/peers/kt_kernel_runner.py under that venv's python, and reads
back the timings and check_y. The weights reach kt-kernel bit for bit: its RAWINT4 method takes
Kimi's compressed-tensors packing as it is (int32 words viewed as bytes, nibble = q + 8, bf16
scale per 32 inputs, no zero point). kt-kernel picks the backend itself (KT_RAWINT4_BACKEND
overrides it): AMXInt4_KGroup_MOE when its build has it. On a CPU without AMX, kt-kernel loads its
avx512_bf16 (or lower) build, where that class runs AVX-512 code (a vpdpbssd emulation over
sign-extended nibbles, no AMX tiles); KT_RAWINT4_BACKEND=avx2 picks AVX2RawInt4_MOE instead. The
engine string says which ran. On the AMD Zen 4 dev box (AVX-512 VNNI/BF16, no AMX, no VEX
AVX-VNNI) kt-kernel 0.7.2 loads its avx512_bf16 build and runs AMXInt4_KGroup_MOE (default),
AMXInt4_KGroupBlocked_MOE (=amx_blocked) and AVX2RawInt4_MOE (=avx2) on this layer; avxvnni is
refused (the CPU lacks avx_vnni) and the peer says so. Its LLAMAFILE method (GGUF blocks) is not
wired: it would run other weights than the Kimi INT4 layer.

decode_gbps counts kt-kernel's own bytes: at load it widens the bf16 scales to fp32, so an expert
holds 3 x H x I x (1/2 + 4/32) bytes (hybrid's packing holds 3 x H x I x (1/2 + 2/32)).

Legend: E experts, K picked per token, H hidden, I expert width, B tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__:  # imported as peers.kt_kernel_moe or bench.peers.kt_kernel_moe: the caller's classes
    from . import LayerSpec, PeerSkipped
else:  # run as a script (--install, --status)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peers import LayerSpec, PeerSkipped

KT_KERNEL = "kt-kernel==0.7.2"  # the release whose MOEConfig / forward_task API the runner uses
RUNNER = Path(__file__).resolve().parent / "kt_kernel_runner.py"
KT_BYTES_PER_WEIGHT = 0.5 + 4 / 32  # nibble + fp32 scale per 32 inputs, as kt-kernel holds them
RUN_TIMEOUT_S = 3600  # a full 384-expert layer loads in minutes; a hang must not stall the bench


def venv_dir() -> Path:
    return Path(os.environ.get("HYBRID_KT_VENV") or Path.home() / ".cache" / "hybrid" / "kt-venv")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install(venv: Path, package: str = KT_KERNEL) -> None:
    """Create `venv` (if missing) with this interpreter's base python and pip-install kt-kernel."""
    py = venv_python(venv)
    if not py.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        print(f"creating {venv} ({base} -m venv)", file=sys.stderr)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    print(f"installing {package} into {venv} (it pulls its own torch: several GB)", file=sys.stderr)
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", package], check=True)


def _probe(py: Path) -> dict:
    """What the venv's kt-kernel loads on this CPU: version, build variant, RAWINT4 backend."""
    code = ("import json, kt_kernel\n"
            "from kt_kernel.utils.amx import _select_rawint4_backend as s\n"
            "b = s(32)\n"
            "print('KT_PROBE ' + json.dumps({'version': kt_kernel.__version__, "
            "'cpu_variant': kt_kernel.__cpu_variant__, 'backend': b.__name__ if b else None}))\n")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise PeerSkipped(f"kt-kernel: importing it in {py} failed: {_tail(r.stderr)}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("KT_PROBE ")]
    return json.loads(line[-1][len("KT_PROBE "):])


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:]) or "(no output)"


def measure(spec: LayerSpec) -> dict:
    py = venv_python(venv_dir())
    if not py.exists():
        raise PeerSkipped(f"kt-kernel: no venv at {venv_dir()} (set HYBRID_KT_VENV, or create it with "
                          f"`python bench/peers/kt_kernel_moe.py --install`, ~7 GB)")
    if spec.fmt != "int4":
        raise PeerSkipped(f"kt-kernel: runs the Kimi INT4 g32 layer (RAWINT4) here; this layer is "
                          f"{spec.fmt}/{spec.down_fmt} GGUF blocks (kt-kernel's LLAMAFILE method is not wired)")
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="hybrid-kt-") as tmp:
        d = Path(tmp)
        arrays = {}
        for b, entry in enumerate(spec.bank):
            for p, (q, s) in zip(("gate", "up", "down"), entry):
                arrays[f"{p}_q{b}"], arrays[f"{p}_s{b}"] = q, s
        arrays.update(decode_x=np.stack(spec.decode_x), decode_ids=np.stack(spec.decode_ids),
                      prefill_x=spec.prefill_x, prefill_ids=spec.prefill_ids, prefill_w=spec.prefill_w,
                      check_x=spec.check_x, check_ids=spec.check_ids, check_w=spec.check_w)
        np.savez(d / "arrays.npz", **arrays)
        del arrays
        (d / "meta.json").write_text(json.dumps({
            "experts": spec.experts, "hidden": spec.hidden, "intermediate": spec.intermediate,
            "topk": spec.topk, "threads": spec.threads, "runs": spec.runs, "bank": len(spec.bank)}))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads))
        env.pop("PYTHONPATH", None)  # hybrid's paths must not leak into kt-kernel's interpreter
        try:
            r = subprocess.run([str(py), str(RUNNER), str(d)], capture_output=True, text=True, env=env,
                               timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"kt-kernel runner took more than {RUN_TIMEOUT_S} s") from None
        skip = [ln for ln in r.stderr.splitlines() if ln.startswith("SKIP: ")]
        if skip:
            raise PeerSkipped("kt-kernel: " + skip[-1][len("SKIP: "):])
        if r.returncode == -signal.SIGILL:
            raise PeerSkipped(f"kt-kernel: its build died of an illegal instruction on this CPU "
                              f"(KT_KERNEL_CPU_VARIANT=avx2 forces its lowest build): {_tail(r.stdout, 2)}")
        if r.returncode != 0:
            raise RuntimeError(f"kt-kernel runner exited with {r.returncode}: {_tail(r.stderr + r.stdout)}")
        res = json.loads((d / "result.json").read_text())
        check_y = np.load(d / "check_y.npy")

    dec = statistics.median(res["decode_s"])
    pre = statistics.median(res["prefill_s"])
    expert_bytes = 3 * spec.hidden * spec.intermediate * KT_BYTES_PER_WEIGHT
    return {
        "engine": f"kt-kernel {res['version']} RAWINT4 {res['backend']} ({res['cpu_variant']} build)",
        "weights": f"INT4 g32 as is (compressed-tensors nibbles, bf16 scales -> fp32 at load), exact",
        "decode_ms": dec * 1e3,
        "decode_gbps": spec.topk * expert_bytes / dec / 1e9,
        "prefill_tok_s": spec.tokens / pre,
        "check_y": check_y,
        "load_s": res["load_s"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--install", action="store_true", help=f"create the venv and pip-install {KT_KERNEL}")
    g.add_argument("--status", action="store_true", help="say what the venv holds and which backend runs")
    p.add_argument("--venv", default="", help="the venv (default $HYBRID_KT_VENV or ~/.cache/hybrid/kt-venv)")
    p.add_argument("--package", default=KT_KERNEL, help=f"pip requirement to install (default {KT_KERNEL})")
    a = p.parse_args(argv)
    venv = Path(a.venv) if a.venv else venv_dir()
    if a.install:
        install(venv, a.package)
    py = venv_python(venv)
    if not py.exists():
        print(f"no venv at {venv}: run with --install", file=sys.stderr)
        return 1
    try:
        info = _probe(py)
    except PeerSkipped as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{venv}: kt-kernel {info['version']}, {info['cpu_variant']} build, RAWINT4 backend {info['backend']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
