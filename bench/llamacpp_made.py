"""GGUF files made by llama.cpp's own tools: its converter (convert_hf_to_gguf.py) and its
quantiser (llama_model_quantize in the libllama that llama-cpp-python ships), for
bench/vs_llamacpp.py --llamacpp-convert.

Nothing of llama.cpp is committed here: the converter and its gguf-py are fetched at bench time
from the llama-cpp-python sdist of the installed version (`pip download llama-cpp-python==V
--no-deps --no-binary :all:`; the sdist vendors llama.cpp), unpacked into a cache directory, and
run in a subprocess with that gguf-py first on its path (never the gguf package hybrid uses).

Checkpoints (HF directories: config.json, tokenizer files, safetensors), each one hybrid loads too:
  demo        the embedded demo model (trained DeepseekV3, H 256, 64 experts, bf16)
  tiny        tests/checkpoints.py's tiny DeepseekV3 (H 64, 64 experts of width 32, float)
  tiny-int4   the same with compressed-tensors INT4 group-32 routed experts (the converter
              dequantises them itself: its compressed-tensors "pack-quantized" path)
  kimi        the same INT4 checkpoint in Kimi K2.5's multimodal wrapper
              (KimiK25ForConditionalGeneration, text_config, language_model. prefix)
  synthetic   bench/e2e.py's K2.5-width generator (H 7168, I 2048, dense 18432, MLA 64 heads,
              INT4 experts) with --experts routed experts
The tiny ones get a byte-level BPE tokenizer (bench/vs_llamacpp.py's).

The pre-tokenizer: llama.cpp's converter names a tokenizer's pre-tokenizer by hashing the ids of
a test string and looking the hash up in a table of known models; these tokenizers are in no such
table (the demo's is its own, the others are made here), and it refuses them. The runner below
wraps that one lookup: when it finds nothing, the name hybrid's own converter derives from
tokenizer.json (hybrid.convert.gguf_vocab: a plain ByteLevel pre-tokenizer is "gpt-2") is used;
everything else (hyper-parameters, tensors, names, types, the k_b/v_b split) is the converter's.

Quantiser types, ftype names of llama.cpp (LLAMA_FTYPE_MOSTLY_<NAME>): q4_k_m, q4_0, q8_0, q2_k,
iq4_xs, ... ; "bf16" is the converter's own output, unquantised. Types that need an importance
matrix (llama-quant.cpp's tensor_requires_imatrix: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
IQ3_XXS, and Q2_K inside a Q2_K_S file) are skipped with that reason: no imatrix is computed here.
Rows too short for a 256-value K / IQ block get llama.cpp's fallback types (Q4_0, Q5_0, Q5_1,
Q8_0, IQ4_NL, F16), so the tiny checkpoints (rows of 32 and 64) exercise those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = ("demo", "tiny", "tiny-int4", "kimi", "synthetic")
NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "q2_k_s"})

# Runs llama.cpp's converter (argv[1]: its directory; argv[2]: the fallback pre-tokenizer name;
# the rest: the converter's own arguments) with one change: an unrecognised pre-tokenizer hash
# gives the fallback name instead of an error.
_RUNNER = r"""
import runpy, sys
from pathlib import Path
root, pre = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(root), str(root / "gguf-py")]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def with_fallback(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print(f"[llamacpp-made] pre-tokenizer hash not in llama.cpp's table: using {pre!r}", file=sys.stderr)
        return pre
base.TextModel.get_vocab_base_pre = with_fallback
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Skipped(Exception):
    """A step that cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter, fetched from the sdist
# ---------------------------------------------------------------------------------------------
def llamacpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def fetch_converter(cache: Path) -> Path:
    """The directory holding convert_hf_to_gguf.py, conversion/ and gguf-py/ of the installed
    llama-cpp-python's vendored llama.cpp (downloaded and unpacked once into `cache`)."""
    ver = llamacpp_version()
    root = cache / f"llama.cpp-{ver}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        print(f"fetching the llama-cpp-python {ver} sdist (vendors llama.cpp) into {cache} ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                            "--no-binary", ":all:", "-d", str(cache)], capture_output=True, text=True)
        if r.returncode or not sdist.is_file():
            raise Skipped(f"pip download llama-cpp-python=={ver} failed: {r.stderr.strip()[-400:]}")
    inner = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    want = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = cache / f".unpack-{ver}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(inner)
                   and m.name[len(inner):].startswith(want) and (m.isfile() or m.isdir())]
        if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
            raise Skipped(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py in the sdist")
        tar.extractall(tmp, members=members, filter="data")
    (tmp / inner).rename(root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def convert(root: Path, ckpt: Path, out: Path, outtype: str = "bf16") -> Path:
    """llama.cpp's converter on `ckpt` -> `out` (--outtype), cached."""
    if out.is_file():
        return out
    from hybrid.convert.gguf_vocab import VocabError, build_vocab
    from hybrid.models import config_from_dir

    try:  # the name hybrid's own converter would write
        pre = build_vocab(ckpt, config_from_dir(ckpt).vocab_size).pre
    except VocabError as e:
        raise Skipped(f"{ckpt}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    cmd = [sys.executable, "-c", _RUNNER, str(root), pre, str(ckpt), "--outfile", str(tmp), "--outtype", outtype]
    print(f"llama.cpp convert_hf_to_gguf.py {ckpt} --outtype {outtype} -> {out} ...", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONNOUSERSITE="1"))
    if r.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise Skipped(f"llama.cpp's converter failed on {ckpt}:\n{r.stderr.strip()[-1500:]}")
    for line in r.stderr.splitlines():
        if "[llamacpp-made]" in line:
            print(line, file=sys.stderr)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp's quantiser (libllama through llama-cpp-python)
# ---------------------------------------------------------------------------------------------
def quantize(src: Path, kind: str, threads: int) -> Path:
    """llama_model_quantize(src -> src with kind) with default params (no imatrix), cached; run
    in a subprocess (libllama logs every tensor; the tail is shown when it fails)."""
    if kind == "bf16":
        return src
    if kind in NEEDS_IMATRIX:
        raise Skipped(f"{kind}: llama.cpp's quantiser needs an importance matrix for this type; none is computed here")
    import llama_cpp

    if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}"):
        raise Skipped(f"{kind}: llama_cpp has no LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    out = src.with_name(src.name.replace("-bf16.gguf", f"-{kind}.gguf"))
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    print(f"llama.cpp llama_model_quantize {src.name} -> {out.name} ({kind}) ...", file=sys.stderr)
    r = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(tmp), kind.upper(), str(threads)],
                       capture_output=True, text=True)
    if r.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise Skipped(f"{kind}: llama_model_quantize failed:\n{(r.stdout + r.stderr).strip()[-1500:]}")
    fallbacks = sorted({line.split("falling back to")[-1].strip() for line in r.stderr.splitlines()
                        if "falling back to" in line})
    if fallbacks:
        print(f"  rows too short for {kind}: llama.cpp fell back to {', '.join(fallbacks)} there", file=sys.stderr)
    tmp.replace(out)
    return out


