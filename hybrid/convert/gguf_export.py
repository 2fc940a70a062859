"""Write a checkpoint as a GGUF file that llama.cpp loads (architecture `deepseek2`).

The weights are read through hybrid's own loader (hybrid/loaders: config.json parsing, the
safetensors index, FP8-block and compressed-tensors INT4 dequantisation), so the GGUF holds what
`hybrid.load` computes with. Metadata keys and tensor names are the ones llama.cpp's
convert_hf_to_gguf.py writes for DeepseekV2/V3 (facts from that converter); the names come from
the loader's table (hybrid/loaders/gguf_source.py: gguf_name, expert_tensor_names,
mla_split_names), which this module asks, so reading and writing cannot drift apart. kv_b_proj
[Nh*(Dn+Dv), C] is written split, as that converter does: attn_k_b [Nh, C, Dn] (transposed per
head) + attn_v_b [Nh, Dv, C] (MLA absorption); routed experts are stacked [E, out, in]
(shapes in torch order; GGUF stores the dimensions reversed). MLA is written as llama.cpp wants
it: head_count_kv 1, key_length C + Dr, value_length C, key_length_mla Dn + Dr,
value_length_mla Dv.

Legend: E routed experts, H hidden, I expert width, Nh heads, C kv_lora_rank, Dn/Dr/Dv the
no-rope / rope / value head dims.

Transforms applied to values (all documented, all checked by tests/test_convert_gguf.py):
  - every weight is dequantised to fp32 by the loader, then stored as --type (f32, f16, bf16,
    or q8_0 = llama.cpp's 32-value blocks, one fp16 scale each). Norms, the router and its
    bias are always f32 (llama.cpp keeps them f32 too); a q8_0 tensor whose rows are not a
    multiple of 32 falls back to f16.
  - INT4 routed experts (compressed-tensors, group 32) are dequantised to --type. GGUF's Q4_0
    is a different quantisation in general (ggml's quantiser picks d = max/-8 with an fp16
    scale, ours are bf16 scales from the model's own training-aware quantiser), so by default
    they are not copied as 4-bit. f16 holds them exactly (a 4-bit integer times a bf16 scale
    needs at most 11 significant bits) unless a scale is below f16's normal range; bf16 rounds
    them; q8_0 requantises.
    --expert-type q4_0 instead repacks them losslessly: Q4_0's decode rule is x = d * (u - 8)
    for a nibble u and one fp16 d per 32 values along the row, which is exactly
    scale * q with u = q + 8 when the group is 32 and every bf16 scale is an fp16 value too
    (true unless a scale is outside fp16's range, below ~6e-8 or above 65504, or a tiny
    subnormal that loses bits; checked, never rounded). Only the
    nibble order differs (Q4_0 byte j of a block holds values j and j + 16).
  - rope_interleave=false checkpoints (rope dims stored half-split) get their rope rows of
    q_b_proj / q_proj / kv_a_proj_with_mqa reordered to adjacent pairs, which is the layout
    llama.cpp's deepseek2 rope (NORM type) rotates.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
EXPERT_TYPES = ("same", "q4_0")  # q4_0: exact repack of INT4 group-32 experts
ARCH = "deepseek2"
Q8_BLOCK = 32  # values per q8_0 block; the block is one fp16 scale + 32 int8 (34 bytes)
Q4_BLOCK = 32  # values per q4_0 block; one fp16 scale + 16 bytes of nibbles (18 bytes)


class ConvertError(ValueError):
    """The checkpoint cannot be written as a deepseek2 GGUF; the message says which field/tensor."""


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order
    out: str  # "f32" | "f16" | "bf16" | "q8_0"
    chunks: Callable[[], Iterator[torch.Tensor]]  # fp32 pieces along dim 0, in order

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n // Q8_BLOCK * (Q8_BLOCK + 2),
                "q4_0": n // Q4_BLOCK * (Q4_BLOCK // 2 + 2)}[self.out]


# ---------------------------------------------------------------------------------------------
# Encoding fp32 tensors into GGUF storage types
# ---------------------------------------------------------------------------------------------
def quantize_q8_0(x: torch.Tensor) -> np.ndarray:
    """[..., K] fp32 (K % 32 == 0) -> [..., K/32*34] uint8: per block of 32, the scale
    d = max|x|/127 as fp16 little-endian, then round(x/d) as int8 (ggml's Q8_0)."""
    *lead, K = x.shape
    b = x.reshape(-1, Q8_BLOCK).float()  # [B, 32]
    d = b.abs().amax(dim=1) / 127.0  # [B]
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = (b * inv[:, None]).round().clamp(-127, 127).to(torch.int8)  # [B, 32]
    scale = d.to(torch.float16).view(torch.uint8).view(-1, 2)  # [B, 2]
    out = torch.cat([scale, q.view(torch.uint8)], dim=1)  # [B, 34]
    return out.reshape(*lead, K // Q8_BLOCK * (Q8_BLOCK + 2)).numpy()


def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of quantize_q8_0 (for tests and checks): uint8 blocks -> fp32 `shape`."""
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, Q8_BLOCK + 2))
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # [B, 1]
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [B, 32]
    return (q * d).reshape(shape)


def repack_int4_q4_0(q: torch.Tensor, scale: torch.Tensor, name: str = "?") -> np.ndarray:
    """INT4 group-32 weight (q [N, K] int8 in [-8, 7], scale [N, K/32]) -> [N, K/32*18] uint8
    GGUF Q4_0 blocks decoding to exactly q * scale (see the module docstring)."""
    N, K = q.shape
    d = scale.float().to(torch.float16)  # [N, K/32]
    if not torch.equal(d.float(), scale.float()):  # out of fp16's range or too many bits
        raise ConvertError(f"{name}.weight_scale: a scale is not exactly an fp16 value; "
                           "--expert-type q4_0 would round it (use --expert-type same)")
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(N, K // Q4_BLOCK, Q4_BLOCK)  # [N, B, 32]
    nibbles = u[..., :16] | (u[..., 16:] << 4)  # [N, B, 16]: byte j = values j, j + 16
    blocks = torch.cat([d.view(torch.uint8).view(N, K // Q4_BLOCK, 2), nibbles], dim=2)  # [N, B, 18]
    return blocks.reshape(N, -1).numpy()


def encode(x: torch.Tensor | np.ndarray, out: str) -> np.ndarray:
    """fp32 tensor -> numpy array whose bytes are the GGUF storage of `out` (arrays already
    in storage form, e.g. repacked q4_0, pass through)."""
    if isinstance(x, np.ndarray):
        return x
    if out == "f32":
        return x.float().contiguous().numpy()
    if out == "f16":
        return x.to(torch.float16).contiguous().numpy()
    if out == "bf16":
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    if out == "q8_0":
        return quantize_q8_0(x)
    raise ValueError(f"unknown GGUF type {out!r} ({', '.join(OUT_TYPES)})")


def _row_slices(x, max_elems: int = 1 << 24):
    """Split a tensor along dim 0 into pieces of at most ~max_elems elements (at least one row),
    so encoding temporaries stay small (an embedding of 164k x 7168 is 4.7 GB in fp32)."""
    if isinstance(x, np.ndarray) or x.dim() < 2 or x.numel() <= max_elems:
        yield x
        return
    rows = max(1, max_elems // (x.numel() // x.shape[0]))
    for i in range(0, x.shape[0], rows):
        yield x[i : i + rows]


class _Streamed:
    """What gguf.GGUFWriter.write_tensor_data needs of an array (nbytes, tofile), produced piece
    by piece so a stacked expert tensor (GBs at full width) never exists whole in memory."""

    def __init__(self, t: PlannedTensor, bar):
        self.t, self.bar, self.nbytes = t, bar, t.nbytes

    def tofile(self, f) -> None:
        written = 0
        for piece in self.t.chunks():
            for part in _row_slices(piece):
                arr = encode(part, self.t.out)
                arr.tofile(f)
                written += arr.nbytes
                if self.bar is not None:
                    self.bar.update(arr.nbytes)
        if written != self.nbytes:  # a bug here would write a corrupt file: refuse loudly
            raise RuntimeError(f"GGUF tensor {self.t.name}: wrote {written} bytes, planned {self.nbytes}")


# ---------------------------------------------------------------------------------------------
# The tensor plan
# ---------------------------------------------------------------------------------------------
def _rope_pairs_perm(n_rows: int, block: int, rope: int) -> torch.Tensor:
    """Row order that turns, in each `block` of rows whose last `rope` rows are half-split rope
    dims (i, i + rope/2 pair up), those rows into adjacent pairs (2i, 2i + 1)."""
    half = rope // 2
    inner = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # [rope]
    one = torch.cat([torch.arange(block - rope), block - rope + inner])  # [block]
    blocks = n_rows // block
    return (one[None, :] + block * torch.arange(blocks)[:, None]).reshape(-1)


def plan_tensors(config, src, out: str, expert_type: str = "same") -> list[PlannedTensor]:
    """Every GGUF tensor of the model: name, shape, storage type and how to produce it."""
    from hybrid.loaders.gguf_source import expert_tensor_names, gguf_name, mla_split_names

    def gn(module: str, suffix: str = "weight") -> str:  # the loader's table owns the names
        return gguf_name(f"{module}.{suffix}")

    c = config
    H, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    Nh, C, Dn, Dr, Dv = c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    E, I = c.n_routed_experts, c.moe_intermediate_size
    plan: list[PlannedTensor] = []

    def kind(shape, small: bool = False) -> str:
        if small or len(shape) == 1:
            return "f32"
        if out == "q8_0" and shape[-1] % Q8_BLOCK:
            return "f16"
        return out

    def add(name, shape, fn, small=False):
        plan.append(PlannedTensor(name, tuple(shape), kind(shape, small), lambda: iter((fn(),))))

    def linear(name, shape, perm=None):
        def fn():
            w = src.float_weight(name, shape)
            return w[perm] if perm is not None else w
        return fn

    # Stored dtype (bf16 for every supported checkpoint): encode() converts row slices.
    add(gn("model.embed_tokens"), (V, H), lambda: src.float_weight("model.embed_tokens", (V, H)))
    for i in range(L):
        p = f"model.layers.{i}"
        add(gn(f"{p}.input_layernorm"), (H,), lambda p=p: src.norm(f"{p}.input_layernorm.weight", H))
        add(gn(f"{p}.post_attention_layernorm"), (H,), lambda p=p: src.norm(f"{p}.post_attention_layernorm.weight", H))
        a = f"{p}.self_attn"
        q_rows = Nh * (Dn + Dr)
        q_perm = None if c.rope_interleave else _rope_pairs_perm(q_rows, Dn + Dr, Dr)
        if c.q_lora_rank is None:
            add(gn(f"{a}.q_proj"), (q_rows, H), linear(f"{a}.q_proj", (q_rows, H), q_perm))
        else:
            R = c.q_lora_rank
            add(gn(f"{a}.q_a_proj"), (R, H), linear(f"{a}.q_a_proj", (R, H)))
            add(gn(f"{a}.q_a_layernorm"), (R,), lambda a=a, R=R: src.norm(f"{a}.q_a_layernorm.weight", R))
            add(gn(f"{a}.q_b_proj"), (q_rows, R), linear(f"{a}.q_b_proj", (q_rows, R), q_perm))
        kv_perm = None if c.rope_interleave else _rope_pairs_perm(C + Dr, C + Dr, Dr)
        add(gn(f"{a}.kv_a_proj_with_mqa"), (C + Dr, H), linear(f"{a}.kv_a_proj_with_mqa", (C + Dr, H), kv_perm))
        add(gn(f"{a}.kv_a_layernorm"), (C,), lambda a=a: src.norm(f"{a}.kv_a_layernorm.weight", C))

        def kv_b(a=a):  # [Nh*(Dn+Dv), C] -> [Nh, Dn+Dv, C]
            return src.float_weight(f"{a}.kv_b_proj", (Nh * (Dn + Dv), C)).view(Nh, Dn + Dv, C)

        k_b, v_b = mla_split_names(i)
        add(k_b, (Nh, C, Dn), lambda kv_b=kv_b: kv_b()[:, :Dn, :].transpose(1, 2))
        add(v_b, (Nh, Dv, C), lambda kv_b=kv_b: kv_b()[:, Dn:, :])
        add(gn(f"{a}.o_proj"), (H, Nh * Dv), linear(f"{a}.o_proj", (H, Nh * Dv)))
        m = f"{p}.mlp"
        if not c.is_moe_layer(i):
            F = c.intermediate_size
            add(gn(f"{m}.gate_proj"), (F, H), linear(f"{m}.gate_proj", (F, H)))
            add(gn(f"{m}.up_proj"), (F, H), linear(f"{m}.up_proj", (F, H)))
            add(gn(f"{m}.down_proj"), (H, F), linear(f"{m}.down_proj", (H, F)))
            continue
        add(gn(f"{m}.gate"), (E, H), lambda m=m: src.fp32(f"{m}.gate.weight", (E, H)), small=True)
        add(gn(f"{m}.gate", "e_score_correction_bias"), (E,), lambda m=m: src.fp32(f"{m}.gate.e_score_correction_bias", (E,)))
        stacked = expert_tensor_names(i)
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            def experts(m=m, proj=proj, shape=shape):
                for e in range(E):  # one expert at a time: [1, out, in]
                    if expert_type == "q4_0":
                        yield _int4_as_q4_0(src, f"{m}.experts.{e}.{proj}", shape)
                    else:
                        yield src.float_weight(f"{m}.experts.{e}.{proj}", shape)[None]
            t = "q4_0" if expert_type == "q4_0" else kind((E, *shape))
            plan.append(PlannedTensor(stacked[proj], (E, *shape), t, experts))
        if c.n_shared_experts:
            S = I * c.n_shared_experts
            sh = f"{m}.shared_experts"
            add(gn(f"{sh}.gate_proj"), (S, H), linear(f"{sh}.gate_proj", (S, H)))
            add(gn(f"{sh}.up_proj"), (S, H), linear(f"{sh}.up_proj", (S, H)))
            add(gn(f"{sh}.down_proj"), (H, S), linear(f"{sh}.down_proj", (H, S)))
    add(gn("model.norm"), (H,), lambda: src.norm("model.norm.weight", H))
    if not c.tie_word_embeddings:
        add(gn("lm_head"), (V, H), linear("lm_head", (V, H)))
    return plan


def _int4_as_q4_0(src, name: str, shape: tuple[int, int]) -> np.ndarray:
    from hybrid.loaders.quant import unpack_int4
    from hybrid.loaders.safetensors_files import FLOAT_DTYPES

    full = src.prefix + name
    n, k = shape
    packed = src.files.get(f"{full}.weight_packed", (n, k // 8), (torch.int32,))
    scale = src.files.get(f"{full}.weight_scale", (n, k // Q4_BLOCK), FLOAT_DTYPES)
    return repack_int4_q4_0(unpack_int4(packed, n, k, full), scale, full)


def check_expert_type(config, files, expert_type: str) -> None:
    if expert_type not in EXPERT_TYPES:
        raise ConvertError(f"--expert-type {expert_type!r} is not supported ({', '.join(EXPERT_TYPES)})")
    if expert_type != "q4_0":
        return
    q = config.quant
    if q is None or q.method != "compressed-tensors" or q.group_size != Q4_BLOCK:
        raise ConvertError("--expert-type q4_0 repacks INT4 group-32 routed experts exactly; this checkpoint's "
                           "experts are not compressed-tensors INT4 group 32 (use --expert-type same)")
    first = next((i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)), None)
    name = f"{config.tensor_prefix}model.layers.{first}.mlp.experts.0.gate_proj.weight_packed"
    if first is not None and name not in files:
        raise ConvertError(f"--expert-type q4_0: tensor {name} is missing; routed experts are not INT4 "
                           "(use --expert-type same)")
    if config.moe_intermediate_size % Q4_BLOCK or config.hidden_size % Q4_BLOCK:
        raise ConvertError("--expert-type q4_0: hidden_size and moe_intermediate_size must be multiples of 32")


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def check_supported(config) -> None:
    c = config
    if c.attention_bias:
        raise ConvertError("config.json: attention_bias=true is not supported by llama.cpp's deepseek2")
    r = c.rope
    if r.rope_type == "yarn" and r.mscale is not None and r.mscale_all_dim is not None \
            and abs(r.mscale - r.mscale_all_dim) > 1e-9:
        print(f"warning: rope mscale={r.mscale} differs from mscale_all_dim={r.mscale_all_dim}; llama.cpp's "
              "deepseek2 assumes they are equal (rope cos/sin unscaled), so its output will differ",
              file=sys.stderr)


def write_metadata(w, config, name: str, out: str) -> None:
    import gguf

    c = config
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA is run as MQA over the latent
    w.add_rope_freq_base(c.rope.theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # config.py accepts only sigmoid
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_vocab_size(c.vocab_size)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    if c.norm_topk_prob:  # llama.cpp's converter writes the key only when true
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    r = c.rope
    if r.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
        if r.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(r.attention_factor)
        if r.beta_fast is not None:
            w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        if r.beta_slow is not None:
            w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
        if r.mscale_all_dim is not None:
            # llama.cpp's deepseek2 reads 0.1 * mscale_all_dim here (its softmax scale is
            # (1 + this * ln(factor))^2 / sqrt(qk_head_dim), the same as config.softmax_scale).
            w.add_rope_scaling_yarn_log_mul(0.1 * r.mscale_all_dim)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def convert_to_gguf(checkpoint: str | Path, out_path: str | Path, out: str = "bf16", *,
                    expert_type: str = "same", pre: str | None = None, progress: bool = True) -> Path:
    """Write `checkpoint` (a directory hybrid.load accepts) as a deepseek2 GGUF at `out_path`."""
    import gguf
    from hybrid.config import ModelConfig
    from hybrid.models import config_from_dir
    from hybrid.convert.gguf_vocab import VocabError, build_vocab, write_vocab
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.loaders.source import WeightSource

    if out not in OUT_TYPES:
        raise ConvertError(f"--type {out!r} is not supported (supported: {', '.join(OUT_TYPES)})")
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if not out_path.parent.is_dir():
        raise ConvertError(f"--out {out_path}: directory {out_path.parent} does not exist")
    if out_path.is_dir():
        raise ConvertError(f"--out {out_path}: is a directory; give a file name")
    config = config_from_dir(checkpoint)
    if not isinstance(config, ModelConfig):
        raise ConvertError(f"{checkpoint}: model_type {config.model_type!r}: --to gguf writes llama.cpp's "
                           f"deepseek2 architecture only (DeepSeek-V3/R1, Kimi K2/K2.5)")
    check_supported(config)
    try:
        vocab = build_vocab(checkpoint, config.vocab_size, pre)
    except VocabError as e:
        raise ConvertError(str(e)) from None
    files = SafetensorsFiles(checkpoint)
    files.file_sizes_ok()
    check_expert_type(config, files, expert_type)
    src = WeightSource(config, files, "cpu", torch.float32)
    plan = plan_tensors(config, src, out, expert_type)

    w = gguf.GGUFWriter(str(out_path), ARCH)
    write_metadata(w, config, checkpoint.name, out)
    write_vocab(w, vocab)
    for t in plan:
        byte_shape = t.shape if t.out in ("f32", "f16") else _byte_shape(t)
        dtype = {"f32": np.float32, "f16": np.float16}.get(t.out, np.uint8)
        raw = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
               "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(t.out)
        w.add_tensor_info(t.name, byte_shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.nbytes for t in plan), desc=f"writing {out_path.name}", unit="B",
                   unit_scale=True, leave=False, file=sys.stderr)
    try:
        with written_whole(w, out_path) as tmp:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in plan:
                w.write_tensor_data(_Streamed(t, bar))
    finally:
        if bar is not None:
            bar.close()
    return out_path


@contextlib.contextmanager
def written_whole(w, out_path: Path) -> Iterator[Path]:
    """The temporary path a GGUFWriter `w` writes out_path through: renamed to out_path when the
    block ends, removed if it raises, so a crash never leaves a plausible but short .gguf."""
    tmp = out_path.with_name(out_path.name + ".partial")
    try:
        yield tmp
        w.close()
        tmp.replace(out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def _byte_shape(t: PlannedTensor) -> tuple[int, ...]:
    *lead, k = t.shape
    if t.out == "bf16":
        return (*lead, 2 * k)
    if t.out == "q4_0":
        return (*lead, k // Q4_BLOCK * (Q4_BLOCK // 2 + 2))
    return (*lead, k // Q8_BLOCK * (Q8_BLOCK + 2))
