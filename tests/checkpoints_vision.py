"""Tiny Kimi K2.5 checkpoints with a vision tower, built with transformers' Kimi_K25 model.

`build(tmp_path, seed, naming)` makes a seeded random transformers Kimi_K25ForConditionalGeneration
(the tiny DeepSeek-V3 text model of checkpoints.py + a 2-layer MoonViT) and writes it as
  naming="release":       the tensor names and config keys of the real release (vt_* keys,
                          media_placeholder_token_id, language_model.model.*, vision_tower.encoder.
                          blocks.N.wqkv in the complex-pair rotary layout, mm_projector.proj.0/2) plus
                          the release's preprocessor_config.json (media_proc_cfg). The vision
                          tensors are what transformers' own save_pretrained writes back in the
                          release layout (two of its names fixed), and the test that uses this
                          checks transformers loads the directory back to the same weights;
  naming="transformers":  the vision tensors and config keys as transformers spells them
                          (model.vision_tower.layers.N.attn.q_proj, image_token_id, ...) and an
                          image processor config in transformers' keys.
The returned model (fp32, eval) is the reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from checkpoints import TINY, randomise, saved_by_transformers, write_checkpoint

PLACEHOLDER = 5  # the image placeholder token id of the tiny vocabulary
VISION = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=48,
              patch_size=4, pos_emb_height=8, pos_emb_width=8, merge_kernel_size=[2, 2])
# Small limits so a test image of a few dozen pixels is resized: at most 160 patches, 16 a side.
MEDIA = dict(in_patch_limit=160, patch_limit_on_one_side=16, patch_size=4, merge_kernel_size=2,
             image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])


def hf_config(placeholder: int = PLACEHOLDER, **text_overrides):
    from transformers import Kimi_K25Config

    text = dict(TINY, model_type="deepseek_v3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(text_overrides)
    vision = dict(VISION, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=VISION["hidden_size"],
                         image_token_id=placeholder, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def _randomise_vision(model, seed: int) -> None:
    """Tower and projector: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norms near 1, the
    position table ~ N(0, 0.5^2), so every part moves the output."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in list(model.model.vision_tower.named_parameters()) + list(model.model.mm_projector.named_parameters()):
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif "position_embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def build(tmp_path, seed: int = 0, naming: str = "release", shards: int = 2, placeholder: int = PLACEHOLDER,
          **text_overrides):
    """-> (checkpoint dir, transformers reference model in fp32 eval mode)."""
    from transformers import Kimi_K25ForConditionalGeneration

    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(hf_config(placeholder, **text_overrides)).eval()
    randomise(model.model.language_model, seed)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))
                                   / math.sqrt(model.lm_head.weight.shape[1]))
    _randomise_vision(model, seed)
    path = Path(tmp_path) / f"ckpt-vision-{naming}-{seed}"
    path.mkdir(parents=True, exist_ok=True)
    cfg_json, saved = saved_by_transformers(model, path)
    state = model.state_dict()
    # The text model as DeepseekV3ForCausalLM saves it (one tensor per expert), under language_model.
    text_json, text_tensors = saved_by_transformers(_text_model(model), path)
    tensors = {f"language_model.{k}": v for k, v in text_tensors.items()}
    text = dict(text_json, model_type="kimi_k2")
    if naming == "release":
        for k, v in saved.items():
            if k.startswith(("vision_tower.", "mm_projector.", "model.mm_projector.")):
                # transformers 5.24 writes these two back under names the release does not use
                k = k.replace("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed.")
                tensors[k.replace("model.mm_projector.", "mm_projector.")] = v
        vc = cfg_json["vision_config"]
        cfg_json = {
            "model_type": "kimi_k25", "architectures": ["KimiK25ForConditionalGeneration"],
            "text_config": text, "media_placeholder_token_id": placeholder, "pad_token_id": 0,
            "vision_config": {
                "patch_size": vc["patch_size"], "init_pos_emb_height": vc["pos_emb_height"],
                "init_pos_emb_width": vc["pos_emb_width"], "init_pos_emb_time": vc["pos_emb_time"],
                "pos_emb_type": "divided_fixed", "vt_num_attention_heads": vc["num_attention_heads"],
                "vt_num_hidden_layers": vc["num_hidden_layers"], "vt_hidden_size": vc["hidden_size"],
                "vt_intermediate_size": vc["intermediate_size"], "merge_kernel_size": vc["merge_kernel_size"],
                "video_attn_type": "spatial_temporal", "merge_type": "sd2_tpool",
                "mm_projector_type": "patchmerger", "mm_hidden_size": vc["hidden_size"],
                "projector_hidden_act": "gelu", "projector_ln_eps": 1e-5,
                "text_hidden_size": text["hidden_size"]},
        }
        pre = {"media_proc_cfg": dict(MEDIA, config_type="media_proc_cfg", fixed_output_tokens=None)}
    elif naming == "transformers":
        for k, v in state.items():
            if k.startswith(("model.vision_tower.", "model.mm_projector.")):
                tensors[k] = v
        cfg_json = dict(cfg_json, text_config=text)
        pre = {"image_processor_type": "Kimi_K25ImageProcessor", "max_patches": MEDIA["in_patch_limit"],
               "size": {"max_height": MEDIA["patch_limit_on_one_side"], "max_width": MEDIA["patch_limit_on_one_side"]},
               "patch_size": MEDIA["patch_size"], "merge_size": MEDIA["merge_kernel_size"],
               "image_mean": MEDIA["image_mean"], "image_std": MEDIA["image_std"]}
    else:
        raise ValueError(naming)
    write_checkpoint(path, cfg_json, tensors, shards)
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path, model


def _text_model(model):
    """The reference's language model and LM head as a DeepseekV3ForCausalLM (shared weights)."""
    from transformers import DeepseekV3ForCausalLM

    text = DeepseekV3ForCausalLM(model.config.text_config).eval()
    text.model = model.model.language_model
    text.lm_head = model.lm_head
    return text


def reference_inputs(images, placeholder: int = PLACEHOLDER):
    """transformers' pixel_values / image_grid_thw for PreparedImages (hybrid/models/moonvit_images.py)."""
    pixel_values = torch.cat([im.pixels for im in images])
    grid = torch.tensor([[1, *im.grid] for im in images], dtype=torch.long)
    return pixel_values, grid


def picture(w: int, h: int, seed: int):
    """A smooth random PIL picture (noise would make bicubic resizing the whole difference)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [127 + 120 * np.sin(xx / rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(2, 9))
             for _ in range(3)]
    return Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))
