"""Device memory a configuration needs, computed from config.json before loading anything.

device bytes = weights (per tensor group, in the format chosen for it)
             + latent KV cache (num_slots x max_len tokens)
             + activations (a prefill chunk's working set, plus a fixed allocator reserve)
A choice that does not fit the budget (max_vram, or the GPU's free memory) is refused with
the breakdown, so the user sees which knob to turn (device_weights, max_len).

`print_options_table()` prints the Kimi K2.5 table: device weights bf16/int8/fp8 x context
32K/128K/256K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid.config import ModelConfig
from hybrid.loaders.source import DEVICE_FORMATS, GROUPS

GiB = 1024**3
PREFILL_CHUNK = 512  # tokens per prefill chunk the activation estimate assumes
RESERVE = 512 * 1024**2  # CUDA context, allocator fragmentation, temporaries

# Kimi K2.5 text model, from its published config.json: used only for the options table.
KIMI_K25 = dict(
    model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64, n_routed_experts=384,
    num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    routed_scaling_factor=2.827, max_position_embeddings=262144, rope_theta=50000.0,
    rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)


def device_formats_option(value) -> dict[str, str]:
    """device_weights option -> {group: "dense"|"int8"|"fp8"}. "bf16"/"fp32" mean dense."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = {g: value for g in GROUPS}
    if not isinstance(value, dict):
        raise ValueError(f"device_weights must be a format name or a dict per group, got {value!r}")
    out = {}
    for g, f in value.items():
        f = "dense" if f in ("bf16", "fp32", "dense") else f
        if g not in GROUPS:
            raise ValueError(f"device_weights: unknown tensor group {g!r} (groups: {', '.join(GROUPS)})")
        if f not in DEVICE_FORMATS:
            raise ValueError(f"device_weights[{g!r}]: unknown format {f!r} (bf16, int8, fp8)")
        out[g] = f
    return out


