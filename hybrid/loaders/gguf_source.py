"""The weight source for a GGUF file: tensors by the checkpoint module names the models ask for
(hybrid/loaders/source.py's interface), found under llama.cpp's GGUF names and dequantised once
(gguf.quants) to fp32 here, then to the device format the runtime asks for.

  HF module (layer i)                              GGUF tensor
  model.embed_tokens / model.norm / lm_head         token_embd / output_norm / output (absent: tied)
  input_layernorm / post_attention_layernorm        blk.i.attn_norm / blk.i.ffn_norm
  self_attn.o_proj                                  blk.i.attn_output
  deepseek2: self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj      blk.i.attn_q | attn_q_a, attn_q_a_norm, attn_q_b
             self_attn.kv_a_proj_with_mqa, kv_a_layernorm            blk.i.attn_kv_a_mqa, attn_kv_a_norm
             self_attn.kv_b_proj [Nh*(Dn+Dv), C]     blk.i.attn_kv_b, or blk.i.attn_k_b [Nh, C, Dn]
                                                     (per head transposed) + blk.i.attn_v_b [Nh, Dv, C]
  qwen3moe:  self_attn.{q,k,v}_proj, {q,k}_norm      blk.i.attn_{q,k,v}, attn_{q,k}_norm
  mlp.{gate,up,down}_proj (dense layers)            blk.i.ffn_{gate,up,down}
  mlp.gate.weight / gate.e_score_correction_bias    blk.i.ffn_gate_inp / blk.i.exp_probs_b.bias
  mlp.shared_experts.{gate,up,down}_proj            blk.i.ffn_{gate,up,down}_shexp
  mlp.experts.{e}.{gate,up,down}_proj               blk.i.ffn_{gate,up,down}_exps [E, out, in], entry e
(shapes in torch order). This table is the one place hybrid keeps llama.cpp's names: the loader
reads by it and hybrid/convert/gguf_export.py writes by it (gguf_name, expert_tensor_names,
mla_split_names).

Legend: E routed experts, Nh heads, C kv_lora_rank, Dn/Dv no-rope / value head dims.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from hybrid.loaders.gguf_file import GGUFError, GGUFFile, GGUFTensor, block_of
from hybrid.loaders.quant import PackedWeight
from hybrid.loaders.source import WeightSource

TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "attn_output",
    "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
SUFFIX = {"weight": "weight", "bias": "bias", "e_score_correction_bias": None}  # None: exp_probs_b.bias
EXPERT_PROJS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
MLA_SPLIT = ("attn_k_b", "attn_v_b")  # kv_b_proj split for MLA absorption (llama.cpp's converter)
EMBED_CHUNK = 1 << 24  # values dequantised at a time for the embedding table
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def gguf_name(name: str) -> str:
    """A checkpoint tensor name (module path + .weight/.bias/...) -> its GGUF tensor name."""
    module, _, suffix = name.rpartition(".")
    if suffix not in SUFFIX:
        raise GGUFError(f"tensor {name}: no GGUF name for this kind of tensor")
    if module in TOP:
        return f"{TOP[module]}.{suffix}"
    m = _LAYER_RE.match(module)
    if m is None or m[2] not in LAYER:
        raise GGUFError(f"tensor {name}: no GGUF name for this module")
    if SUFFIX[suffix] is None:
        return f"blk.{m[1]}.exp_probs_b.bias"
    return f"blk.{m[1]}.{LAYER[m[2]]}.{suffix}"


def expert_tensor_names(layer: int) -> dict[str, str]:
    """{"gate_proj"|"up_proj"|"down_proj": GGUF name} of a layer's stacked routed experts."""
    return {proj: f"blk.{layer}.{g}.weight" for proj, g in EXPERT_PROJS.items()}


def mla_split_names(layer: int) -> tuple[str, str]:
    """(k_b, v_b) GGUF names of a layer's split kv_b_proj: [Nh, C, Dn] and [Nh, Dv, C]."""
    k, v = MLA_SPLIT
    return f"blk.{layer}.{k}.weight", f"blk.{layer}.{v}.weight"


