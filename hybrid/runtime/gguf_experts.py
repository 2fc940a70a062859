"""Routed experts of a GGUF file to the CPU engine, through one glue function (`pack_gguf_layer`).

A layer's experts are three stacked tensors (blk.i.ffn_{gate,up,down}_exps, [E, out, in] in a
ggml block type). When every one's type is in hybrid.experts.cpu_moe.GGUF_NATIVE_TYPES (the
types the engine runs in their own blocks) and gate and up share one type, their raw blocks,
mapped from the file, go to cpu_moe.PackedLayer.from_gguf(gate, up, down, gate_type, up_type,
down_type), which repacks them losslessly. Otherwise each expert is dequantised (gguf.quants) and
quantised again into one of the engine's own formats, with a warning saying so: the default
keeps the bits class (F32/F16/BF16 -> bf16; 5 to 8 bit types -> int8 group 32; 4 bits and
below -> int4 group 32), expert_format= overrides it. That second quantisation is lossy except
for float types to bf16 where the values are bf16 already.

The torch backend (the reference) takes every expert dequantised to the compute dtype; that is
ExpertLoader's own path, which reads experts through the source's float_weight.

Legend: E experts, H hidden, I expert width.
"""

from __future__ import annotations

import hashlib
import json
import warnings

from hybrid.runtime.expert_factory import CACHE_DIR, ExpertLoader, _PerExpert

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
INT8_TYPES = frozenset({"Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"})


def fallback_format(type_name: str) -> str:
    """Our format closest to a ggml type's precision class."""
    if type_name in FLOAT_TYPES:
        return "bf16"
    return "int8" if type_name in INT8_TYPES else "int4"


def native_types() -> frozenset:
    """Names of the ggml types the CPU engine runs in their own blocks (cpu_moe.GGUF_NATIVE_TYPES
    holds gguf.GGMLQuantizationType members; empty where the kernels declare none)."""
    from hybrid.experts import cpu_moe

    return frozenset(getattr(t, "name", t) for t in getattr(cpu_moe, "GGUF_NATIVE_TYPES", frozenset()))


def held_as(types, native: frozenset, expert_format: str | None = None) -> str:
    """How a layer whose expert tensors have ggml `types` (gate, up, down) is held: "native"
    (every type has a kernel and no format is forced: any mix, as PackedLayer.from_gguf runs
    gate and up of one type as one interleaved matrix and of two types as two calls) or the
    format it is re-packed into (the most precise one any of its projections needs, or
    expert_format)."""
    types = list(types)
    if expert_format is None and all(ty in native for ty in types):
        return "native"
    return expert_format or max((fallback_format(ty) for ty in types), key=("int4", "int8", "bf16").index)


def pack_gguf_layer(src, layer: int, E: int, H: int, I: int, how: str):
    """The glue: layer `layer`'s routed experts as a cpu_moe.PackedLayer, `how` = held_as(...)."""
    from hybrid.experts import cpu_moe

    tensors = src.expert_tensors(layer, E, H, I)  # {"gate_proj"|"up_proj"|"down_proj": GGUFTensor}
    if how == "native":
        order = ("gate_proj", "up_proj", "down_proj")
        raw = [src.gguf.raw(tensors[p].name) for p in order]  # [E, rows, row_bytes] views of the mapping
        return cpu_moe.PackedLayer.from_gguf(*raw, *(tensors[p].type_id for p in order))
    g = src.gguf

    def expert(proj: str):  # read-on-demand: one expert dequantised at a time
        t = tensors[proj]
        return _PerExpert(lambda e: g.values(t.name, e, 1)[0], E, t.shape[1:])

    return cpu_moe.PackedLayer.from_float(expert("gate_proj"), expert("up_proj"), expert("down_proj"), format=how)


