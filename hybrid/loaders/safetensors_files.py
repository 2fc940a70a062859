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
        """Check every file is at least as long as its header says (catches truncated downloads
        before minutes of loading), and that every tensor the index puts in a file is in it."""
        import struct

        listed: dict[str, list[str]] = {}
        for name, fname in self.where.items():
            listed.setdefault(fname, []).append(name)
        for fname in sorted(listed):
            full = self.path / fname
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
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{full}: corrupt safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{full}: corrupt safetensors header (not an object)")
            try:
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{full}: corrupt safetensors header (tensor entry without "
                                      f"data_offsets: {e})") from None
            if 8 + hlen + end > size:
                raise CheckpointError(f"{full}: truncated: tensors need {8 + hlen + end} bytes, file has {size}")
            absent = sorted(n for n in listed[fname] if n not in header)
            if absent:
                more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
                raise CheckpointError(f"{full}: does not hold tensor(s) {', '.join(absent[:3])}{more} that "
                                      f"{INDEX_NAME} lists in it")


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
