"""A GGUF file (or a split set of them) mapped read-only: metadata, tensor table, tensor bytes.

Format facts (ggml's gguf.md; version 2 and 3, little-endian):
  magic "GGUF", version u32, tensor_count u64, kv_count u64,
  kv_count x (key: string, value_type u32, value), a string is u64 length + UTF-8 bytes, an
    array is element type u32 + count u64 + the elements,
  tensor_count x (name: string, n_dims u32, ne[n_dims] u64 (ne[0] innermost), type u32,
    offset u64 relative to the data section),
  padding to general.alignment (default 32), then the data section.
Split sets (llama.cpp's gguf-split) are NAME-00001-of-0000N.gguf ... each a whole GGUF with its
own tensors; the first carries the model metadata, every one split.no / split.count.

Every file is mmapped once (never read whole). All sizes are checked when the file is opened:
each tensor's bytes must lie inside its file, so reading a mapped tensor can never run off the
end of a file shorter than its header says (that would be SIGBUS, not an error). Errors name
the file, and the tensor or metadata key they are about.

Shapes are given in torch order (ne reversed): a ggml [ne0=in, ne1=out, ne2=E] is [E, out, in].
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid.loaders.safetensors_files import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF metadata value types -> struct format (scalars); 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Numeric arrays are read in one numpy call (token_type arrays hold ~160K entries).
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}


class GGUFError(CheckpointError):
    """A GGUF file is malformed or lacks what the model needs; the message names file and tensor/key."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (ggml ne reversed)
    type_id: int  # ggml type number (gguf.GGMLQuantizationType value)
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def type_name(type_id: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def block_of(type_id: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) of a ggml type, None when the type is unknown."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None


class _Cursor:
    """Reads the header out of the mapping; a read past the end is a GGUFError naming `what`."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise GGUFError(f"{self.path}: truncated header: reading {what} needs {n} bytes at offset "
                            f"{self.pos}, the file has {len(self.buf)}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype == 6:  # f32: the shortest decimal that rounds to it (1e-06, not 9.99999997e-07),
            return float(str(np.float32(self.scalar("f", what))))  # what the converter was given
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("I", what), self.scalar("Q", what)
            if etype in _NP:
                size = np.dtype(_NP[etype]).itemsize
                arr = np.frombuffer(self.take(count * size, what), dtype=_NP[etype])
                return (arr != 0).tolist() if etype == 7 else arr.tolist()
            if etype == _STRING:
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            raise GGUFError(f"{self.path}: {what} is an array of unknown value type {etype}")
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


class _OneFile:
    """One mapped GGUF file: its metadata and tensor table, checked against its size."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise GGUFError(f"{path}: cannot open: {e}") from None
        self.size = size
        cur = _Cursor(memoryview(self.map), path)
        magic = bytes(cur.take(4, "the magic"))
        if magic != MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        version = cur.scalar("I", "the version")
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS else ""
            raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: 2, 3){hint}")
        self.version = version
        n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
        if n_tensors > size or n_kv > size:  # each entry takes bytes: a huge count is a corrupt header
            raise GGUFError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                            f"a {size}-byte file can hold")
        self.fields: dict[str, object] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("I", f"the type of metadata key {key}")
            self.fields[key] = cur.value(vtype, f"metadata key {key}")
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: metadata key general.alignment={align!r} must be a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i}'s name")
            n_dims = cur.scalar("I", f"tensor {name}'s dimension count")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (ggml allows 1..4)")
            ne = [cur.scalar("Q", f"tensor {name}'s shape") for _ in range(n_dims)]
            tid = cur.scalar("I", f"tensor {name}'s type")
            off = cur.scalar("Q", f"tensor {name}'s offset")
            infos.append((name, ne, tid, off))
        data = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ne, tid, off in infos:
            blk = block_of(tid)
            if blk is None:
                raise GGUFError(f"{path}: tensor {name} has unknown ggml type {tid} (this gguf package knows "
                                f"types up to {_max_type()})")
            bs, bb = blk
            if ne[0] % bs:
                raise GGUFError(f"{path}: tensor {name} ({type_name(tid)}) has rows of {ne[0]} values, not a "
                                f"multiple of its block of {bs}")
            nbytes = math.prod(ne) // bs * bb
            if off % align:
                raise GGUFError(f"{path}: tensor {name} offset {off} is not aligned to {align}")
            if data + off + nbytes > size:
                raise GGUFError(f"{path}: tensor {name} ({type_name(tid)} {list(reversed(ne))}) needs bytes "
                                f"{data + off}..{data + off + nbytes}, past the end of the {size}-byte file "
                                "(truncated download?)")
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor {name} is listed twice")
            self.tensors[name] = GGUFTensor(name, tuple(reversed(ne)), tid, path, data + off, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise GGUFError(f"{path}: tensors {a} and {b} overlap in the file")


def _max_type() -> int:
    from gguf.constants import GGMLQuantizationType

    return max(t.value for t in GGMLQuantizationType)


def split_paths(path: Path) -> list[Path]:
    """The files of a split set given its first file, or [path] for a single file."""
    m = SPLIT_RE.match(path.name)
    if m is None:
        return [path]
    no, count = int(m["no"]), int(m["count"])
    if no != 1:
        raise GGUFError(f"{path}: part {no} of a split set; pass the first file "
                        f"({m['stem']}-00001-of-{m['count']}.gguf)")
    if count < 1:
        raise GGUFError(f"{path}: split set of {count} files")
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"{path}: split set of {count} files, missing {', '.join(missing)} in {path.parent}")
    return paths


