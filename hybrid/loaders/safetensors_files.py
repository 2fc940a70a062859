"""A checkpoint's safetensors files: which file holds which tensor, read one tensor at a time.

Sharded checkpoints list tensor -> shard in model.safetensors.index.json; small ones are a
single model.safetensors. Files are opened with safetensors' safe_open, which memory-maps
them: reading a tensor touches only its bytes, so the whole checkpoint is never read at once.
Every error names the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """The checkpoint on disk is missing something or does not match config.json."""


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SafetensorsFiles:
    def __init__(self, path: str | Path):
        from safetensors import safe_open  # noqa: F401  (fail early if missing)

        self.path = Path(path)
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must be an object of tensor -> shard file")
            self.where: dict[str, str] = dict(weight_map)
            for shard in sorted(set(map(str, self.where.values()))):
                # A downloaded checkpoint must not make us open files outside its directory: a
                # shard is a plain file name beside the index (it may be a symlink, as in the
                # Hugging Face cache, whose snapshot files point into its blob store).
                if os.path.isabs(shard) or "/" in shard or os.sep in shard or shard in ("", ".", ".."):
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside the checkpoint "
                                          f"directory {self.path} (shards must sit beside the index)")
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: shard listed in {INDEX_NAME} is missing")
        elif single.is_file():
            self.where = {}
            for name in self._open(SINGLE_NAME).keys():
                self.where[name] = SINGLE_NAME
        else:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}")

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is not None:
            return h
        from safetensors import safe_open

        full = self.path / fname
        try:
            h = safe_open(str(full), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{full}: cannot open as safetensors ({e})") from None
        self._handles[fname] = h
        return h

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> Path:
        if name not in self.where:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        return self.path / self.where[name]

    def _slice(self, name: str):
        fname = self.where.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        h = self._open(fname)
        try:
            return h.get_slice(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / fname}: tensor {name} listed in the index but not in "
                                  f"the file ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_str(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def nbytes(self, name: str) -> int:
        sl = self._slice(name)
        n = 1
        for d in sl.get_shape():
            n *= d
        return n * _DTYPE_BYTES.get(sl.get_dtype(), 4)

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtypes=None) -> torch.Tensor:
        """The tensor (a copy out of the mmap), checked against `shape` and allowed `dtypes`."""
        fname = self.where.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        if shape is not None:
            got = self.shape(name)
            if got != tuple(shape):
                raise CheckpointError(f"{self.path / fname}: tensor {name} has shape {list(got)}, "
                                      f"config.json implies {list(shape)}")
        try:
            t = self._open(fname).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / fname}: cannot read tensor {name} ({e}); "
                                  "is the file truncated?") from None
        if dtypes is not None and t.dtype not in dtypes:
            raise CheckpointError(f"{self.path / fname}: tensor {name} has dtype {t.dtype}, expected one of "
                                  f"{', '.join(str(d) for d in dtypes)}")
        return t

    def file_sizes_ok(self) -> None:
        """Check every file's header before minutes of loading: it is whole (each file at least as
        long as its header says: catches truncated downloads), every tensor the index puts in a
        file is in it, and the 16-bit float tensors are all of one type, the one config.json
        declares (BF16 data relabelled F16 in a header reads as plausible-looking garbage)."""
        listed: dict[str, list[str]] = {}
        for name, fname in self.where.items():
            listed.setdefault(fname, []).append(name)
        halves: dict[str, tuple[Path, str]] = {}  # "BF16" / "F16" -> (file, a tensor of that type)
        for fname in sorted(listed):
            full = self.path / fname
            header = _read_header(full)
            absent = sorted(n for n in listed[fname] if n not in header)
            if absent:
                more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
                raise CheckpointError(f"{full}: does not hold tensor(s) {', '.join(absent[:3])}{more} that "
                                      f"{INDEX_NAME} lists in it")
            for name in listed[fname]:
                if header[name]["dtype"] in ("BF16", "F16"):
                    halves.setdefault(header[name]["dtype"], (full, name))
        if len(halves) == 2:
            (fb, nb), (ff, nf) = halves["BF16"], halves["F16"]
            raise CheckpointError(f"{ff}: tensor {nf} is F16 but {fb.name} holds tensor {nb} as BF16: a "
                                  f"checkpoint keeps its 16-bit weights in one type, so one was relabelled")
        declared = _declared_half(self.path)
        if declared and halves and declared not in halves:
            (got, (full, name)), = halves.items()
            raise CheckpointError(f"{full}: tensor {name} is {got}, but config.json declares the checkpoint "
                                  f"{_HALF_NAMES[declared]}: the header's dtype does not match the data's")


_HALF_NAMES = {"BF16": "bfloat16", "F16": "float16"}


def _declared_half(path: Path) -> str | None:
    """"BF16" / "F16" when the checkpoint's config.json declares that dtype (torch_dtype, or
    dtype as newer transformers write it; a multimodal wrapper's text_config first)."""
    from hybrid.config import ConfigError, read_config_json

    try:
        raw, _ = read_config_json(path)
    except ConfigError:
        return None  # no config.json here: nothing declared (its absence is reported elsewhere)
    for cfg in (raw.get("text_config"), raw):
        if isinstance(cfg, dict):
            for key in ("torch_dtype", "dtype"):
                for code, name in _HALF_NAMES.items():
                    if cfg.get(key) == name:
                        return code
    return None


def _read_header(full: Path) -> dict:
    """The safetensors header of `full` as {tensor: {"dtype", "shape", "data_offsets"}}, checked
    for shape (types, ranges) and against the file's size; CheckpointError naming the file."""
    import struct

    size = os.path.getsize(full)
    with open(full, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{full}: truncated (no safetensors header)")
        (hlen,) = struct.unpack("<Q", head)
        if 8 + hlen > size:
            raise CheckpointError(f"{full}: truncated (header says {hlen} bytes, file has {size - 8})")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{full}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{full}: corrupt safetensors header (not an object)")
    end = 0
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str)
              and isinstance(v.get("shape"), list) and all(_is_size(d) for d in v["shape"])
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(_is_size(o) for o in v["data_offsets"]) and v["data_offsets"][0] <= v["data_offsets"][1])
        if not ok:
            raise CheckpointError(f"{full}: corrupt safetensors header: tensor {name!r} needs dtype (text), "
                                  f"shape (sizes) and data_offsets [begin, end], got {v!r:.200}")
        end = max(end, v["data_offsets"][1])
    if 8 + hlen + end > size:
        raise CheckpointError(f"{full}: truncated: tensors need {8 + hlen + end} bytes, file has {size}")
    return header


def _is_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
