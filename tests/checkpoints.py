"""Tiny DeepSeek-V3-architecture checkpoints for tests, built with transformers.

`build(tmp_path, **overrides)` makes a seeded random transformers DeepseekV3ForCausalLM (weights
scaled so activations and router scores stay spread out), optionally re-stores it as
  variant="int4":  routed experts in compressed-tensors pack-quantized INT4 group 32, packed by
                   compressed_tensors' own pack_to_int32;
  variant="fp8":   DeepSeek-V3 FP8 e4m3 block weights + weight_scale_inv;
  variant="kimi_k25": the multimodal wrapper (text_config, `language_model.` prefix, a stray
                   vision tensor that must be ignored),
and writes it sharded with an index (or single-file with save_pretrained when shards=1). The
returned transformers model holds exactly the weights the checkpoint decodes to (dequantised
for int4/fp8), so it is the reference. The writing helpers (randomise, saved_by_transformers,
store_fp8, write_checkpoint, logits_hooking) serve checkpoints_qwen3.py too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=64, num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_interleave=True, bos_token_id=0, eos_token_id=1,
)

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707,
        "rope_theta": 50000.0}


def hf_config(**overrides):
    from transformers import DeepseekV3Config

    kw = dict(TINY)
    kw.update(overrides)
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    cfg = DeepseekV3Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomise(model, seed: int, bias_std: float | None = None) -> None:
    """Weights ~ N(0, 1/fan_in) so each layer keeps activations O(1); norms near 1; router
    logits (std 2) and correction bias spread so top-k choices are rarely near ties. With
    bias_std, biases ~ N(0, bias_std^2) (else they are drawn as the linear weights are)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):  # router [E, H]
                p.copy_(2.0 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif bias_std is not None and name.endswith("bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
            else:  # linear weights [.., out, in]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))


def _expert_modules(model):
    """(layer index, experts module) for each MoE layer."""
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            yield i, layer.mlp.experts


def quantize_int4_g32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (q [N, K] int8 in [-8, 7], scale [N, K/32] bf16), symmetric per group of 32."""
    N, K = w.shape
    g = w.float().view(N, K // 32, 32)
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)  # [N, K/32]
    q = (g / scale.float()[..., None]).round().clamp(-8, 7).to(torch.int8).view(N, K)
    return q, scale


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 [N, K], scale_inv [ceil(N/bn), ceil(K/bk)] fp32)."""
    N, K = w.shape
    bn, bk = block
    sN, sK = -(-N // bn), -(-K // bk)
    pad = torch.zeros(sN * bn, sK * bk)
    pad[:N, :K] = w.float()
    blocks = pad.view(sN, bn, sK, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # [sN, sK]
    q = (blocks / scale[:, None, :, None]).view(sN * bn, sK * bk)[:N, :K].to(torch.float8_e4m3fn)
    return q, scale


def fp8_quant_config(block: tuple[int, int]) -> dict:
    """config.json's quantization_config for block FP8 e4m3 (as DeepSeek-V3 and Qwen3-*-FP8 ship)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def store_fp8(model, tensors: dict[str, torch.Tensor], block: tuple[int, int], quantized) -> None:
    """Re-store each checkpoint tensor whose name `quantized(name)` accepts as block FP8 +
    weight_scale_inv, and write its dequantised value back into the reference model."""
    bn, bk = block
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in list(tensors):
            if not quantized(name):
                continue
            q, s = quantize_fp8_block(tensors[name], block)
            tensors[name] = q
            tensors[name.replace(".weight", ".weight_scale_inv")] = s
            deq = q.float() * s.repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
            _set_reference(model, params, name, deq)


def saved_by_transformers(model, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) as transformers' save_pretrained writes the model (in a scratch
    folder under `path`, removed again)."""
    from safetensors.torch import load_file

    tmp = path / "_hf"
    model.save_pretrained(str(tmp))
    cfg_json = json.loads((tmp / "config.json").read_text())
    tensors = {}
    for f in sorted(tmp.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return cfg_json, tensors


def write_checkpoint(path: Path, cfg_json: dict, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """config.json and the tensors: one model.safetensors when shards=1, else `shards` files
    and an index."""
    from safetensors.torch import save_file

    (path / "config.json").write_text(json.dumps(cfg_json, indent=1))
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s * per : (s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build(tmp_path, variant: str = "plain", seed: int = 0, shards: int = 2, fp8_block=(16, 16), **overrides):
    """-> (checkpoint dir, transformers reference model in fp32 eval mode)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomise(model, seed)
    path = Path(tmp_path) / f"ckpt-{variant}-{seed}"
    path.mkdir(parents=True, exist_ok=True)
    quant = None
    packed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if variant == "int4":
            for i, ex in _expert_modules(model):
                I = ex.intermediate_dim
                for e in range(ex.num_experts):
                    mats = {"gate_proj": ex.gate_up_proj[e, :I], "up_proj": ex.gate_up_proj[e, I:],
                            "down_proj": ex.down_proj[e]}
                    for proj, w in mats.items():
                        q, scale = quantize_int4_g32(w)
                        w.copy_(q.float() * scale.float().repeat_interleave(32, 1))
                        packed.update(_int4_tensors(f"model.layers.{i}.mlp.experts.{e}.{proj}", q, scale))
            quant = {
                "quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "kv_cache_scheme": None,
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "input_activations": None, "output_activations": None,
                    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                "group_size": 32, "dynamic": False, "actorder": None, "observer": "minmax"}}},
                "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
            }
        if variant == "fp8":
            quant = fp8_quant_config(fp8_block)
    cfg_json, tensors = saved_by_transformers(model, path)

    if variant == "int4":
        for name in list(tensors):
            if ".mlp.experts." in name:
                del tensors[name]
        tensors.update(packed)
    if variant == "fp8":
        store_fp8(model, tensors, fp8_block, lambda n: n.endswith("proj.weight") or "proj_with_mqa" in n)
    if quant is not None:
        cfg_json["quantization_config"] = quant
    if variant == "kimi_k25":
        text = dict(cfg_json, model_type="kimi_k2")
        cfg_json = {"model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
                    "text_config": text, "vision_config": {"hidden_size": 8}, "media_placeholder_token_id": 5}
        tensors = {f"language_model.{k}": v for k, v in tensors.items()}
        tensors["vision_tower.patch_embed.weight"] = torch.randn(8, 8)
    write_checkpoint(path, cfg_json, tensors, shards)
    return path, model


def _int4_tensors(prefix: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return {
        f"{prefix}.weight_packed": pack_to_int32(q, 4),
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
    }


def _set_reference(model, params: dict, ckpt_name: str, value: torch.Tensor) -> None:
    """Write a dequantised checkpoint tensor back into the transformers model (whose experts
    are fused [E, 2I, H] / [E, H, I] while the checkpoint stores one tensor per expert)."""
    if ".mlp.experts." in ckpt_name:
        parts = ckpt_name.split(".")
        layer, e, proj = int(parts[2]), int(parts[5]), parts[6]
        ex = model.model.layers[layer].mlp.experts
        I = ex.intermediate_dim
        if proj == "gate_proj":
            ex.gate_up_proj[e, :I] = value
        elif proj == "up_proj":
            ex.gate_up_proj[e, I:] = value
        else:
            ex.down_proj[e] = value
        return
    params[ckpt_name].copy_(value)


def reference_logits(model, ids: torch.Tensor, tie_eps: float = 1e-3, **inputs):
    """transformers logits [T, Vocab] for one sequence, and near_tie [T] bool: positions where,
    in any MoE layer, the K-th and (K+1)-th biased router scores (or, with groups, the last
    chosen and first rejected group scores) are within tie_eps. There the runtimes may
    legitimately route differently. inputs: more model inputs (pixel_values, image_grid_thw)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    ties = torch.zeros(ids.shape[-1], dtype=torch.bool)

    def hook(router, args, _out):
        x = args[0].reshape(-1, router.hidden_dim).float()
        s = torch.sigmoid(x @ router.weight.float().T) + router.e_score_correction_bias
        T, E, G = s.shape[0], router.num_experts, router.num_group
        if G > 1:
            gs = s.view(T, G, E // G).topk(2, -1)[0].sum(-1).sort(-1, descending=True)[0]
            ties.logical_or_(gs[:, router.topk_group - 1] - gs[:, router.topk_group] < tie_eps)
            keep = gs[:, router.topk_group - 1 : router.topk_group]
            gscore = s.view(T, G, E // G).topk(2, -1)[0].sum(-1)
            s = s.masked_fill(~(gscore >= keep)[:, :, None].expand(T, G, E // G).reshape(T, E), float("-inf"))
        top = s.sort(-1, descending=True)[0]
        ties.logical_or_(top[:, router.top_k - 1] - top[:, router.top_k] < tie_eps)

    return logits_hooking(model, ids, DeepseekV3TopkRouter, hook, **inputs), ties


def logits_hooking(model, ids: torch.Tensor, module_class, hook, **inputs) -> torch.Tensor:
    """transformers logits [T, Vocab] for one sequence, with `hook` as a forward hook on every
    `module_class` module during the run."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, module_class)]
    try:
        with torch.no_grad():
            return model(ids[None], **inputs).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def add_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over ids 0..vocab_size-1 ("<s>" = 0, "</s>" = 1, then "w2".."wN")
    plus tokenizer_config.json naming bos/eos, so hybrid.load finds a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def load_model(path, device="cpu", dtype=torch.bfloat16, **kw):
    """-> (config, network) through the runtime's builder, without hybrid.load's thread split
    (tests keep the process's threads as they are)."""
    from hybrid.runtime.build import build_model

    kw.setdefault("progress", False)
    built = build_model(path, device, dtype, split_threads=False, **kw)
    return built.config, built.network
