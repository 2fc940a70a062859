"""The weight source: tensors by name from a checkpoint's safetensors files, in the form the
runtime asks for.

The caller names a tensor (a module path such as `model.layers.0.self_attn.q_a_proj`) and the
shape config.json implies; the source finds it (with the checkpoint's prefix, e.g.
`language_model.` for kimi_k25), checks shape and dtype, undoes the checkpoint's storage format
(FP8 blocks, compressed-tensors INT4) and, for linear weights, converts to the device format
asked for (dense in the compute dtype, or int8/fp8 weight-only with a per-row scale) and moves
it to the device. It returns tensors only; what is built from them is the runtime's business
(hybrid/runtime/context.py).
"""

from __future__ import annotations

import torch

from hybrid.config import ModelConfig
from hybrid.loaders.quant import DEVICE_FORMATS, dequant_fp8_block, dequant_int4, quantize_rows
from hybrid.loaders.safetensors_files import FLOAT_DTYPES, CheckpointError, SafetensorsFiles


class WeightSource:
    def __init__(self, config: ModelConfig, files: SafetensorsFiles, device, dtype):
        self.config, self.files = config, files
        self.device, self.dtype = torch.device(device), dtype
        self.prefix = config.tensor_prefix
    # ---- raw reads -------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        return self.prefix + name

    def file_of(self, name: str):
        """The file holding tensor `name` (for error messages)."""
        return self.files.file_of(self._name(name))

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float tensor stored as is (norms, router, biases, embedding), checked against `shape`."""
        return self.files.get(self._name(name), shape, FLOAT_DTYPES)

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

    def int4_parts(self, full: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """compressed-tensors INT4 module `full` (prefixed name) as stored: (weight_packed
        [N, K/8] int32, weight_scale [N, K/G]), checked against its weight_shape."""
        n, k = shape
        g = self.config.quant.group_size
        ws = self.files.get(f"{full}.weight_shape", None, (torch.int32, torch.int64))
        if ws.tolist() != [n, k]:
            raise CheckpointError(f"{self.files.file_of(full + '.weight_shape')}: tensor {full}.weight_shape "
                                  f"is {ws.tolist()}, config.json implies {[n, k]}")
        packed = self.files.get(f"{full}.weight_packed", (n, -(-k // 8)), (torch.int32,))
        scale = self.files.get(f"{full}.weight_scale", (n, -(-k // g)), FLOAT_DTYPES)
        return packed, scale

    def int4_weight(self, full: str, shape: tuple[int, int]) -> torch.Tensor:
        """compressed-tensors INT4 module `full` -> [N, K] fp32."""
        packed, scale = self.int4_parts(full, shape)
        return dequant_int4(packed, scale, shape[0], shape[1], self.config.quant.group_size, full)

    # ---- what the model asks for -------------------------------------------------------------
    def linear(self, name: str, shape: tuple[int, int], fmt: str = "dense", bias: bool = False):
        """-> (weight [N, K], bias [N] or None, scale [N] fp32 or None) on the device: dense in
        the compute dtype, or int8/fp8 weight-only (`fmt`) with a per-row scale. "blocks" is a
        GGUF source's (GGUFSource.linear); a checkpoint without blocks gives dense."""
        if fmt not in DEVICE_FORMATS:
            raise ValueError(f"{name}: unknown device format {fmt!r} ({', '.join(DEVICE_FORMATS)})")
        fmt = "dense" if fmt == "blocks" else fmt
        w = self.float_weight(name, shape)
        b = None
        if bias:
            b = self.tensor(f"{name}.bias", (shape[0],)).to(self.device, self.dtype)
        if fmt == "dense":
            return w.to(self.device, self.dtype), b, None
        qw, scale = quantize_rows(w, fmt)
        return qw.to(self.device), b, scale.to(self.device)

    def norm(self, name: str, size: int) -> torch.Tensor:
        return self.tensor(name, (size,)).to(self.device, self.dtype)

    def fp32(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.tensor(name, shape).to(self.device, torch.float32)

    def embedding(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        # Host memory, compute dtype: each step gathers T rows and sends only those.
        return self.tensor(name, shape).to(self.dtype)