class GGUFFile:
    """A GGUF model: `fields` (metadata of the first file), `tensors` (name -> GGUFTensor over all
    files of a split set), and tensor bytes / values read out of the mappings."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        self.paths = split_paths(self.path)
        self._files = [_OneFile(p) for p in self.paths]
        self.fields = dict(self._files[0].fields)
        self.tensors: dict[str, GGUFTensor] = {}
        for i, f in enumerate(self._files):
            if len(self.paths) > 1:
                no, count = f.fields.get("split.no"), f.fields.get("split.count")
                if count is not None and count != len(self.paths):
                    raise GGUFError(f"{f.path}: metadata split.count={count}, the file names say {len(self.paths)}")
                if no is not None and no != i:
                    raise GGUFError(f"{f.path}: metadata split.no={no}, expected {i} for this file")
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise GGUFError(f"{f.path}: tensor {name} is also in {self.tensors[name].file}")
                self.tensors[name] = t
        want = self.fields.get("split.tensors.count")
        if want is not None and want != len(self.tensors):
            raise GGUFError(f"{self.path}: metadata split.tensors.count={want}, the files hold {len(self.tensors)}")
        self._maps = {f.path: f.map for f in self._files}

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self._files)

    # ---- metadata -----------------------------------------------------------------------------
    def field(self, key: str, kind=None, default=...):
        """Metadata value `key`; GGUFError naming the key when it is missing (and no default is
        given) or not of `kind` (a type or tuple of types)."""
        if key not in self.fields:
            if default is not ...:
                return default
            raise GGUFError(f"{self.path}: metadata key {key} is missing")
        v = self.fields[key]
        if kind is not None and (not isinstance(v, kind) or (isinstance(v, bool) and bool not in _kinds(kind))):
            raise GGUFError(f"{self.path}: metadata key {key}={_short(v)} is not {_kind_name(kind)}")
        return v

    # ---- tensors ------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> GGUFTensor:
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        return t

    def raw(self, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """The stored bytes of tensor `name` as a read-only uint8 array [rows..., row_bytes] over the
        mapping (no copy); first/count select whole entries along dim 0 (an expert of a stack)."""
        t = self.info(name)
        bs, bb = block_of(t.type_id)
        row_bytes = t.shape[-1] // bs * bb
        lead = t.shape[:-1] or (1,)
        per0 = t.nbytes // lead[0]
        count = lead[0] - first if count is None else count
        if not (0 <= first and first + count <= lead[0]):
            raise GGUFError(f"{t.file}: tensor {name}: entries {first}..{first + count} outside 0..{lead[0]}")
        arr = np.frombuffer(self._maps[t.file], dtype=np.uint8, count=count * per0, offset=t.offset + first * per0)
        return arr.reshape(count, *lead[1:], row_bytes) if t.shape[:-1] else arr.reshape(row_bytes)

    def values(self, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """Tensor `name` (or entries first..first+count along dim 0) dequantised to fp32 in torch
        order, by the gguf package's own dequantiser (a new array)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.info(name)
        raw = self.raw(name, first, count)
        try:
            out = dequantize(raw, GGMLQuantizationType(t.type_id))
        except NotImplementedError:
            raise GGUFError(f"{t.file}: tensor {name} is {t.type_name}, which the gguf package cannot "
                            "dequantise") from None
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        for f in self._files:
            if isinstance(f.map, mmap.mmap):
                try:
                    f.map.close()
                except BufferError:  # arrays still view it; the OS unmaps when they go
                    pass


def _kinds(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def is_gguf_path(path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and not p.is_dir()
