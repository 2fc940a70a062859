"""Routed experts from the checkpoint to a host expert executor (hybrid/experts/executor.py).

torch executor (the reference): every expert as float tensors in the compute dtype, INT4 and
FP8 experts dequantised. cpu executor (hybrid.experts.cpu_moe, the C++ engine): experts packed
once into the kernel layout:
  compressed-tensors INT4 group 32 -> passed through without dequantising (the nibbles are
    the packed layout's nibbles);
  bf16 / fp16 / fp32 / FP8-block experts -> quantised to expert_format (int4 | int8 | bf16;
    default bf16 for float experts, int8 for FP8 ones).
With packed_cache=True a layer's packed experts are saved next to the checkpoint
(`.hybrid-cache/`, written to a temp name and renamed) so the next start is an mmap.

Legend: E experts, H hidden, I expert width.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hybrid.experts.torch_moe import TorchMoE
from hybrid.loaders.safetensors_files import CheckpointError

BACKENDS = ("cpu", "torch")
EXPERT_FORMATS = ("int4", "int8", "bf16")
CACHE_DIR = ".hybrid-cache"


class ExpertLoader:
    def __init__(self, backend: str = "torch", expert_format: str | None = None, threads: int | None = None,
                 mode: str = "fast", packed_cache: bool = False, checkpoint_dir: str | Path | None = None,
                 caller: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"experts_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if expert_format is not None and expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {', '.join(EXPERT_FORMATS)}, got {expert_format!r}")
        if backend == "torch" and expert_format is not None:
            raise ValueError("expert_format applies to experts_backend='cpu'; the torch backend keeps the "
                             "checkpoint's experts (dequantised) as the reference")
        if mode not in ("fast", "precise"):
            raise ValueError(f"mode must be 'fast' or 'precise', got {mode!r}")
        self.backend, self.expert_format, self.threads, self.mode = backend, expert_format, threads, mode
        self.caller = caller  # CpuMoE(caller=): the calling thread computes too (CPU-only device)
        self.packed_cache = packed_cache
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.stats = {"int4_passthrough": 0, "quantised": 0, "from_cache": 0}

    # ---- one layer -----------------------------------------------------------------------------
    def layer(self, src, layer: int, prefix: str, E: int, H: int, I: int):
        """The host executor for the routed experts `{prefix}.experts.{e}` of one layer."""
        names = [f"{prefix}.experts.{e}" for e in range(E)]
        if self.backend == "torch":
            gate, up, down = [], [], []
            for n in names:
                gate.append(src.float_weight(f"{n}.gate_proj", (I, H)).to(src.device, src.dtype))
                up.append(src.float_weight(f"{n}.up_proj", (I, H)).to(src.device, src.dtype))
                down.append(src.float_weight(f"{n}.down_proj", (H, I)).to(src.device, src.dtype))
            return TorchMoE(gate, up, down)
        return self._cpu_layer(src, layer, names, E, H, I)

    def _cpu_layer(self, src, layer: int, names: list[str], E: int, H: int, I: int):
        from hybrid.experts import cpu_moe

        full = [src.prefix + n for n in names]
        int4 = f"{full[0]}.gate_proj.weight_packed" in src.files
        fp8 = not int4 and src.files.dtype_str(f"{full[0]}.gate_proj.weight") == "F8_E4M3"
        # Default: keep the checkpoint's precision class. INT4 passes through; FP8 experts
        # become int8 group-32 (8 bits, finer scales than 128x128 blocks); float stays bf16.
        fmt = self.expert_format or ("int4" if int4 else "int8" if fp8 else "bf16")
        cache_path = self._cache_path(src, layer, fmt) if self.packed_cache else None
        if cache_path is not None and _regular_file(cache_path):
            self.stats["from_cache"] += 1
            return cpu_moe.CpuMoE(cpu_moe.PackedLayer.load(str(cache_path)), threads=self.threads, mode=self.mode, caller=self.caller)
        if int4 and fmt == "int4":
            q = src.config.quant
            if q is None or q.method != "compressed-tensors":
                raise CheckpointError(f"{src.files.file_of(full[0] + '.gate_proj.weight_packed')}: INT4 experts "
                                      "but config.json has no compressed-tensors quantization_config")
            if q.group_size != 32:
                raise CheckpointError(f"quantization_config group_size {q.group_size}: the CPU engine's INT4 "
                                      "pass-through needs group 32; use experts_backend='torch'")
            last: dict[str, tuple] = {}  # the packer asks for packed then scale of one module

            def part(module, n, k, i):
                if module not in last:
                    last.clear()
                    packed, scale = src.int4_parts(module, (n, k))
                    last[module] = (packed, scale.to(torch.bfloat16))
                return last[module][i]

            args = []
            for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                args.append(_PerExpert(lambda e, p=proj, n=n, k=k: part(f"{full[e]}.{p}", n, k, 0), E, (n, k // 8)))
                args.append(_PerExpert(lambda e, p=proj, n=n, k=k: part(f"{full[e]}.{p}", n, k, 1), E, (n, k // 32)))
            packed_layer = cpu_moe.PackedLayer.from_compressed_int4(*args)
            self.stats["int4_passthrough"] += 1
        else:
            # Float (or FP8 / INT4 dequantised) experts, read one at a time and quantised.
            gate = _PerExpert(lambda e: src.float_weight(f"{names[e]}.gate_proj", (I, H)).float(), E, (I, H))
            up = _PerExpert(lambda e: src.float_weight(f"{names[e]}.up_proj", (I, H)).float(), E, (I, H))
            down = _PerExpert(lambda e: src.float_weight(f"{names[e]}.down_proj", (H, I)).float(), E, (H, I))
            packed_layer = cpu_moe.PackedLayer.from_float(gate, up, down, format=fmt)
            self.stats["quantised"] += 1
        if cache_path is not None:
            _cache_folder(cache_path.parent)
            packed_layer.save(str(cache_path))  # atomic: new temp file, fsync, rename; regular files only
            packed_layer = cpu_moe.PackedLayer.load(str(cache_path))  # mmap instead of the heap copy
        return cpu_moe.CpuMoE(packed_layer, threads=self.threads, mode=self.mode, caller=self.caller)

    def _cache_path(self, src, layer: int, fmt: str) -> Path:
        # The key covers what the packed bytes depend on: checkpoint files (name, size, mtime),
        # layer and format, so a changed checkpoint never reuses a stale pack.
        files = sorted(set(src.files.where.values()))
        stamp = [(f, os.path.getsize(src.files.path / f), int(os.path.getmtime(src.files.path / f))) for f in files]
        key = hashlib.sha256(json.dumps([stamp, layer, fmt]).encode()).hexdigest()[:16]
        return src.files.path / CACHE_DIR / f"layer{layer:03d}.{fmt}.{key}.packed"


def _cache_folder(folder: Path) -> None:
    """Make the packed cache folder; one that exists must be a real folder, not a link (a
    downloaded checkpoint holding `.hybrid-cache -> /somewhere` must not make us write there)."""
    try:
        folder.mkdir()
    except FileExistsError:
        if folder.is_symlink() or not folder.is_dir():
            raise CheckpointError(f"{folder}: the packed cache must be a folder inside the checkpoint, "
                                  f"not a link or a file; remove it") from None


def _regular_file(path: Path) -> bool:
    """A cached packed layer to load: a regular file in a real cache folder. Anything else there
    (a link, a device, a FIFO) is refused, never opened."""
    if path.parent.is_symlink() or not os.path.lexists(path):
        return False  # nothing cached (a linked folder: _cache_folder refuses it before a write)
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; the packed cache holds only the files hybrid "
                              f"wrote (remove it)")
    return True


class _PerExpert:
    """A read-on-demand [E, rows, cols] "stack": item e loads expert e from the mmapped files,
    so packing a layer holds one expert's tensors at a time, never the whole layer."""

    def __init__(self, get, num_experts: int, shape: tuple[int, int]):
        self._get, self.shape = get, (num_experts, *shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        return self._get(e)