class GGUFExpertLoader(ExpertLoader):
    """ExpertLoader for a GGUF source: the CPU backend's layers come from pack_gguf_layer; with
    packed_cache a packed layer (blocks repacked into the kernel layout, or re-quantised) is saved
    next to the file (`.hybrid-cache/`) and mmapped the next time (packing a real file takes minutes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warned: set = set()  # fallback combinations already reported

    def _cpu_layer(self, src, layer: int, names: list[str], E: int, H: int, I: int):
        from hybrid.experts import cpu_moe

        tensors = src.expert_tensors(layer, E, H, I)
        types = {p: t.type_name for p, t in tensors.items()}
        how = held_as(types.values(), native_types(), self.expert_format)
        if how != "native" and self.expert_format is None:
            self._warn_fallback(tensors["gate_proj"].file, layer, types, how)
        cache = None
        if self.packed_cache:  # a native layer's key holds its layout's size (_gguf_cache_path)
            layout = (cpu_moe.PackedLayer.gguf_bytes(types["gate_proj"], types["up_proj"], types["down_proj"], E, H, I)
                      if how == "native" else 0)
            cache = self._gguf_cache_path(src, layer, how, layout)
        if cache is not None and cache.is_file():
            self.stats["from_cache"] += 1
            packed = cpu_moe.PackedLayer.load(str(cache))
        else:
            packed = pack_gguf_layer(src, layer, E, H, I, how)
            key = "gguf_native" if how == "native" else "quantised"
            self.stats[key] = self.stats.get(key, 0) + 1
            if cache is not None:
                cache.parent.mkdir(exist_ok=True)
                packed.save(str(cache))  # atomic: temp file, fsync, rename
                packed = cpu_moe.PackedLayer.load(str(cache))  # mmap instead of the heap copy
        return cpu_moe.CpuMoE(packed, threads=self.threads, mode=self.mode, caller=self.caller)

    def _warn_fallback(self, file, layer: int, types: dict, fmt: str) -> None:
        names = ", ".join(f"{p.removesuffix('_proj')} {ty}" for p, ty in types.items())
        if (names, fmt) in self._warned:  # once per combination, not once per layer
            return
        self._warned.add((names, fmt))
        native = ", ".join(sorted(native_types())) or "none"
        warnings.warn(f"{file}: routed experts ({names}, layer {layer} and others like it) have no native CPU "
                      f"kernel (hybrid.experts.cpu_moe.GGUF_NATIVE_TYPES: {native}): dequantised and "
                      f"re-quantised to the CPU engine's {fmt} format"
                      + ("" if fmt == "bf16" else " (lossy: a second rounding on top of the GGUF's)"),
                      stacklevel=4)

    @staticmethod
    def _gguf_cache_path(src, layer: int, fmt: str, layout: int = 0):
        # The key covers what the packed bytes depend on: the files (name, size, mtime), layer, format,
        # and for blocks kept native the layout's size (a tile layout that changed, as IQ1's did
        # from 2.3125 to 1.8125 bits per weight, never reuses a pack in the old one).
        g = src.gguf
        stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in g.paths]
        key = hashlib.sha256(json.dumps([stamp, layer, fmt] + ([layout] if layout else [])).encode()).hexdigest()[:16]
        stem = g.path.name.removesuffix(".gguf")
        return g.path.parent / CACHE_DIR / f"{stem}.layer{layer:03d}.{fmt}.{key}.packed"


# ---------------------------------------------------------------------------------------------
# What a GGUF file is and how it would be held (hybrid doctor FILE.gguf)
# ---------------------------------------------------------------------------------------------
OUR_FORMAT_NAMES = {"int4": "int4_g32", "int8": "int8_g32", "bf16": "bf16"}  # planner/model_spec.py names


def describe_gguf(path) -> dict:
    """The file's architecture, files and sizes, tensor types (routed experts apart from the rest),
    and per MoE layer how its experts would be held in RAM: in their own blocks (the file's bytes)
    or re-packed into one of our formats (that format's bytes)."""
    from hybrid.loaders.gguf_config import architecture, config_dict
    from hybrid.experts.cpu_moe import PackedLayer
    from hybrid.loaders.gguf_file import GGUFFile
    from hybrid.loaders.gguf_source import expert_tensor_names
    from hybrid.models import config_from_dict, model_class
    from hybrid.planner.model_spec import expert_format_bytes

    g = GGUFFile(path)
    try:
        arch = architecture(g)
        config = config_from_dict(config_dict(g), source=f"{g.path} (GGUF metadata)")
        facts = model_class(config.model_type).facts(config)
        E, H, I = facts.num_experts, facts.hidden, facts.expert_width
        native = native_types()
        expert_names: set[str] = set()
        layers = []
        for i in facts.moe_layers:
            names = expert_tensor_names(i)
            ts = {p: g.info(n) for p, n in names.items()}
            expert_names |= set(names.values())
            types = {p.removesuffix("_proj"): t.type_name for p, t in ts.items()}
            file_bytes = sum(t.nbytes for t in ts.values())
            how = held_as(types.values(), native)
            if how == "native":  # the packed tiles, near the file's bytes (kquant.h lists each type's)
                ram = PackedLayer.gguf_bytes(types["gate"], types["up"], types["down"], E, H, I)
            else:
                name = OUR_FORMAT_NAMES[how]
                ram = E * (2 * expert_format_bytes(name, I, H) + expert_format_bytes(name, H, I))
            layers.append({"layer": i, "types": types, "file_bytes": file_bytes, "held_as": how, "ram_bytes": ram})

        def histogram(names) -> dict:
            out: dict[str, dict] = {}
            for n in names:
                t = g.tensors[n]
                d = out.setdefault(t.type_name, {"tensors": 0, "bytes": 0})
                d["tensors"] += 1
                d["bytes"] += t.nbytes
            return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))

        others = [n for n in g.tensors if n not in expert_names]
        routed_ram = sum(x["ram_bytes"] for x in layers)
        blocks = _blocks_bytes(g, others, native)
        return {
            "path": str(g.path), "architecture": arch, "model_type": config.model_type,
            "name": g.field("general.name", str, None),
            "files": [{"path": str(p), "bytes": p.stat().st_size} for p in g.paths],
            "file_bytes": g.nbytes, "tensors": len(g.tensors),
            "routed_expert_types": histogram(expert_names), "other_types": histogram(others),
            "other_file_bytes": sum(g.tensors[n].nbytes for n in others),
            "blocks_bytes": blocks,
            "native_types": sorted(native), "expert_layers": layers,
            "routed_ram_bytes": routed_ram,
            "bytes_per_expert": routed_ram // max(1, len(layers) * E),
            "expert_format": _spec_format(layers),
            "mmproj": _describe_mmproj(g, config),
        }
    finally:
        g.close()


