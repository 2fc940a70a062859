"""Images for Kimi K2.5's vision tower: decoding, resizing, patches, and the placeholder expansion.

The rule is the checkpoint's preprocessor_config.json (the release's `media_proc_cfg`, or
transformers' Kimi_K25ImageProcessor keys), in Pillow and numpy (transformers' processor needs
torchvision):

  1. decode, convert to RGB;
  2. scale = min(1, sqrt(in_patch_limit / (max(1, W // P) * max(1, H // P))),
                 patch_limit_on_one_side * P / W, patch_limit_on_one_side * P / H)
     (never upscales); new side = max(1, int(side * scale)), at most patch_limit_on_one_side * P;
     resized with Pillow's bicubic filter when the size changes;
  3. zero pixels appended at the bottom and right up to a multiple of merge_kernel_size * P;
  4. (x / 255 - mean) / std per channel, then cut into P x P patches in raster order:
     pixels [h*w, 3, P, P], grid (h, w) in patches; the image costs h*w / merge^2 LLM tokens.

The prompt holds one placeholder token (<|media_pad|>, media_placeholder_token_id) per image, as
Kimi's chat template writes it (<|media_begin|>image<|media_content|><|media_pad|><|media_end|>);
expand() repeats each to its image's token count.

Legend: P patch side, (h, w) grid in patches.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The release's media_proc_cfg for K2.5 (and transformers' Kimi_K25ImageProcessor defaults).
DEFAULTS = dict(in_patch_limit=16384, patch_limit_on_one_side=512, patch_size=14, merge_kernel_size=2,
                image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
DECODE_PIXEL_LIMIT = 1 << 27  # Pillow refuses to decode more than this many pixels (a bomb guard)


class ImageError(ValueError):
    """An image that cannot be used (not decodable, an unknown format, over a limit)."""


@dataclass(frozen=True)
class ImageRule:
    in_patch_limit: int
    patch_limit_on_one_side: int
    patch_size: int
    merge: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "preprocessor_config.json") -> "ImageRule":
        """The release's {"media_proc_cfg": {...}} or transformers' image processor keys."""
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object")
        cfg = raw.get("media_proc_cfg", raw)
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        v = dict(
            in_patch_limit=cfg.get("in_patch_limit", raw.get("max_patches", DEFAULTS["in_patch_limit"])),
            patch_limit_on_one_side=cfg.get("patch_limit_on_one_side",
                                            size.get("max_height", DEFAULTS["patch_limit_on_one_side"])),
            patch_size=cfg.get("patch_size", DEFAULTS["patch_size"]),
            merge=cfg.get("merge_kernel_size", raw.get("merge_size", DEFAULTS["merge_kernel_size"])),
        )
        for k, x in v.items():
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{source}: {k} must be a positive integer, got {x!r}")
        for k in ("image_mean", "image_std"):
            x = cfg.get(k, DEFAULTS[k])
            if (not isinstance(x, (list, tuple)) or len(x) != 3
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in x)
                    or (k == "image_std" and not all(c > 0 for c in x))):
                raise ValueError(f"{source}: {k} must be three numbers{' > 0' if k == 'image_std' else ''}, got {x!r}")
        return cls(mean=tuple(float(c) for c in cfg.get("image_mean", DEFAULTS["image_mean"])),
                   std=tuple(float(c) for c in cfg.get("image_std", DEFAULTS["image_std"])), **v)

    @classmethod
    def from_dir(cls, path: str | Path, patch_size: int, merge: int) -> "ImageRule":
        """The checkpoint's preprocessor_config.json, else the K2.5 defaults with the tower's own
        patch size and merge kernel."""
        f = Path(path) / "preprocessor_config.json"
        if f.is_file():
            try:
                raw = json.loads(f.read_text())
            except ValueError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            rule = cls.from_dict(raw, str(f))
        else:
            rule = cls.from_dict(dict(DEFAULTS, patch_size=patch_size, merge_kernel_size=merge))
        if (rule.patch_size, rule.merge) != (patch_size, merge):
            raise ValueError(f"{f}: patch_size {rule.patch_size} / merge_kernel_size {rule.merge} disagree with "
                             f"config.json's vision_config ({patch_size} / {merge})")
        return rule

    # ---- the resize rule ----------------------------------------------------------------------
    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized width, height), (padded width, height)) of a width x height image."""
        P, side = self.patch_size, self.patch_limit_on_one_side
        patches = max(1.0, width // P) * max(1.0, height // P)
        scale = min(1.0, math.sqrt(self.in_patch_limit / patches), side * P / width, side * P / height)
        new_w = min(max(1, int(width * scale)), side * P)
        new_h = min(max(1, int(height * scale)), side * P)
        f = self.merge * P
        return (new_w, new_h), (-(-new_w // f) * f, -(-new_h // f) * f)

    def tokens_for(self, width: int, height: int) -> int:
        (_, _), (pw, ph) = self.sizes(width, height)
        return (pw // self.patch_size) * (ph // self.patch_size) // (self.merge * self.merge)


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor          # [h*w, 3, P, P] fp32, raster order
    grid: tuple[int, int]         # (h, w) in patches
    tokens: int                   # LLM tokens it becomes (h*w / merge^2)
    digest: str                   # sha256 of the pixels: equal images share prefix KV
    source_size: tuple[int, int]  # (width, height) as decoded


def open_image(item, name: str = "image", allowed_formats=None):
    """A PIL.Image, a path (str / Path) or encoded bytes -> an RGB PIL image, or ImageError
    naming `name`. allowed_formats: Pillow format names accepted from bytes/paths (None: any)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        img = item
    else:
        if isinstance(item, (str, Path)):
            try:
                data = Path(item).read_bytes()
            except OSError as e:
                raise ImageError(f"{name}: cannot read {item} ({e.strerror or e})") from None
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            raise ImageError(f"{name}: expected a PIL image, a path or bytes, got {type(item).__name__}")
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if allowed_formats is not None and fmt not in allowed_formats:
                raise ImageError(f"{name}: image format {fmt} is not supported "
                                 f"(supported: {', '.join(sorted(allowed_formats))})")
            if img.width * img.height > DECODE_PIXEL_LIMIT:
                raise ImageError(f"{name}: {img.width}x{img.height} pixels is more than this server decodes")
            img.load()
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageError(f"{name}: cannot decode the image ({e})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: the image is empty ({img.width}x{img.height})")
    return img if img.mode == "RGB" else img.convert("RGB")


def prepare(img, rule: ImageRule) -> PreparedImage:
    """An RGB PIL image -> its patches and grid under `rule`."""
    from PIL import Image

    (new_w, new_h), (pw, ph) = rule.sizes(img.width, img.height)
    source = (img.width, img.height)
    if (new_w, new_h) != source:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    arr = np.zeros((ph, pw, 3), dtype=np.uint8)
    arr[:new_h, :new_w] = np.asarray(img, dtype=np.uint8)
    x = (arr.astype(np.float32) / 255.0 - np.asarray(rule.mean, np.float32)) / np.asarray(rule.std, np.float32)
    P = rule.patch_size
    h, w = ph // P, pw // P
    patches = x.reshape(h, P, w, P, 3).transpose(0, 2, 4, 1, 3).reshape(h * w, 3, P, P)  # [h*w, 3, P, P]
    patches = np.ascontiguousarray(patches)
    digest = hashlib.sha256(patches.tobytes()).hexdigest()
    return PreparedImage(torch.from_numpy(patches), (h, w), h * w // (rule.merge * rule.merge), digest, source)


@dataclass(frozen=True)
class ImageSpan:
    start: int              # position of the image's first token in the expanded prompt
    image: PreparedImage

    @property
    def end(self) -> int:
        return self.start + self.image.tokens


def expand(token_ids, placeholder_id: int, images: list[PreparedImage]) -> tuple[list[int], list[ImageSpan]]:
    """token_ids with one placeholder per image -> (ids with each placeholder repeated to its
    image's token count, the spans). A count that does not match is a ValueError."""
    ids = list(token_ids)
    at = [i for i, t in enumerate(ids) if t == placeholder_id]
    if len(at) != len(images):
        raise ValueError(f"the prompt has {len(at)} image placeholder token(s) (id {placeholder_id}) "
                         f"for {len(images)} image(s); put one placeholder where each image goes")
    out, spans, prev = [], [], 0
    for i, img in zip(at, images):
        out += ids[prev:i]
        spans.append(ImageSpan(len(out), img))
        out += [placeholder_id] * img.tokens
        prev = i + 1
    out += ids[prev:]
    return out, spans


def token_keys(ids: list[int], spans: list[ImageSpan]) -> list:
    """What a prompt's KV depends on, per position: the token id, or (digest, index) inside an
    image (all its placeholder ids are equal, its pixels are not). Prefix reuse compares these."""
    keys: list = list(ids)
    for s in spans:
        keys[s.start:s.end] = [(s.image.digest, j) for j in range(s.image.tokens)]
    return keys
