"""Kimi K2.5's vision tower (MoonViT) and its patch-merger projector: images -> LLM embeddings.

Read top to bottom: where the weights are (the release's names or transformers'), the 2D rotary
embedding, one encoder block, the tower, the projector. Numerics follow transformers'
Kimi_K25VisionModel and Kimi_K25MultimodalProjection (and so the release's MoonViT):

  patches [N, 3, P, P] -> linear patch embedding (the release's P x P stride-P conv) -> + learned
  positions, bicubically resampled from the pos_emb_height x pos_emb_width table to each image's
  grid -> layers of pre-norm blocks (LayerNorm, attention with a 2D RoPE over (row, column) within
  one image, LayerNorm, GELU-tanh MLP) -> LayerNorm -> each kh x kw block of patches becomes one
  token -> projector: LayerNorm per patch, the block's patches side by side, linear, GELU, linear.

Rotary layout. The release stores wqkv with each head's query/key features in (re, im) pairs
(it rotates complex numbers); transformers' q_proj/k_proj hold the same rows permuted into two
halves (rotate_half). The tower computes in the halves form: release weights are permuted once
at load.

Legend: N patches of all images together, n patches of one image, D tower width, nh heads,
hd head width (D / nh), P patch side, (h, w) an image's grid in patches, M merged tokens,
k = kh * kw patches per token, H the LLM's hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.loaders.safetensors_files import FLOAT_DTYPES, CheckpointError
from hybrid.models.moonvit_config import VisionConfig
from hybrid.ops.linear import Linear

LAYER_NORM_EPS = 1e-5  # the tower's own norms (nn.LayerNorm's default in the release)


# ---------------------------------------------------------------------------------------------
# Weights: the release's names and transformers' (Kimi_K25ForConditionalGeneration.state_dict)
# ---------------------------------------------------------------------------------------------
RELEASE = dict(
    patch="vision_tower.patch_embed.proj", pos="vision_tower.patch_embed.pos_emb.weight",
    block="vision_tower.encoder.blocks.{i}", norm1="norm0", norm2="norm1", out="wo",
    fc1="mlp.fc0", fc2="mlp.fc1", final="vision_tower.encoder.final_layernorm",
    pre_norm="mm_projector.pre_norm", proj_in="mm_projector.proj.0", proj_out="mm_projector.proj.2",
)
TRANSFORMERS = dict(
    patch="model.vision_tower.patch_embed.proj",
    pos="model.vision_tower.patch_embed.pos_emb.position_embeddings",
    block="model.vision_tower.layers.{i}", norm1="norm1", norm2="norm2", out="attn.proj",
    fc1="mlp.fc1", fc2="mlp.fc2", final="model.vision_tower.final_layernorm",
    pre_norm="model.mm_projector.pre_norm", proj_in="model.mm_projector.in_proj",
    proj_out="model.mm_projector.out_proj",
)


def has_vision_tensors(files) -> bool:
    return any(names["pos"] in files for names in (RELEASE, TRANSFORMERS))


def _naming(files) -> dict:
    for names in (RELEASE, TRANSFORMERS):
        if names["pos"] in files:
            return names
    raise CheckpointError(f"{files.path}: config.json has a vision_config but the checkpoint holds no vision "
                          f"tower (neither {RELEASE['pos']} nor {TRANSFORMERS['pos']}); pass "
                          "images_enabled=False to load the text model alone")


def interleaved_to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [heads * hd, ...] of a query/key projection, each head's features reordered from
    (re, im) pairs to two halves (re..., im...)."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def halves_to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves (transformers' q_proj/k_proj rows -> the release's)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class _Reader:
    """Tensors of the tower in the compute dtype on the device, by role."""

    def __init__(self, files, vc: VisionConfig, device, dtype):
        self.files, self.vc, self.device, self.dtype = files, vc, device, dtype
        self.names = _naming(files)

    def get(self, name: str, shape) -> torch.Tensor:
        return self.files.get(name, shape, FLOAT_DTYPES).to(self.device, self.dtype)

    def linear(self, name: str, n: int, k: int) -> Linear:
        return Linear(self.get(f"{name}.weight", (n, k)), self.get(f"{name}.bias", (n,)), name=name)

    def norm(self, name: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(f"{name}.weight", (size,)), self.get(f"{name}.bias", (size,))

    def qkv(self, block: str) -> Linear:
        """The fused query/key/value projection [3D, D], query and key rows in halves form."""
        D, nh = self.vc.hidden_size, self.vc.num_heads
        if self.names is RELEASE:
            w = self.files.get(f"{block}.wqkv.weight", (3 * D, D), FLOAT_DTYPES)
            b = self.files.get(f"{block}.wqkv.bias", (3 * D,), FLOAT_DTYPES)
            ws, bs = list(w.split(D)), list(b.split(D))
            for j in (0, 1):  # query, key
                ws[j], bs[j] = interleaved_to_halves(ws[j], nh), interleaved_to_halves(bs[j], nh)
        else:
            parts = [f"{block}.attn.{p}_proj" for p in "qkv"]
            ws = [self.files.get(f"{p}.weight", (D, D), FLOAT_DTYPES) for p in parts]
            bs = [self.files.get(f"{p}.bias", (D,), FLOAT_DTYPES) for p in parts]
        w, b = torch.cat(ws).to(self.device, self.dtype), torch.cat(bs).to(self.device, self.dtype)
        return Linear(w, b, name=f"{block}.qkv")


# ---------------------------------------------------------------------------------------------
# 2D rotary embedding over (row, column), and the learned positions
# ---------------------------------------------------------------------------------------------
def rope_2d(h: int, w: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, hd] for a raster-ordered grid: pair j of the head's hd/2 rotations turns by
    column * f_{j/2} (j even) or row * f_{j/2} (j odd), f_i = theta^(-4i/hd); halves layout."""
    freqs = theta ** (-torch.arange(0, head_dim, 4, device=device, dtype=torch.float32) / head_dim)  # [hd/4]
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # [n]
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)  # [n]
    angles = torch.stack([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1).flatten(1)  # [n, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [n, hd]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, nh, hd] rotated in fp32 (halves layout), back in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]).to(x.dtype)


def resampled_positions(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The learned [ph, pw, D] table bicubically resampled to the grid: [h*w, D] (fp32 math)."""
    if table.shape[:2] == (h, w):
        return table.reshape(h * w, -1)
    grid = table.float().permute(2, 0, 1)[None]  # [1, D, ph, pw]
    out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # [1, D, h, w]
    return out[0].permute(1, 2, 0).reshape(h * w, -1).to(table.dtype)


# ---------------------------------------------------------------------------------------------
# Encoder block
# ---------------------------------------------------------------------------------------------
class Block:
    def __init__(self, r: _Reader, i: int):
        vc = r.vc
        D, I = vc.hidden_size, vc.intermediate_size
        p = r.names["block"].format(i=i)
        self.nh, self.hd = vc.num_heads, vc.head_dim
        self.norm1 = r.norm(f"{p}.{r.names['norm1']}", D)
        self.norm2 = r.norm(f"{p}.{r.names['norm2']}", D)
        self.qkv = r.qkv(p)
        self.out = r.linear(f"{p}.{r.names['out']}", D, D)
        self.fc1 = r.linear(f"{p}.{r.names['fc1']}", I, D)
        self.fc2 = r.linear(f"{p}.{r.names['fc2']}", D, I)

    def attention(self, x, cos, sin, lengths: list[int]):  # [N, D] -> [N, D]
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.nh, self.hd).unbind(1)  # each [N, nh, hd]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        outs = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):  # one image each
            # [1, nh, n, hd]: the 4-D form takes torch's fused kernel on the CPU too (the 3-D one
            # materialises the n x n scores: 2 GB per head group for a 1024 x 1024 image)
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))
            o = F.scaled_dot_product_attention(qi, ki, vi)[0]  # [nh, n, hd]
            outs.append(o.transpose(0, 1).reshape(-1, self.nh * self.hd))  # [n, D]
        return self.out(torch.cat(outs))

    def __call__(self, x, cos, sin, lengths):  # [N, D] -> [N, D]
        D = x.shape[-1]
        x = x + self.attention(F.layer_norm(x, (D,), *self.norm1, LAYER_NORM_EPS), cos, sin, lengths)
        return x + self.fc2(F.gelu(self.fc1(F.layer_norm(x, (D,), *self.norm2, LAYER_NORM_EPS)),
                                   approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The tower and the projector
# ---------------------------------------------------------------------------------------------
class MoonViT:
    """MoonViT(vc, files, device, dtype); .encode(pixels, grids) -> per image [M, H]."""

    def __init__(self, vc: VisionConfig, files, device, dtype, progress=None):
        r = _Reader(files, vc, device, dtype)
        D, P, kh, kw = vc.hidden_size, vc.patch_size, *vc.merge
        self.vc, self.device, self.dtype = vc, torch.device(device), dtype
        # The release's P x P conv with stride P is a linear map of each flattened patch.
        self.patch = Linear(r.get(f"{r.names['patch']}.weight", (D, 3, P, P)).reshape(D, 3 * P * P),
                            r.get(f"{r.names['patch']}.bias", (D,)), name=r.names["patch"])
        self.pos = r.get(r.names["pos"], (vc.pos_emb_height, vc.pos_emb_width, D))  # [ph, pw, D]
        self.blocks = []
        for i in range(vc.num_layers):
            self.blocks.append(Block(r, i))
            if progress is not None:
                progress(i + 1, vc.num_layers)
        self.final_norm = r.norm(r.names["final"], D)
        self.pre_norm = r.norm(r.names["pre_norm"], D)
        self.proj_in = r.linear(r.names["proj_in"], kh * kw * D, kh * kw * D)
        self.proj_out = r.linear(r.names["proj_out"], vc.text_hidden_size, kh * kw * D)

    @staticmethod
    def parameter_count(vc: VisionConfig) -> int:
        """Weights of the tower and projector (for the memory plan before loading)."""
        D, I, P, k = vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.merge_area
        block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (I * D + I) + (D * I + D)
        return (D * 3 * P * P + D + vc.pos_emb_height * vc.pos_emb_width * D + vc.num_layers * block
                + 2 * D + 2 * D + (k * D) ** 2 + k * D + vc.text_hidden_size * k * D + vc.text_hidden_size)

    @torch.inference_mode()
    def tower(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """pixels [N, 3, P, P] (raster order within each image), grids [(h, w)] -> [N, D] after
        the final norm (transformers' last_hidden_state)."""
        vc = self.vc
        lengths = [h * w for h, w in grids]
        if pixels.shape[0] != sum(lengths):
            raise ValueError(f"vision tower: {pixels.shape[0]} patches for grids {grids} "
                             f"({sum(lengths)} patches)")
        x = self.patch(pixels.to(self.device, self.dtype).flatten(1))  # [N, D]
        pos = torch.cat([resampled_positions(self.pos, h, w) for h, w in grids])  # [N, D]
        x = x + pos.to(x.dtype)
        cs = [rope_2d(h, w, vc.head_dim, vc.rope_theta, self.device) for h, w in grids]
        cos, sin = torch.cat([c for c, _ in cs]), torch.cat([s for _, s in cs])  # [N, hd]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return F.layer_norm(x, (vc.hidden_size,), *self.final_norm, LAYER_NORM_EPS)

    def merge(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """[N, D] -> [M, k, D]: each kh x kw block of an image's patches, row-major blocks, the
        block's patches row-major."""
        kh, kw = self.vc.merge
        out = []
        for xi, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            xi = xi.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)  # [h/kh, w/kw, kh, kw, D]
            out.append(xi.reshape(-1, kh * kw, xi.shape[-1]))
        return torch.cat(out)

    @torch.inference_mode()
    def project(self, merged: torch.Tensor) -> torch.Tensor:
        """[M, k, D] -> [M, H]."""
        M, k, D = merged.shape
        x = F.layer_norm(merged, (D,), *self.pre_norm, self.vc.projector_eps).reshape(M, k * D)
        return self.proj_out(F.gelu(self.proj_in(x)))

    def encode(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """pixels [N, 3, P, P], grids [(h, w)] -> one [M_i, H] per image (transformers'
        get_image_features)."""
        kh, kw = self.vc.merge
        for h, w in grids:
            if h % kh or w % kw:
                raise ValueError(f"vision tower: grid {h}x{w} is not a multiple of the merge kernel {kh}x{kw}")
        out = self.project(self.merge(self.tower(pixels, grids), grids))
        return list(out.split([h * w // (kh * kw) for h, w in grids]))