class GGUFSource(WeightSource):
    def __init__(self, config, g: GGUFFile, device, dtype):
        self.config, self.files, self.gguf = config, g, g
        self.device, self.dtype = torch.device(device), dtype
        self.prefix = ""

    # ---- raw reads -------------------------------------------------------------------------
    def file_of(self, name: str):
        t = self.gguf.tensors.get(self._resolve(name)[0])
        return t.file if t is not None else self.gguf.path

    def _resolve(self, name: str) -> tuple[str, int | None]:
        """(GGUF tensor name, expert entry or None) of a checkpoint tensor name."""
        module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias", ".e_score_correction_bias")) else name
        m = _LAYER_RE.match(module)
        if m is not None:
            e = _EXPERT_RE.match(m[2])
            if e is not None:
                return f"blk.{m[1]}.{EXPERT_PROJS[e[2]]}.weight", int(e[1])
        return gguf_name(name if module != name else name + ".weight"), None

    def _info(self, gname: str, shape, name: str) -> GGUFTensor:
        if gname not in self.gguf:
            raise GGUFError(f"{self.gguf.path}: tensor {gname} (the model's {name}) is missing")
        t = self.gguf.info(gname)
        if shape is not None and t.shape != tuple(shape):
            raise GGUFError(f"{t.file}: tensor {gname} has shape {list(t.shape)}, the metadata implies "
                            f"{list(shape)}")
        return t

    def _values(self, gname: str, shape, name: str) -> torch.Tensor:
        self._info(gname, shape, name)
        return torch.from_numpy(np.array(self.gguf.values(gname), dtype=np.float32, copy=True))

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gname, _ = self._resolve(name)
        return self._values(gname, shape, name)

    def embedding(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """The host table in the compute dtype, dequantised in row chunks (K2.5's table is 1.2 G
        values: one fp32 copy of it would be 4.7 GB on top of the result)."""
        gname, _ = self._resolve(name)
        self._info(gname, shape, name)
        out = torch.empty(shape, dtype=self.dtype)
        step = max(1, EMBED_CHUNK // shape[1])
        for r in range(0, shape[0], step):
            n = min(step, shape[0] - r)
            out[r:r + n] = torch.from_numpy(np.array(self.gguf.values(gname, r, n), dtype=np.float32, copy=True))
        return out

    def linear(self, name: str, shape: tuple[int, int], fmt: str = "dense", bias: bool = False):
        """As WeightSource.linear; fmt "blocks" gives the tensor's own blocks repacked for the
        native kernels (a PackedWeight, host memory) where a kernel runs its type and its shape
        fits the packed layout, and dense otherwise."""
        packed = self.blocks(name, shape) if fmt == "blocks" else None
        if packed is None:  # WeightSource.linear reads "blocks" as dense
            return super().linear(name, shape, fmt, bias=bias)
        b = self.tensor(f"{name}.bias", (shape[0],)).to(self.device, self.dtype) if bias else None
        return packed, b, None

    def blocks(self, name: str, shape: tuple[int, int]) -> PackedWeight | None:
        """Linear weight `name` [N, K] in its GGUF blocks, repacked losslessly (pack_gguf: the
        same values); None when its type has no native kernel (F32/F16/BF16, Q5_0, IQ4_NL, ...),
        its rows are not a multiple of 16 or its inputs of the type's block, or the extension is
        not built."""
        from hybrid import native

        gname, e = self._resolve(name)
        if e is not None or gname not in self.gguf:  # an expert, or kv_b in the split MLA form
            return None
        t = self._info(gname, shape, name)
        lib = native.lib_or_none()
        n, k = shape
        if t.type_name not in native.GGUF_NATIVE or lib is None or n % 16 or k % block_of(t.type_id)[0]:
            return None
        q, s = lib.pack_gguf(self.gguf.raw(gname), t.type_name.lower(), n, k)
        return PackedWeight(torch.from_numpy(q), torch.from_numpy(s.view(np.int16)) if s.size else None,
                            t.type_name.lower(), (n, k), name=name)

    def float_weight(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Linear weight `name` (a module path) as fp32 [out, in], dequantised from its GGUF type."""
        gname, e = self._resolve(name)
        if e is not None:  # one routed expert out of the stack [E, out, in]
            t = self._info(gname, None, name)
            if t.shape[1:] != tuple(shape) or e >= t.shape[0]:
                raise GGUFError(f"{t.file}: tensor {gname} has shape {list(t.shape)}, the metadata implies "
                                f"[>{e}, {', '.join(map(str, shape))}]")
            return torch.from_numpy(np.array(self.gguf.values(gname, e, 1)[0], dtype=np.float32, copy=True))
        if gname.endswith(".attn_kv_b.weight") and gname not in self.gguf:
            return self._kv_b_from_split(gname, shape, name)
        return self._values(gname, shape, name)

    def _kv_b_from_split(self, gname: str, shape, name: str) -> torch.Tensor:
        """kv_b [Nh*(Dn+Dv), C] rebuilt from the split MLA form: k_b [Nh, C, Dn] and v_b [Nh, Dv, C]."""
        c = self.config
        Nh, Dn, Dv, C = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        kb, vb = mla_split_names(int(gname.split(".")[1]))  # gname: blk.{i}.attn_kv_b.weight
        if kb not in self.gguf or vb not in self.gguf:
            raise GGUFError(f"{self.gguf.path}: the model's {name} needs tensor {gname}, or {kb} and {vb}; "
                            "none is in the file")
        k = self._reshaped(kb, (Nh, C, Dn))
        v = self._reshaped(vb, (Nh, Dv, C))
        kv = torch.cat([k.transpose(1, 2), v], dim=1)  # [Nh, Dn+Dv, C]
        return kv.reshape(tuple(shape))

    def _reshaped(self, gname: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.gguf.info(gname)
        if t.numel != int(np.prod(shape)) or t.shape[-1] != shape[-1]:
            raise GGUFError(f"{t.file}: tensor {gname} has shape {list(t.shape)}, the metadata implies {list(shape)}")
        return torch.from_numpy(np.array(self.gguf.values(gname), dtype=np.float32, copy=True)).reshape(shape)

    def expert_tensors(self, layer: int, E: int, H: int, I: int) -> dict[str, GGUFTensor]:
        """The layer's stacked routed experts by projection, shapes checked: gate/up [E, I, H], down [E, H, I]."""
        want = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        return {proj: self._info(g, want[proj], f"model.layers.{layer}.mlp.experts.*.{proj}")
                for proj, g in expert_tensor_names(layer).items()}
