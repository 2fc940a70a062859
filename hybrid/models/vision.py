"""A checkpoint's image input, whole: the tower (hybrid/models/moonvit.py), its preprocessing rule
(hybrid/models/moonvit_images.py) and the placeholder token, behind one object that the API, the
engine and the server ask.

    vision = Vision.load(path, files, vc, device, dtype)          # vc: checkpoint_vision_config(path, config, files)
    vision = Vision.from_mmproj(mm, vc, device, dtype)            # a GGUF model's mmproj file
    images = vision.prepare([pil_image, "cat.png", png_bytes])      # decode + patches (caller's thread)
    ids, spans = vision.expand(token_ids, images)                   # one placeholder per image
    rows = vision.encode(images[0])                                  # [tokens, H] on the device

Limits (images per request, bytes per image, pixels per image) are the caller's: a server sets
them, the Python API has none beyond the decoder's bomb guard.

Legend: H the LLM's hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid.models.moonvit_images import (ImageError, ImageRule, ImageSpan, PreparedImage, expand, open_image,
                                          prepare)


@dataclass(frozen=True)
class ImageLimits:
    max_images: int | None = None      # per request
    max_bytes: int | None = None       # encoded bytes per image
    max_pixels: int | None = None      # width x height per image, as decoded


class Vision:
    def __init__(self, vc, tower, rule: ImageRule):
        self.config, self.tower, self.rule = vc, tower, rule
        self.placeholder_id = vc.placeholder_id
        self.source = None  # the mmproj file the tower came from (from_mmproj), else None: the checkpoint's

    @classmethod
    def load(cls, path, files, vc, device, dtype, progress=None) -> "Vision":
        """The tower of a checkpoint whose config.json has a vision_config (vc: its VisionConfig),
        with the checkpoint's preprocessing rule."""
        from hybrid.models.moonvit import MoonViT

        if vc.merge[0] != vc.merge[1]:
            raise ValueError(f"{path}: a {vc.merge[0]}x{vc.merge[1]} merge kernel is not square; the "
                             "preprocessing pads both sides to one multiple")
        rule = ImageRule.from_dir(Path(path), vc.patch_size, vc.merge[0])
        return cls(vc, MoonViT(vc, files, device, dtype, progress=progress), rule)

    @classmethod
    def from_mmproj(cls, mm, vc, device, dtype, progress=None) -> "Vision":
        """The tower of a llama.cpp mmproj GGUF (hybrid/models/moonvit_gguf.py MmprojFile, which
        also gave vc), with the resize rule its metadata describes."""
        from hybrid.models.moonvit import MoonViT

        vision = cls(vc, MoonViT(vc, mm, device, dtype, progress=progress), mm.image_rule())
        vision.source = mm.path
        return vision

    def prepare(self, items, limits: ImageLimits | None = None, name: str = "images",
                allowed_formats=None) -> list[PreparedImage]:
        """Each item a PIL image, a path or bytes -> PreparedImage, or ImageError naming it."""
        items = list(items)
        lim = limits or ImageLimits()
        if lim.max_images is not None and len(items) > lim.max_images:
            raise ImageError(f"{name}: {len(items)} images; at most {lim.max_images} per request")
        return [self.prepare_one(item, f"{name}[{i}]", lim, allowed_formats) for i, item in enumerate(items)]

    def prepare_one(self, item, where: str, limits: ImageLimits | None = None, allowed_formats=None) -> PreparedImage:
        lim = limits or ImageLimits()
        if lim.max_bytes is not None and isinstance(item, (bytes, bytearray)) and len(item) > lim.max_bytes:
            raise ImageError(f"{where}: {len(item)} bytes; at most {lim.max_bytes} per image")
        img = open_image(item, where, allowed_formats)
        if lim.max_pixels is not None and img.width * img.height > lim.max_pixels:
            raise ImageError(f"{where}: {img.width}x{img.height} = {img.width * img.height} pixels; "
                             f"at most {lim.max_pixels} per image")
        return prepare(img, self.rule)

    def expand(self, token_ids, images: list[PreparedImage]) -> tuple[list[int], list[ImageSpan]]:
        return expand(token_ids, self.placeholder_id, images)

    def encode(self, image: PreparedImage) -> torch.Tensor:
        """[tokens, H]: what replaces the image's placeholder embeddings."""
        return self.tower.encode(image.pixels, [image.grid])[0]

    def span_rows(self, spans: list[ImageSpan]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The forward's embeds= for a whole prompt holding these spans (positions = rows)."""
        if not spans:
            return None
        rows = torch.cat([torch.arange(s.start, s.end) for s in spans])
        return rows, torch.cat([self.encode(s.image) for s in spans])

    def nbytes(self) -> int:
        from hybrid.models.moonvit import MoonViT

        return MoonViT.parameter_count(self.config) * self.tower.dtype.itemsize


def checkpoint_vision_config(path: Path, config, files):
    """The checkpoint's VisionConfig (hybrid/models/moonvit_config.py), or None: text only (no
    vision_config, or one whose tower was left out of the checkpoint: a warning says so)."""
    if config.model_type != "kimi_k25":
        return None
    import warnings

    from hybrid.config import read_config_json
    from hybrid.models.moonvit import has_vision_tensors
    from hybrid.models.moonvit_config import VisionConfig

    raw, source = read_config_json(path)
    if raw.get("vision_config") is None:
        return None
    if not has_vision_tensors(files):
        warnings.warn(f"{path}: config.json has a vision_config but the checkpoint holds no vision tower; "
                      "loading the text model only (no image input)")
        return None
    return VisionConfig.from_dict(raw, config.hidden_size, source)
