"""Device memory a load needs, checked before anything is loaded (hybrid/planner/device_memory.py
counts; this module turns the option into formats, checks the budget and prints the K2.5 table).

A choice that does not fit the budget (max_vram, or the GPU's free memory) is refused with
the breakdown, so the user sees which knob to turn (device_weights, max_len).
`print_options_table()` prints the Kimi K2.5 table: device weights bf16/int8/fp8 x context
32K/128K/256K.
"""

from __future__ import annotations

import torch

from hybrid.loaders.quant import DEVICE_FORMATS
from hybrid.models.facts import GROUPS
from hybrid.planner.device_memory import GiB, DeviceBudget, device_bytes


def device_formats_option(value) -> dict[str, str]:
    """device_weights option -> {group: "dense"|"int8"|"fp8"|"blocks"}. "bf16"/"fp32" mean dense."""
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
            raise ValueError(f"device_weights[{g!r}]: unknown format {f!r} (bf16, int8, fp8, blocks)")
        out[g] = f
    return out


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_fits(facts, path, device, dtype, formats, max_len: int, num_slots: int = 1,
               max_vram: int | None = None, experts_on_device: bool = False, extra: int = 0,
               vision_params: int = 0) -> DeviceBudget:
    """Raise MemoryError with the numbers when the configuration exceeds the device budget.
    facts: the model's ModelFacts; extra: bytes of experts a placement profile caches on the device;
    vision_params: the vision tower's weights when it is loaded."""
    need = device_bytes(facts, itemsize(dtype), formats, max_len, num_slots, experts_on_device, vision_params)
    need.gpu_experts = extra
    budget = max_vram
    if budget is None and torch.device(device).type == "cuda":
        budget = torch.cuda.mem_get_info(torch.device(device))[0]
    if budget is not None and need.total > budget:
        hint = ", or experts_backend='cpu'" if experts_on_device else ""
        raise MemoryError(
            f"{path}: this configuration needs {need.describe()} on {device}, but only "
            f"{budget / GiB:.2f} GiB is available. Try device_weights='int8' (or 'fp8'), a smaller "
            f"max_len (now {max_len}){hint}"
            + (", or images_enabled=False (no vision tower)." if vision_params else ".")
        )
    return need


def options_table(config=None, contexts=(32768, 131072, 262144)) -> str:
    """Device GiB per (device weights format x context); default: Kimi K2.5."""
    from hybrid.models import config_from_dict, facts_of
    from hybrid.models.spec import KIMI_K25_CONFIG

    c = config or config_from_dict(KIMI_K25_CONFIG, source="Kimi K2.5 reference config")
    facts = facts_of(c)
    rows = [("bf16", {}), ("int8", {g: "int8" for g in GROUPS}), ("fp8", {g: "fp8" for g in GROUPS})]
    head = "device weights | " + " | ".join(f"{n // 1024}K context" for n in contexts)
    lines = [head, "-" * len(head)]
    for name, fmts in rows:
        cells = []
        for n in contexts:
            b = device_bytes(facts, 2, fmts, max_len=n)
            cells.append(f"{b.total / GiB:6.1f} GiB (w {b.weights / GiB:.1f} + kv {b.kv_cache / GiB:.1f}"
                         f" + act {b.activations / GiB:.1f})")
        lines.append(f"{name:14s} | " + " | ".join(cells))
    return "\n".join(lines)


def print_options_table(config=None) -> None:
    print(options_table(config))