_QUANTIZE = r"""
import sys, llama_cpp
src, dst, kind, threads = sys.argv[1:]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind)
p.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p))
"""


# ---------------------------------------------------------------------------------------------
# Checkpoints llama.cpp's converter reads
# ---------------------------------------------------------------------------------------------
def checkpoint(kind: str, where: Path, experts: int, vocab: int) -> Path:
    """An HF checkpoint directory of `kind` (CHECKPOINTS) under `where`, written once."""
    if kind == "demo":
        from hybrid.api import DEMO_DIR

        return DEMO_DIR
    if kind == "synthetic":
        from vs_llamacpp import synthetic_checkpoint

        path = synthetic_checkpoint(where / f"k25w-2L-{experts}e-v{vocab}", experts, vocab)
        # model_type kimi_k2 is remote code (a real Kimi checkpoint ships it, with auto_map); the
        # converter's AutoTokenizer reads config.json and knows only transformers' own types
        _edit_config(path, model_type="deepseek_v3")
        return path
    path = where / kind
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(REPO / "tests"))
    import checkpoints
    from vs_llamacpp import _byte_tokenizer

    variant = {"tiny": "plain", "tiny-int4": "int4", "kimi": "kimi_k25"}[kind]
    tmp = where / f".{kind}-partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # vocab 320: the byte tokenizer's 262 ids fit; the converter pads the rest with [PAD{id}]
    made, _ = checkpoints.build(tmp, variant="int4" if kind == "kimi" else variant, shards=1, vocab_size=320)
    # transformers' DeepseekV3Config does not save the router's rule; DeepSeek-V3's and Kimi's own
    # config.json do, and llama.cpp's converter writes expert_gating_func only from it (a file
    # without the key is softmax routing to llama.cpp)
    _edit_config(made, scoring_func="sigmoid", topk_method="noaux_tc")
    if kind == "kimi":  # the INT4 experts inside the K2.5 wrapper
        _wrap_kimi(made)
    _byte_tokenizer(made)
    made.rename(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    if any(cfg.get(k) != v for k, v in fields.items()):
        (path / "config.json").write_text(json.dumps(dict(cfg, **fields), indent=1))


def _wrap_kimi(path: Path) -> None:
    """Re-store a DeepseekV3 checkpoint as Kimi K2.5 does: config under text_config, tensors
    under language_model. (tests/checkpoints.py's kimi_k25 layout)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    text = dict(cfg, model_type="kimi_k2")
    quant = text.pop("quantization_config", None)
    wrapped = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
               "text_config": text, "vision_config": {"hidden_size": 8}, "media_placeholder_token_id": 5}
    if quant is not None:
        wrapped["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(wrapped, indent=1))
    f = path / "model.safetensors"
    tensors = {f"language_model.{k}": v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})
