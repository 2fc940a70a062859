"""What a model file builds itself from: named weights as device ops, and MoE layers.

    ctx.linear(name, shape, group, bias=False)   -> a device linear op ([T, K] -> [T, N])
    ctx.dense_linear(name, shape)                -> the same, always dense (MLA's kv_b)
    ctx.norm(name, size)                         -> weight [size] (device, compute dtype)
    ctx.tensor(name, shape)                      -> fp32 tensor on the device
    ctx.embedding(name, shape)                   -> host table (compute dtype)
    ctx.moe(layer, prefix, router_rule, shared)  -> MoELayer ([T, H] -> [T, H])
    ctx.ops                                      -> the op set (hybrid/ops)
    ctx.device, ctx.dtype

The model names tensors and says which device group a linear belongs to (attention, shared,
dense, lm_head); the context reads it through the loader's WeightSource in the format chosen for
that group, and wraps it in the op set's form. MoE layers get their router (body chosen by the
op set), their host executor (hybrid/runtime/expert_factory.py) and their staging.
"""

from __future__ import annotations

import torch

from hybrid.experts.moe_layer import MoELayer
from hybrid.experts.routers import Router
from hybrid.experts.staging import staging_for
from hybrid.loaders.quant import DEVICE_FORMATS
from hybrid.loaders.safetensors_files import CheckpointError
from hybrid.models.facts import GROUPS


class BuildContext:
    def __init__(self, source, ops, experts, formats: dict[str, str] | None = None):
        self.source, self.ops, self.experts = source, ops, experts
        self.device, self.dtype = source.device, source.dtype
        self.formats = {g: "dense" for g in GROUPS}
        for g, f in (formats or {}).items():
            if g not in GROUPS:
                raise ValueError(f"device_formats: unknown tensor group {g!r} (groups: {', '.join(GROUPS)})")
            if f not in DEVICE_FORMATS:
                raise ValueError(f"device_formats[{g!r}]: unknown format {f!r} ({', '.join(DEVICE_FORMATS)})")
            if f == "fp8" and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ValueError(f"device_formats[{g!r}]=fp8 needs a GPU with FP8 (compute capability 8.9+)")
            if f == "blocks":
                self._check_blocks(g)
            self.formats[g] = f

    def _check_blocks(self, group: str) -> None:
        """Blocks are a GGUF file's own, run by the native CPU kernels on bf16 activations."""
        where = f"device_weights[{group!r}]='blocks'"
        if not hasattr(self.source, "blocks"):
            raise ValueError(f"{where} keeps a GGUF file's tensors in their blocks; this checkpoint is not "
                             "a GGUF file (use bf16, int8 or fp8)")
        if self.device.type != "cpu":
            raise ValueError(f"{where} runs on a CPU device (the native kernels); the device is {self.device}")
        if self.dtype != torch.bfloat16:
            raise ValueError(f"{where} computes with bf16 activations rounded to int8; dtype is {self.dtype} "
                             "(the fp32 reference path reads dense weights)")

    def linear(self, name: str, shape: tuple[int, int], group: str, bias: bool = False):
        if group not in self.formats:
            raise ValueError(f"{name}: unknown tensor group {group!r} (groups: {', '.join(GROUPS)})")
        w, b, scale = self.source.linear(name, shape, self.formats[group], bias=bias)
        return self.ops.linear(w, b, scale, name=name)

    def dense_linear(self, name: str, shape: tuple[int, int], bias: bool = False):
        w, b, _ = self.source.linear(name, shape, "dense", bias=bias)
        return self.ops.linear(w, b, None, name=name)

    def tied_linear(self, table: torch.Tensor, name: str):
        """The LM head as the (host) embedding table, moved to the device."""
        return self.ops.linear(table.to(self.device, self.dtype), name=name)

    def norm(self, name: str, size: int) -> torch.Tensor:
        return self.source.norm(name, size)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.source.fp32(name, shape)

    def embedding(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        return self.source.embedding(name, shape)

    def moe(self, layer: int, prefix: str, rule, shared=None) -> MoELayer:
        """rule: a routing rule (hybrid/experts/routers); its tensors are read here as fp32."""
        H = self.source.config.hidden_size
        E = rule.num_experts
        shapes = {"weight": (E, H), "bias": (E,)}
        names = rule.tensors(prefix)
        tensors = {role: self.tensor(name, shapes[role]) for role, name in names.items()}
        for role, t in tensors.items():  # a NaN here would send every token to arbitrary experts
            if not bool(torch.isfinite(t).all()):
                full = self.source.prefix + names[role]
                raise CheckpointError(f"{self.source.file_of(names[role])}: tensor {full} holds NaN or Inf")
        router = Router(rule, tensors, lib=self.ops.native_lib())
        host = self.experts.layer(self.source, layer, prefix, E, H, self.source.config.moe_intermediate_size)
        return MoELayer(layer, router, host, shared, staging=staging_for(self.device, host.capabilities().device))
