"""The weight source a model file builds itself from.

The model names a tensor and the shape config.json implies; the source finds it in the
safetensors files (with the checkpoint's prefix, e.g. `language_model.` for kimi_k25), checks
shape and dtype, undoes the checkpoint's storage format (FP8 blocks, compressed-tensors INT4)
for device tensors, converts to the device format chosen for its tensor group and moves it.
Routed experts go to the expert backend (hybrid/loaders/experts.py) without passing through
here as float when they are INT4.

Tensor groups (each may be stored dense in the compute dtype, or int8/fp8 weight-only):
  attention  q/kv/o projections      shared  shared-expert MLP
  dense      dense-layer MLPs        lm_head the output projection
Norm weights, router weights and kv_b_proj always stay dense (small, or needed per head).
"""

from __future__ import annotations

import torch

from hybrid.config import ModelConfig
from hybrid.loaders.quant import dequant_fp8_block, dequant_int4, quantize_rows
from hybrid.loaders.safetensors_files import FLOAT_DTYPES, CheckpointError, SafetensorsFiles
from hybrid.models.linear import Linear

GROUPS = ("attention", "shared", "dense", "lm_head")
DEVICE_FORMATS = ("dense", "int8", "fp8")


def tensor_group(name: str) -> str:
    if name == "lm_head":
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".shared_experts." in name:
        return "shared"
    return "dense"


class WeightSource:
    def __init__(self, config: ModelConfig, files: SafetensorsFiles, device, dtype,
                 device_formats: dict[str, str] | None = None, experts=None):
        self.config, self.files = config, files
        self.device, self.dtype = torch.device(device), dtype
        self.formats = {g: "dense" for g in GROUPS}
        for g, f in (device_formats or {}).items():
            if g not in GROUPS:
                raise ValueError(f"device_formats: unknown tensor group {g!r} (groups: {', '.join(GROUPS)})")
            if f not in DEVICE_FORMATS:
                raise ValueError(f"device_formats[{g!r}]: unknown format {f!r} ({', '.join(DEVICE_FORMATS)})")
            if f == "fp8" and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ValueError(f"device_formats[{g!r}]=fp8 needs a GPU with FP8 (compute capability 8.9+)")
            self.formats[g] = f
        self.experts = experts  # hybrid.loaders.experts.ExpertLoader
        self.prefix = config.tensor_prefix

    # ---- raw reads -------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        return self.prefix + name

    def float_weight(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """`name` (a module path, without `.weight`) as a float tensor in its stored precision
        (fp32 after undoing FP8 / INT4), checked against `shape`."""
        full = self._name(name)
        q = self.config.quant
        if f"{full}.weight_packed" in self.files:
            if q is None or q.method != "compressed-tensors":
                raise CheckpointError(f"{self.files.file_of(full + '.weight_packed')}: tensor {full}.weight_packed "
                                      "is INT4 but config.json has no compressed-tensors quantization_config")
            return self.int4_weight(full, shape)
        w = self.files.get(f"{full}.weight", shape, FLOAT_DTYPES + (torch.float8_e4m3fn,))
        if w.dtype == torch.float8_e4m3fn:
            if q is None or q.method != "fp8":
                raise CheckpointError(f"{self.files.file_of(full + '.weight')}: tensor {full}.weight is FP8 but "
                                      "config.json has no fp8 quantization_config")
            s = self.files.get(f"{full}.weight_scale_inv", None, (torch.float32, torch.bfloat16))
            try:
                return dequant_fp8_block(w, s, q.block_size, full)
            except ValueError as e:
                raise CheckpointError(f"{self.files.file_of(full + '.weight_scale_inv')}: {e}") from None
        return w

    def int4_weight(self, full: str, shape: tuple[int, int]) -> torch.Tensor:
        """compressed-tensors INT4 module `full` -> [N, K] fp32."""
        n, k = shape
        g = self.config.quant.group_size
        where = self.files.file_of(f"{full}.weight_packed")
        ws = self.files.get(f"{full}.weight_shape", None, (torch.int32, torch.int64))
        if ws.tolist() != [n, k]:
            raise CheckpointError(f"{where}: tensor {full}.weight_shape is {ws.tolist()}, config.json implies {[n, k]}")
        packed = self.files.get(f"{full}.weight_packed", (n, -(-k // 8)), (torch.int32,))
        scale = self.files.get(f"{full}.weight_scale", (n, -(-k // g)), FLOAT_DTYPES)
        return dequant_int4(packed, scale, n, k, g, full)

    # ---- what the model asks for -------------------------------------------------------------
    def linear(self, name: str, shape: tuple[int, int], bias: bool = False, dense: bool = False) -> Linear:
        w = self.float_weight(name, shape)
        b = None
        if bias:
            b = self.files.get(self._name(f"{name}.bias"), (shape[0],), FLOAT_DTYPES)
            b = b.to(self.device, self.dtype)
        fmt = "dense" if dense else self.formats[tensor_group(name)]
        if fmt == "dense":
            return Linear(w.to(self.device, self.dtype), b, name=name)
        qw, scale = quantize_rows(w, fmt)
        return Linear(qw.to(self.device), b, scale.to(self.device), name=name)

    def norm(self, name: str, size: int) -> torch.Tensor:
        return self.files.get(self._name(name), (size,), FLOAT_DTYPES).to(self.device, self.dtype)

    def fp32(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.files.get(self._name(name), shape, FLOAT_DTYPES).to(self.device, torch.float32)

    def embedding(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        # Host memory, compute dtype: each step gathers T rows and sends only those.
        return self.files.get(self._name(name), shape, FLOAT_DTYPES).to(self.dtype)

    def moe_layer(self, layer: int, prefix: str, shared):
        from hybrid.experts.moe_layer import MoELayer

        c = self.config
        E, H = c.n_routed_experts, c.hidden_size
        gate = self.fp32(f"{prefix}.gate.weight", (E, H))
        bias = self.fp32(f"{prefix}.gate.e_score_correction_bias", (E,))
        routed = self.experts.layer(self, layer, prefix)
        return MoELayer(c, layer, gate, bias, routed, shared, timer=self.experts.timer)
