"""Write a Kimi K2.5 checkpoint's vision tower as llama.cpp's mmproj GGUF (the file llama.cpp's
`convert_hf_to_gguf.py --mmproj` writes; `hybrid convert` writes it beside the text GGUF).

The tensors are read through hybrid's own reader of either naming (the release's or
transformers', hybrid/models/moonvit.py) and put in the release's layout; the GGUF names, the
query/key row order and the metadata keys are those of hybrid/models/moonvit_gguf.py (which
reads these files, so writing and reading cannot drift apart) and of llama.cpp's converter
(conversion/kimivl.py KimiK25Model, from which the facts come). Storage: 1-D tensors (norms,
biases) and the position table in f32, as llama.cpp's converter keeps them; matrices in --type
(f32, f16, bf16, or q8_0 where rows are a multiple of 32, else f16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def release_tensors(files, vc) -> Iterator[tuple[str, torch.Tensor]]:
    """(release name, fp32 tensor in the release's layout) of every tower and projector tensor."""
    from hybrid.models.moonvit import RELEASE, _naming, halves_to_interleaved

    names = _naming(files)
    nh = vc.num_heads

    def pair(ours: str, release: str):
        for leaf in ("weight", "bias"):
            yield f"{release}.{leaf}", files.get(f"{ours}.{leaf}").float()

    yield from pair(names["patch"], RELEASE["patch"])
    yield RELEASE["pos"], files.get(names["pos"]).float()
    for i in range(vc.num_layers):
        ours, rel = names["block"].format(i=i), RELEASE["block"].format(i=i)
        yield from pair(f"{ours}.{names['norm1']}", f"{rel}.{RELEASE['norm1']}")
        if names is RELEASE:
            yield from pair(f"{ours}.wqkv", f"{rel}.wqkv")
        else:  # transformers: q/k/v apart, query and key rows in halves form
            for leaf in ("weight", "bias"):
                q, k, v = (files.get(f"{ours}.attn.{p}_proj.{leaf}").float() for p in "qkv")
                yield f"{rel}.wqkv.{leaf}", torch.cat([halves_to_interleaved(q, nh), halves_to_interleaved(k, nh), v])
        for role in ("out", "norm2", "fc1", "fc2"):
            yield from pair(f"{ours}.{names[role]}", f"{rel}.{RELEASE[role]}")
    for role in ("final", "pre_norm", "proj_in", "proj_out"):
        yield from pair(names[role], RELEASE[role])


def has_tower(checkpoint: str | Path) -> bool:
    """Whether a checkpoint directory holds a Kimi K2.5 vision tower to write."""
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.models import config_from_dir
    from hybrid.models.vision import checkpoint_vision_config

    checkpoint = Path(checkpoint)
    config = config_from_dir(checkpoint)
    return checkpoint_vision_config(checkpoint, config, SafetensorsFiles(checkpoint)) is not None


def write_mmproj(checkpoint: str | Path, out_path: str | Path, out: str = "f16", progress: bool = True) -> Path:
    """Write `checkpoint`'s vision tower (a kimi_k25 directory hybrid.load accepts) at out_path."""
    from hybrid.convert.gguf_export import ConvertError
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.models import config_from_dir
    from hybrid.models.moonvit_images import ImageRule
    from hybrid.models.vision import checkpoint_vision_config

    checkpoint = Path(checkpoint)
    config = config_from_dir(checkpoint)
    files = SafetensorsFiles(checkpoint)
    vc = checkpoint_vision_config(checkpoint, config, files)
    if vc is None:
        raise ConvertError(f"{checkpoint}: no vision tower to write (config.json has no vision_config, "
                           "or the checkpoint holds no tower)")
    rule = ImageRule.from_dir(checkpoint, vc.patch_size, vc.merge[0])
    return write_mmproj_file(out_path, vc, rule, release_tensors(files, vc), out, checkpoint.name, progress)


def write_mmproj_file(out_path: str | Path, vc, rule, release_items, out: str = "f16", name: str = "mmproj",
                      progress: bool = True) -> Path:
    """Write an mmproj GGUF from a VisionConfig, an ImageRule and (release name, fp32 tensor in the
    release's layout) pairs (release_tensors, or a benchmark's random tower)."""
    import gguf

    from hybrid.convert.gguf_export import ConvertError, OUT_TYPES, Q8_BLOCK, encode, written_whole
    from hybrid.models.moonvit_gguf import PROJECTOR, gguf_name, release_to_axis_halves

    if out not in OUT_TYPES:
        raise ConvertError(f"--type {out!r} is not supported (supported: {', '.join(OUT_TYPES)})")
    if vc.merge[0] != vc.merge[1]:
        raise ConvertError(f"a {vc.merge[0]}x{vc.merge[1]} merge kernel is not square "
                           "(clip.vision.projector.scale_factor is one number)")
    out_path = Path(out_path)
    P = vc.patch_size
    w = gguf.GGUFWriter(str(out_path), "clip")
    w.add_string("general.type", "mmproj")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out])
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", vc.text_hidden_size)
    w.add_uint32("clip.vision.image_size", vc.pos_emb_height * P)
    w.add_uint32("clip.vision.patch_size", P)
    w.add_uint32("clip.vision.embedding_length", vc.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", vc.intermediate_size)
    w.add_uint32("clip.vision.block_count", vc.num_layers)
    w.add_uint32("clip.vision.attention.head_count", vc.num_heads)
    w.add_array("clip.vision.image_mean", list(rule.mean))
    w.add_array("clip.vision.image_std", list(rule.std))
    w.add_string("clip.projector_type", PROJECTOR)
    w.add_uint32("vision.pos_emb_height", vc.pos_emb_height)
    w.add_uint32("vision.pos_emb_width", vc.pos_emb_width)
    w.add_uint32("vision.pos_emb_time", vc.pos_emb_time)
    w.add_bool("clip.use_gelu", True)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vc.projector_eps)
    w.add_uint32("clip.vision.projector.scale_factor", vc.merge[0])
    w.add_uint32("clip.vision.image_min_pixels", 8 * P * P)
    w.add_uint32("clip.vision.image_max_pixels", rule.in_patch_limit * P * P)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    raw_type = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    with written_whole(w, out_path) as tmp:
        for rel, t in release_items:
            gname = gguf_name(rel)
            if rel.endswith((".wqkv.weight", ".wqkv.bias")):  # llama.cpp's query/key row order
                q, k, v = t.chunk(3)
                t = torch.cat([release_to_axis_halves(q, vc.num_heads), release_to_axis_halves(k, vc.num_heads), v])
            kind = out if t.dim() >= 2 and gname != "v.position_embd.weight" else "f32"
            if kind == "q8_0" and t.shape[-1] % Q8_BLOCK:
                kind = "f16"
            if t.dim() == 4 and kind in ("bf16", "q8_0"):  # the patch conv: a float ggml type
                kind = "f16"
            arr = encode(t.float().contiguous(), kind)
            if kind in raw_type:
                w.add_tensor(gname, arr.reshape(t.shape[:-1] + (-1,)), raw_dtype=raw_type[kind])
            else:
                w.add_tensor(gname, arr)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
    return out_path