def _describe_mmproj(g, config) -> dict:
    """The vision tower file hybrid.load would take for this GGUF (the one mmproj*.gguf beside it):
    {"path", "file_bytes", "params"} or {"error"}; {} when there is none."""
    import warnings

    from hybrid.models import moonvit_gguf as gguf_mmproj
    from hybrid.loaders.gguf_file import GGUFError
    from hybrid.models.moonvit import MoonViT

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found, _ = gguf_mmproj.resolve(g.path, None)
    if found is None:
        return {"error": str(seen[0].message)} if seen else {}
    try:
        mm = gguf_mmproj.MmprojFile(found)
        try:
            vc = mm.vision_config(config.hidden_size, gguf_mmproj.placeholder_id(g))
            return {"path": str(found), "file_bytes": mm.nbytes(), "params": MoonViT.parameter_count(vc)}
        finally:
            mm.close()
    except GGUFError as e:
        return {"path": str(found), "error": str(e)}


def _blocks_bytes(g, names, native: frozenset) -> int:
    """Bytes of the device-side matrices on a CPU device with device_weights="blocks": a 2-D tensor
    of a native type whose rows (16) and inputs (the type's block) fit stays in its blocks, counted
    at its file bytes as routed experts in their blocks are; the rest (and MLA's kv_b, which is
    always dense) at bf16; a tied LM head is the embedding table in bf16. The embedding table itself
    (host) and the routers (fp32) are not device weights."""
    from hybrid.loaders.gguf_file import block_of

    total = 0
    for n in names:
        t = g.tensors[n]
        if any(f".attn_{p}." in n for p in ("kv_b", "k_b", "v_b")):  # MLA's kv_b (or its split form)
            total += t.numel * 2
            continue
        if len(t.shape) != 2 or n.startswith("token_embd.") or ".ffn_gate_inp." in n:
            continue
        rows, k = t.shape
        fits = t.type_name in native and rows % 16 == 0 and k % block_of(t.type_id)[0] == 0
        total += t.nbytes if fits else t.numel * 2
    if "output.weight" not in g.tensors and "token_embd.weight" in g.tensors:  # tied: the table, dense
        total += g.tensors["token_embd.weight"].numel * 2
    return total


def _spec_format(layers: list[dict]) -> str:
    """The planner's expert_format for the file (its bytes are stored_expert_bytes when native)."""
    held = {x["held_as"] for x in layers}
    if len(held) == 1 and next(iter(held)) in OUR_FORMAT_NAMES:
        return OUR_FORMAT_NAMES[next(iter(held))]
    return "gguf"


def model_spec_for(model: str | None, describe: dict | None = None):
    """The planner's ModelSpec of `model` (hybrid.models.spec.load_model_spec); for a GGUF file
    with its routed experts' bytes as the CPU engine would hold them (describe_gguf), which
    `describe`, when given, receives under "gguf"."""
    import dataclasses
    import os

    from hybrid.models.spec import load_model_spec

    spec = load_model_spec(model)
    if model is None or not str(model).endswith(".gguf") or not os.path.isfile(model):
        return spec
    d = describe_gguf(model)
    if describe is not None:
        describe["gguf"] = d
    return dataclasses.replace(spec, model_id=os.path.basename(model), expert_format=d["expert_format"],
                               stored_expert_bytes=d["bytes_per_expert"], stored_device_bytes=d["blocks_bytes"],
                               vision_params=d["mmproj"].get("params", 0))  # the tower hybrid.load would take
