"""Kimi K2.5's vision tower (MoonViT) and projector configuration, from config.json.

The release writes the vision fields as its remote code reads them (vision_config.vt_hidden_size,
vt_num_hidden_layers, init_pos_emb_height, mm_hidden_size, projector_ln_eps; the placeholder as
the top-level media_placeholder_token_id); transformers' Kimi_K25Config spells them hidden_size,
num_hidden_layers, pos_emb_height, projection_hidden_size, projection_layer_norm_eps,
image_token_id. Both are read; a field given in both spellings with different values is refused.
Defaults are transformers' Kimi_K25VisionConfig defaults (the K2.5 tower: 27 layers, 1152 wide,
16 heads, MLP 4304, patch 14, 64 x 64 learned positions, 2 x 2 merge).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.config import ConfigError

# (our name, release key, transformers key, default)
_VISION_FIELDS = (
    ("hidden_size", "vt_hidden_size", "hidden_size", 1152),
    ("num_layers", "vt_num_hidden_layers", "num_hidden_layers", 27),
    ("num_heads", "vt_num_attention_heads", "num_attention_heads", 16),
    ("intermediate_size", "vt_intermediate_size", "intermediate_size", 4304),
    ("patch_size", "patch_size", "patch_size", 14),
    ("pos_emb_height", "init_pos_emb_height", "pos_emb_height", 64),
    ("pos_emb_width", "init_pos_emb_width", "pos_emb_width", 64),
    ("pos_emb_time", "init_pos_emb_time", "pos_emb_time", 4),
)
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # the tower's MLP: the release's PytorchGELUTanh


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int            # D, the tower's width
    num_layers: int
    num_heads: int              # heads; head width D / heads
    intermediate_size: int      # the tower's MLP width
    patch_size: int             # P: one patch is P x P pixels
    pos_emb_height: int         # the learned position table's grid
    pos_emb_width: int
    pos_emb_time: int
    merge: tuple[int, int]      # (kh, kw): patches merged into one LLM token
    rope_theta: float
    projector_width: int        # the projector's input norm width (= D)
    projector_eps: float
    text_hidden_size: int       # H, the LLM's width (the projector's output)
    placeholder_id: int         # the image placeholder token (<|media_pad|>)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_area(self) -> int:
        return self.merge[0] * self.merge[1]

    @classmethod
    def from_dict(cls, raw: dict, text_hidden_size: int, source: str = "config.json") -> "VisionConfig | None":
        """The vision configuration of a kimi_k25 config.json dict, or None for a text-only one."""
        vc = raw.get("vision_config")
        if vc is None:
            return None
        where = f"{source} (vision_config)"
        if not isinstance(vc, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        v = {name: _either(vc, rel, hf, default, where) for name, rel, hf, default in _VISION_FIELDS}
        for name, value in v.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        if v["hidden_size"] % v["num_heads"] or (v["hidden_size"] // v["num_heads"]) % 4:
            raise ConfigError(f"{where}: hidden size {v['hidden_size']} over {v['num_heads']} heads must "
                              "give a head width divisible by 4 (the 2D rotary embedding splits it in four)")
        merge = vc.get("merge_kernel_size", (2, 2))
        if isinstance(merge, int):
            merge = (merge, merge)
        if (not isinstance(merge, (list, tuple)) or len(merge) != 2
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in merge)):
            raise ConfigError(f"{where}: merge_kernel_size must be two positive integers, got {merge!r}")
        act = vc.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        proj_act = vc.get("projector_hidden_act", "gelu")
        if proj_act != "gelu":
            raise ConfigError(f"{where}: projector_hidden_act {proj_act!r} is not supported (gelu)")
        if vc.get("mm_projector_type", "patchmerger") != "patchmerger":
            raise ConfigError(f"{where}: mm_projector_type {vc['mm_projector_type']!r} is not supported (patchmerger)")
        rope = vc.get("rope_parameters") or {}
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0
        width = _either_top(raw, vc, "mm_hidden_size", "projection_hidden_size", v["hidden_size"], source)
        eps = _either_top(raw, vc, "projector_ln_eps", "projection_layer_norm_eps", 1e-5, source)
        placeholder = _either(raw, "media_placeholder_token_id", "image_token_id", 163605, source)
        if width != v["hidden_size"]:
            raise ConfigError(f"{where}: the projector's norm width {width} must equal the tower's hidden "
                              f"size {v['hidden_size']}")
        if isinstance(placeholder, bool) or not isinstance(placeholder, int) or placeholder < 0:
            raise ConfigError(f"{source}: media_placeholder_token_id must be a token id, got {placeholder!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ConfigError(f"{where}: projector_ln_eps must be a small positive number, got {eps!r}")
        return cls(merge=tuple(merge), rope_theta=float(theta), projector_width=width,
                   projector_eps=float(eps), text_hidden_size=text_hidden_size,
                   placeholder_id=placeholder, **v)


def _either(d: dict, release: str, hf: str, default, where: str):
    a, b = d.get(release), d.get(hf)
    if a is not None and b is not None and release != hf and a != b:
        raise ConfigError(f"{where}: {release}={a!r} and {hf}={b!r} disagree")
    return a if a is not None else (b if b is not None else default)


def _either_top(raw: dict, vc: dict, release: str, hf: str, default, source: str):
    """A projector field: the release writes it in vision_config, transformers at the top level."""
    return _either({release: vc.get(release), hf: raw.get(hf)}, release, hf, default, source)
