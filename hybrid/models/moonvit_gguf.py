"""Kimi K2.5's vision tower from llama.cpp's mmproj GGUF: the file GGUF users hold next to the text
model (llama.cpp keeps the tower out of the model GGUF), read as the release's own tensors.

    mm = MmprojFile(path)                     # mapped, checked: a kimik25 CLIP file
    vc = mm.vision_config(text_hidden, placeholder_id)   # VisionConfig (hybrid/models/moonvit_config.py)
    rule = mm.image_rule()                    # ImageRule (hybrid/models/moonvit_images.py)
    MoonViT(vc, mm, device, dtype)            # mm answers the release's tensor names

Format facts (llama.cpp's converter, conversion/kimivl.py KimiK25Model, and tools/mtmd/clip.cpp):
  general.architecture "clip", clip.projector_type "kimik25", clip.has_vision_encoder true;
  clip.vision.{embedding_length, block_count, feed_forward_length, attention.head_count,
  patch_size, projection_dim (the LLM's width), image_mean, image_std, image_max_pixels,
  projector.scale_factor (the merge kernel side), attention.layer_norm_epsilon (the projector's
  norm eps)}, vision.pos_emb_{height, width, time}; llama.cpp fixes the rotary theta at 10000.
  Tensor names: v.patch_embd, v.position_embd [ph, pw, D], v.blk.N.{ln1, attn_qkv, attn_out, ln2,
  ffn_up, ffn_down}, v.post_ln, mm.input_norm, mm.1, mm.2 (the release's patch_embed.proj,
  pos_emb, blocks.N.{norm0, wqkv, wo, norm1, mlp.fc0, mlp.fc1}, final_layernorm,
  mm_projector.{pre_norm, proj.0, proj.2}).
  attn_qkv: the converter reorders each head's query and key rows from the release's
  (frequency, axis, re/im) order to (axis, frequency, re/im), so that ggml's 2D rope rotates one
  half by column and the other by row; get() puts them back (the tower then takes the release's
  layout as it does from safetensors).
  The file does not carry the release's patch_limit_on_one_side (512 for K2.5, taken as given);
  in_patch_limit is image_max_pixels / P^2, as the converter wrote it.

Values are dequantised to fp32 by the gguf package (F32, F16, BF16, Q8_0, ... all read), then
cast to the tower's dtype by the caller. Widths are read from the tensors and checked against
the metadata, so a file whose header disagrees with its tensors is refused, naming both.

Legend: D tower width, nh heads, hd head width (D / nh), P patch side.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from hybrid.loaders.gguf_file import GGUFError, GGUFFile

PROJECTOR = "kimik25"
PLACEHOLDER = "<|media_pad|>"  # the release's media_placeholder_token, looked up in the text model's vocabulary
PATCH_LIMIT_ON_ONE_SIDE = 512  # K2.5's media_proc_cfg value; the mmproj file does not store it
ROPE_THETA = 10000.0           # llama.cpp's kimik25 value (clip.cpp), the release's default

# release name prefix -> GGUF name prefix (the release's tensor names: hybrid/models/moonvit.py RELEASE)
_FIXED = {
    "vision_tower.patch_embed.proj": "v.patch_embd",
    "vision_tower.patch_embed.pos_emb": "v.position_embd",
    "vision_tower.encoder.final_layernorm": "v.post_ln",
    "mm_projector.pre_norm": "mm.input_norm",
    "mm_projector.proj.0": "mm.1",
    "mm_projector.proj.2": "mm.2",
}
_BLOCK_PARTS = {"norm0": "ln1", "norm1": "ln2", "wqkv": "attn_qkv", "wo": "attn_out", "mlp.fc0": "ffn_up",
                "mlp.fc1": "ffn_down"}
_BLOCK_RE = re.compile(r"^vision_tower\.encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(release: str) -> str | None:
    """The mmproj GGUF name of a release tensor name, or None (a tensor the file does not hold)."""
    m = _BLOCK_RE.match(release)
    if m is not None:
        part = _BLOCK_PARTS.get(m[2])
        return None if part is None else f"v.blk.{m[1]}.{part}.{m[3]}"
    module, _, leaf = release.rpartition(".")
    prefix = _FIXED.get(module)
    return None if prefix is None else f"{prefix}.{leaf}"


def axis_halves_to_release(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows [heads * hd, ...] in the converter's (axis, frequency, re/im) order per
    head -> the release's (frequency, axis, re/im) order (the inverse of llama.cpp's permute)."""
    rows = t.shape[0]
    hd = rows // heads
    return t.reshape(heads, 2, hd // 4, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def release_to_axis_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's permute (the inverse of axis_halves_to_release): release query/key rows ->
    the mmproj file's order."""
    rows = t.shape[0]
    hd = rows // heads
    return t.reshape(heads, hd // 4, 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class MmprojFile:
    """A kimik25 mmproj GGUF, mapped and checked; get() serves the release's tensor names (the
    interface of SafetensorsFiles that hybrid/models/moonvit.py reads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.g = GGUFFile(self.path)
        g = self.g
        arch = g.field("general.architecture", str, None)
        if arch != "clip":
            raise GGUFError(f"{self.path}: general.architecture is {arch!r}, not 'clip': not an mmproj "
                            "(vision tower) file")
        proj = g.field("clip.projector_type", str, None)
        if proj != PROJECTOR:
            raise GGUFError(f"{self.path}: clip.projector_type is {proj!r}; hybrid runs Kimi K2.5's "
                            f"vision tower ({PROJECTOR!r}) only")
        if g.field("clip.has_vision_encoder", bool, False) is not True:
            raise GGUFError(f"{self.path}: clip.has_vision_encoder is not true: the file holds no vision tower")
        self.heads = self._positive("clip.vision.attention.head_count")

    # ---- the SafetensorsFiles interface moonvit.py reads ---------------------------------------
    def __contains__(self, release: str) -> bool:
        name = gguf_name(release)
        return name is not None and name in self.g

    def get(self, release: str, shape=None, dtypes=None) -> torch.Tensor:
        """Release tensor `release` as fp32 in the release's layout (dtypes: ignored, every GGUF
        type is dequantised)."""
        name = gguf_name(release)
        if name is None or name not in self.g:
            raise GGUFError(f"{self.path}: tensor {name or release} (the release's {release}) is missing")
        t = self.g.info(name)
        if shape is not None and t.shape != tuple(shape):
            raise GGUFError(f"{self.path}: tensor {name} has shape {list(t.shape)}, the metadata implies "
                            f"{list(shape)}")
        x = torch.from_numpy(np.array(self.g.values(name), dtype=np.float32, copy=True)).reshape(t.shape)
        if name.endswith((".attn_qkv.weight", ".attn_qkv.bias")):
            if x.shape[0] % 3 or (x.shape[0] // 3) % (4 * self.heads):
                raise GGUFError(f"{self.path}: tensor {name} has {x.shape[0]} rows: not 3 x {self.heads} heads "
                                "x a head width divisible by 4")
            q, k, v = x.chunk(3)
            x = torch.cat([axis_halves_to_release(q, self.heads), axis_halves_to_release(k, self.heads), v])
        return x

    # ---- configuration ---------------------------------------------------------------------------
    def vision_config(self, text_hidden_size: int, placeholder_id: int):
        """The VisionConfig this file describes, for an LLM of width text_hidden_size; widths read
        from the tensors and checked against the metadata."""
        from hybrid.models.moonvit_config import VisionConfig

        g = self.g
        D = self._width("v.patch_embd.bias", 0)
        self._agree("clip.vision.embedding_length", D, "v.patch_embd.bias")
        I = self._width("v.blk.0.ffn_up.weight", 0)
        self._agree("clip.vision.feed_forward_length", I, "v.blk.0.ffn_up.weight")
        layers = 0
        while f"v.blk.{layers}.attn_qkv.weight" in g:
            layers += 1
        self._agree("clip.vision.block_count", layers, f"v.blk.0 .. v.blk.{layers - 1}")
        pos = g.info("v.position_embd.weight") if "v.position_embd.weight" in g else None
        if pos is None or len(pos.shape) != 3:
            raise GGUFError(f"{self.path}: tensor v.position_embd.weight "
                            f"{'is missing' if pos is None else f'has shape {list(pos.shape)}, expected [height, width, D]'}")
        ph = g.field("vision.pos_emb_height", int, pos.shape[0])
        pw = g.field("vision.pos_emb_width", int, pos.shape[1])
        merge = self._positive("clip.vision.projector.scale_factor")
        proj_dim = self._positive("clip.vision.projection_dim")
        if proj_dim != text_hidden_size:
            raise GGUFError(f"{self.path}: clip.vision.projection_dim={proj_dim}, but the text model is "
                            f"{text_hidden_size} wide: this vision tower belongs to another model")
        self._agree("clip.vision.projection_dim", self._width("mm.2.weight", 0), "mm.2.weight")
        eps = g.field("clip.vision.attention.layer_norm_epsilon", (float, int), 1e-5)
        vc = {"vt_hidden_size": D, "vt_num_hidden_layers": layers, "vt_num_attention_heads": self.heads,
              "vt_intermediate_size": I, "patch_size": self._positive("clip.vision.patch_size"),
              "init_pos_emb_height": ph, "init_pos_emb_width": pw,
              "init_pos_emb_time": g.field("vision.pos_emb_time", int, 4),
              "merge_kernel_size": [merge, merge], "mm_hidden_size": self._width("mm.input_norm.weight", 0),
              "projector_ln_eps": float(eps), "rope_parameters": {"rope_theta": ROPE_THETA}}
        raw = {"vision_config": vc, "media_placeholder_token_id": placeholder_id}
        try:
            return VisionConfig.from_dict(raw, text_hidden_size, str(self.path))
        except ValueError as e:  # ConfigError: say it is this file's metadata
            raise GGUFError(f"{e} (read from the mmproj file's metadata)") from None

    def image_rule(self):
        """The release's resize rule with this file's patch size, merge, mean/std and patch limit."""
        from hybrid.models.moonvit_images import DEFAULTS, ImageRule

        g = self.g
        P = self._positive("clip.vision.patch_size")
        max_pixels = g.field("clip.vision.image_max_pixels", int, DEFAULTS["in_patch_limit"] * P * P)
        raw = dict(in_patch_limit=max_pixels // (P * P), patch_limit_on_one_side=PATCH_LIMIT_ON_ONE_SIDE,
                   patch_size=P, merge_kernel_size=self._positive("clip.vision.projector.scale_factor"),
                   image_mean=list(g.field("clip.vision.image_mean", list, list(DEFAULTS["image_mean"]))),
                   image_std=list(g.field("clip.vision.image_std", list, list(DEFAULTS["image_std"]))))
        try:
            return ImageRule.from_dict(raw, f"{self.path} (metadata clip.vision.*)")
        except ValueError as e:
            raise GGUFError(str(e)) from None

    def nbytes(self) -> int:
        return self.g.nbytes

    def close(self) -> None:
        self.g.close()

    # ---- checks ----------------------------------------------------------------------------------
    def _positive(self, key: str) -> int:
        v = self.g.field(key, int)
        if v < 1:
            raise GGUFError(f"{self.path}: metadata key {key}={v} must be a positive integer")
        return v

    def _width(self, name: str, dim: int) -> int:
        if name not in self.g:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        return self.g.info(name).shape[dim]

    def _agree(self, key: str, value: int, what: str) -> None:
        v = self.g.field(key, int, value)
        if v != value:
            raise GGUFError(f"{self.path}: metadata key {key}={v}, but {what} says {value}")


def placeholder_id(text: GGUFFile) -> int:
    """The image placeholder's id in a text GGUF's vocabulary; GGUFError when it has none."""
    tokens = text.field("tokenizer.ggml.tokens", list, [])
    try:
        return tokens.index(PLACEHOLDER)
    except ValueError:
        raise GGUFError(f"{text.path}: the vocabulary has no {PLACEHOLDER} token (the image placeholder "
                        "Kimi K2.5's chat template writes): this text model does not take images") from None


def beside(model: Path) -> list[Path]:
    """The mmproj*.gguf files in a GGUF model's folder (llama.cpp's converter names them so)."""
    return sorted(p for p in model.parent.glob("mmproj*.gguf") if p.is_file())


def resolve(model: Path, option) -> tuple[Path | None, bool]:
    """(the mmproj file to load for GGUF model `model`, whether the user named it). option: a path
    (named), False (none), or None / "auto": the one mmproj*.gguf beside the model; with none
    there is no image input, with several a warning lists them and none is guessed."""
    import warnings

    if option is False:
        return None, False
    if option not in (None, "auto"):
        p = Path(option)
        if not p.is_file():
            raise FileNotFoundError(f"mmproj file {p} does not exist")
        return p, True
    found = beside(model)
    if len(found) > 1:
        warnings.warn(f"{model.parent}: {len(found)} mmproj files ({', '.join(p.name for p in found)}); "
                      "loading without image input: pass mmproj= (--mmproj) to pick one")
        return None, False
    return (found[0] if found else None), False
