"""Compile the Triton kernels for sm_90 without a GPU and report ptxas -v per configuration, as
JSON lines on stdout: run by tests/test_triton_compile.py in a fresh process, because a process
that has imported the kernels under TRITON_INTERPRET=1 (the interpreter tests) holds interpreted
functions, which cannot be compiled.

    python tests/triton_build.py      # {"name": ..., "ok": true, "registers": 136, "spills": 0}
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hybrid.experts.grouped_experts_triton import GROUP_STEPS, _grouped_experts_kernel  # noqa: E402
from hybrid.ops.quant_linear_triton import _quant_linear_kernel, blocks_for  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
EXPERT_SIG = {"x_ptr": "*bf16", "y_ptr": "*fp32", "tok_ptr": "*i32", "wt_ptr": "*fp32",
              "tile_slot_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32",
              "guq_ptr": "*u8", "gus_ptr": "*bf16", "dnq_ptr": "*u8", "dns_ptr": "*bf16",
              "H": "i32", "GH": "i32", "GI": "i32", "HP2": "i32", "stride_x": "i32",
              "stride_y": "i32",
              **{c: "constexpr" for c in ("FMT", "ACT", "OP", "F32", "P", "BM", "BP", "GS")}}
LINEAR_SIG = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*bf16",
              "y_ptr": "*bf16", "T": "i32", "N": "i32", "K": "i32", "stride_x": "i32",
              "stride_q": "i32", "stride_y": "i32",
              **{c: "constexpr" for c in ("HAS_BIAS", "OP", "F32", "BT", "BN", "BK")}}


def configs():
    for name, fmt, q, act, bm in (("experts int4 decode", 0, "*u8", "bf16", 16),
                                  ("experts int8 prefill", 1, "*i8", "bf16", 64),
                                  ("experts int4 fp32", 0, "*u8", "fp32", 16),
                                  ("experts dense", 2, "*bf16", "bf16", 16)):
        a = tl.bfloat16 if act == "bf16" else tl.float32
        yield name, _grouped_experts_kernel, {**EXPERT_SIG, "guq_ptr": q, "dnq_ptr": q,
                                              "x_ptr": f"*{act}"}, \
            {"FMT": fmt, "ACT": a, "OP": a, "F32": act == "fp32", "P": 1 if fmt == 0 else 2,
             "BM": bm, "BP": 32, "GS": GROUP_STEPS[bm][0]}, 4
    for q in ("*i8", "*fp8e4nv"):
        for tokens in (1, 64):
            BT, BN, BK, warps = blocks_for(tokens)
            yield f"linear {q[1:]} T={tokens}", _quant_linear_kernel, {**LINEAR_SIG, "q_ptr": q}, \
                {"HAS_BIAS": True, "OP": tl.bfloat16, "F32": False, "BT": BT, "BN": BN, "BK": BK}, warps


def main() -> int:
    ptxas = get_ptxas(TARGET.arch).path
    for name, fn, sig, consts, warps in configs():
        row = {"name": name}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                               options={"num_warps": warps})
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "k.ptx").write_text(k.asm["ptx"])
                out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET.arch}a",
                                      str(Path(d) / "k.ptx"), "-o", str(Path(d) / "k.cubin")],
                                     capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", out.stderr)
            spills = re.search(r"(\d+) bytes spill stores", out.stderr)
            row.update(ok=out.returncode == 0 and bool(k.asm["cubin"]),
                       registers=int(regs.group(1)) if regs else None,
                       spills=int(spills.group(1)) if spills else None, log=out.stderr[-400:])
        except Exception as e:  # reported, and the test fails naming it
            row.update(ok=False, log=f"{type(e).__name__}: {e}"[-2000:])
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