def group_params(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """Per tensor group: (matrix parameters, matrix rows) — rows count per-row scales."""
    H, nh, D, R, V, C = (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
                         c.v_head_dim, c.kv_lora_rank)
    L = c.num_hidden_layers
    moe = sum(c.is_moe_layer(i) for i in range(L))
    if c.q_lora_rank is None:
        q = [(nh * (D + R), H)]
    else:
        q = [(c.q_lora_rank, H), (nh * (D + R), c.q_lora_rank)]
    attn = q + [(C + R, H), (H, nh * V)]  # kv_b counted as "always dense" below
    shared_I = c.moe_intermediate_size * c.n_shared_experts
    mats = {
        "attention": [m for m in attn for _ in range(L)],
        "shared": [(shared_I, H), (shared_I, H), (H, shared_I)] * moe if shared_I else [],
        "dense": [(c.intermediate_size, H), (c.intermediate_size, H), (H, c.intermediate_size)] * (L - moe),
        "lm_head": [(c.vocab_size, H)],
    }
    return {g: (sum(n * k for n, k in ms), sum(n for n, _ in ms)) for g, ms in mats.items()}


@dataclass
class DeviceBudget:
    weights: int
    kv_cache: int
    activations: int
    routed_experts: int
    gpu_experts: int = 0  # experts a placement profile caches on the device

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.routed_experts + self.gpu_experts

    def describe(self) -> str:
        parts = [f"weights {self.weights / GiB:.2f} GiB", f"KV cache {self.kv_cache / GiB:.2f} GiB",
                 f"activations {self.activations / GiB:.2f} GiB"]
        if self.routed_experts:
            parts.append(f"routed experts {self.routed_experts / GiB:.2f} GiB")
        if self.gpu_experts:
            parts.append(f"cached experts {self.gpu_experts / GiB:.2f} GiB")
        return " + ".join(parts) + f" = {self.total / GiB:.2f} GiB"


def device_bytes(c: ModelConfig, dtype=torch.bfloat16, formats: dict[str, str] | None = None,
                 max_len: int = 4096, num_slots: int = 1, experts_on_device: bool = False) -> DeviceBudget:
    from hybrid.models.deepseek_v3 import SCORES_BUDGET
    from hybrid.models.kv_cache import LatentKVCache
    from hybrid.models.linear import DEQUANT_ROWS

    formats = formats or {}
    item = torch.empty((), dtype=dtype).element_size()
    H, L = c.hidden_size, c.num_hidden_layers
    moe = sum(c.is_moe_layer(i) for i in range(L))
    weights = 0
    for g, (params, rows) in group_params(c).items():
        f = formats.get(g, "dense")
        weights += params * item if f == "dense" else params + rows * 4  # int8/fp8 + fp32 row scale
    # Always dense: kv_b, norms, router (fp32 weight + bias).
    nh, D, V, C = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    weights += L * nh * (D + V) * C * item
    weights += (L * (2 * H + C + (c.q_lora_rank or 0)) + H) * item
    weights += moe * (c.n_routed_experts * H + c.n_routed_experts) * 4
    if c.tie_word_embeddings:
        weights += c.vocab_size * H * item
    kv = LatentKVCache.bytes_per_token_for(c, dtype) * max_len * num_slots
    Tc = min(PREFILL_CHUNK, max_len)
    width = max(c.intermediate_size, c.moe_intermediate_size * max(c.n_shared_experts, 1))
    acts = (4 * Tc * H * 4  # residual, normed, attention out, MLP out (fp32 worst case)
            + 3 * Tc * width * item  # gate, up, product
            + 4 * Tc * nh * (D + V + c.qk_rope_head_dim) * item  # expanded keys/values (L <= 4 Tc)
            + min(nh * Tc * 4 * Tc * 4, SCORES_BUDGET)  # scores when no fused kernel fits (capped)
            + c.vocab_size * 4  # one row of logits
            + (DEQUANT_ROWS * max(H, width, nh * V) * item if any(f != "dense" for f in formats.values()) else 0)
            + RESERVE)
    routed = moe * c.n_routed_experts * 3 * H * c.moe_intermediate_size * item if experts_on_device else 0
    return DeviceBudget(weights, kv, acts, routed)


def check_fits(c: ModelConfig, path, device, dtype, formats, max_len: int, num_slots: int = 1,
               max_vram: int | None = None, experts_on_device: bool = False, extra: int = 0) -> DeviceBudget:
    """Raise MemoryError with the numbers when the configuration exceeds the device budget.
    extra: bytes of experts a placement profile caches on the device."""
    need = device_bytes(c, dtype, formats, max_len, num_slots, experts_on_device)
    need.gpu_experts = extra
    budget = max_vram
    if budget is None and torch.device(device).type == "cuda":
        budget = torch.cuda.mem_get_info(torch.device(device))[0]
    if budget is not None and need.total > budget:
        hint = ", or experts_backend='cpu'" if experts_on_device else ""
        raise MemoryError(
            f"{path}: this configuration needs {need.describe()} on {device}, but only "
            f"{budget / GiB:.2f} GiB is available. Try device_weights='int8' (or 'fp8'), a smaller "
            f"max_len (now {max_len}){hint}."
        )
    return need


def options_table(config: ModelConfig | None = None, contexts=(32768, 131072, 262144)) -> str:
    """Device GiB per (device weights format x context); default: Kimi K2.5."""
    c = config or ModelConfig.from_dict(KIMI_K25, source="Kimi K2.5 reference config")
    rows = [("bf16", {}), ("int8", {g: "int8" for g in GROUPS}), ("fp8", {g: "fp8" for g in GROUPS})]
    head = "device weights | " + " | ".join(f"{n // 1024}K context" for n in contexts)
    lines = [head, "-" * len(head)]
    for name, fmts in rows:
        cells = []
        for n in contexts:
            b = device_bytes(c, torch.bfloat16, fmts, max_len=n)
            cells.append(f"{b.total / GiB:6.1f} GiB (w {b.weights / GiB:.1f} + kv {b.kv_cache / GiB:.1f}"
                         f" + act {b.activations / GiB:.1f})")
        lines.append(f"{name:14s} | " + " | ".join(cells))
    return "\n".join(lines)


def print_options_table(config: ModelConfig | None = None) -> None:
    print(options_table(config))
