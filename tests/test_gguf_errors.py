"""Bad GGUF files: a clear error naming the file and the tensor or metadata key, never a crash
(no SIGBUS from a mapping shorter than the header says, no struct.error, no IndexError)."""

from __future__ import annotations

import shutil
import struct
import warnings

import gguf
import pytest
import torch

import gguf_files
from hybrid.loaders.gguf_file import GGUFError, GGUFFile


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    path, _, _ = gguf_files.deepseek2_gguf(tmp, "q8_0")
    return path


def _copy(good, tmp_path, name="bad.gguf"):
    dst = tmp_path / name
    shutil.copy(good, dst)
    return dst


def _entry(path, tensor: str) -> tuple[int, int]:
    """(byte offset of the tensor's type field, of its offset field) in the header."""
    data = path.read_bytes()
    key = struct.pack("<Q", len(tensor)) + tensor.encode()
    at = data.find(key)
    assert at > 0
    pos = at + len(key)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    type_at = pos + 4 + 8 * n_dims
    return type_at, type_at + 4


def _patch(path, at: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))


def _load(path):
    from hybrid.runtime.build import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(path, "cpu", torch.float32, experts_backend="torch", progress=False, split_threads=False)


def test_wrong_magic(good, tmp_path):
    bad = _copy(good, tmp_path)
    _patch(bad, 0, "4s", b"GGML")
    with pytest.raises(GGUFError, match=rf"{bad}: not a GGUF file \(magic b'GGML'"):
        GGUFFile(bad)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        _load(bad)


def test_unsupported_version(good, tmp_path):
    bad = _copy(good, tmp_path)
    _patch(bad, 4, "<I", 0x03000000)
    with pytest.raises(GGUFError, match="version 50331648 is not supported.*big-endian"):
        GGUFFile(bad)


@pytest.mark.parametrize("keep", [0, 3, 30, 1000])
def test_truncated_header(good, tmp_path, keep):
    bad = _copy(good, tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(GGUFError, match=rf"{bad}: (truncated header|not a GGUF file|header claims)"):
        GGUFFile(bad)


def test_truncated_data_names_the_tensor(good, tmp_path):
    bad = _copy(good, tmp_path)
    f = GGUFFile(good)
    last = max(f.tensors.values(), key=lambda t: t.offset)
    with open(bad, "r+b") as fh:
        fh.truncate(last.offset + last.nbytes - 1)
    with pytest.raises(GGUFError, match=rf"{bad}: tensor {last.name} .* past the end of the .*truncated download"):
        GGUFFile(bad)
    with pytest.raises(GGUFError, match=f"tensor {last.name}"):
        _load(bad)


def test_tensor_offset_past_end(good, tmp_path):
    bad = _copy(good, tmp_path)
    _, off_at = _entry(bad, "blk.1.attn_q_b.weight")
    _patch(bad, off_at, "<Q", 1 << 40)
    with pytest.raises(GGUFError, match=rf"{bad}: tensor blk.1.attn_q_b.weight .* past the end"):
        GGUFFile(bad)


def test_misaligned_or_overlapping_offsets(good, tmp_path):
    bad = _copy(good, tmp_path)
    _, off_at = _entry(bad, "blk.1.attn_q_b.weight")
    _patch(bad, off_at, "<Q", 1)
    with pytest.raises(GGUFError, match="tensor blk.1.attn_q_b.weight offset 1 is not aligned"):
        GGUFFile(bad)
    _patch(bad, off_at, "<Q", 0)  # now on top of the first tensor
    with pytest.raises(GGUFError, match="overlap"):
        GGUFFile(bad)


def test_unknown_type(good, tmp_path):
    bad = _copy(good, tmp_path)
    type_at, _ = _entry(bad, "blk.2.ffn_down_exps.weight")
    _patch(bad, type_at, "<I", 250)
    with pytest.raises(GGUFError, match=rf"{bad}: tensor blk.2.ffn_down_exps.weight has unknown ggml type 250"):
        GGUFFile(bad)


def test_missing_metadata_names_the_key(good, tmp_path):
    from hybrid.models import config_from_dir

    bad = gguf_files.rewrite(good, tmp_path / "nokey.gguf", drop=("deepseek2.expert_count",))
    with pytest.raises(GGUFError, match=rf"{bad}: metadata key deepseek2.expert_count is missing"):
        config_from_dir(bad)
    with pytest.raises(GGUFError, match="deepseek2.expert_count is missing"):
        _load(bad)


def test_wrong_metadata_type(good, tmp_path):
    from hybrid.models import config_from_dir

    bad = gguf_files.rewrite(good, tmp_path / "str.gguf",
                             set_fields={"deepseek2.block_count": ("three", gguf.GGUFValueType.STRING)})
    with pytest.raises(GGUFError, match="metadata key deepseek2.block_count='three' is not int"):
        config_from_dir(bad)


def test_softmax_gating_refused_by_the_config(good, tmp_path):
    from hybrid.config import ConfigError
    from hybrid.models import config_from_dir

    bad = gguf_files.rewrite(good, tmp_path / "softmax.gguf",
                             set_fields={"deepseek2.expert_gating_func": (1, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match=r"GGUF metadata\): field scoring_func='softmax' is not supported"):
        config_from_dir(bad)


def test_missing_gating_func_is_softmax_to_llamacpp_and_refused(good, tmp_path):
    # llama.cpp's converter leaves the key out when config.json has no scoring_func (as
    # transformers' DeepseekV3Config saves it); llama.cpp then routes by softmax
    from hybrid.models import config_from_dir

    bad = gguf_files.rewrite(good, tmp_path / "nogating.gguf", drop=("deepseek2.expert_gating_func",))
    with pytest.raises(GGUFError, match=rf"{bad}: metadata key deepseek2.expert_gating_func is missing: "
                                        "llama.cpp reads that as softmax"):
        config_from_dir(bad)


def test_missing_tensor_names_it(good, tmp_path):
    bad = gguf_files.rewrite(good, tmp_path / "notensor.gguf",
                             tensors=lambda items: [i for i in items if i[0] != "blk.2.attn_kv_a_norm.weight"])
    with pytest.raises(GGUFError, match=rf"{bad}: tensor blk.2.attn_kv_a_norm.weight .* is missing"):
        _load(bad)


def test_wrong_shape_names_it(good, tmp_path):
    def cut(items):
        return [(n, t[:, :32] if n == "blk.0.ffn_up.weight" else t, ty) for n, t, ty in items]

    bad = gguf_files.rewrite(good, tmp_path / "shape.gguf", tensors=cut)
    with pytest.raises(GGUFError, match=r"tensor blk.0.ffn_up.weight has shape \[96, 32\], the metadata implies \[96, 64\]"):
        _load(bad)


def test_split_set_errors(good, tmp_path):
    gguf_files.rewrite(good, tmp_path / "s.gguf", split_max_tensors=30)
    first, second = tmp_path / "s-00001-of-00002.gguf", tmp_path / "s-00002-of-00002.gguf"
    assert len(GGUFFile(first).tensors) == len(GGUFFile(good).tensors)
    with pytest.raises(GGUFError, match="part 2 of a split set; pass the first file"):
        GGUFFile(second)
    second.unlink()
    with pytest.raises(GGUFError, match="split set of 2 files, missing s-00002-of-00002.gguf"):
        GGUFFile(first)


def test_unknown_pre_tokenizer(good, tmp_path):
    from hybrid.tokenizer import TokenizerError
    from hybrid.tokenizer_gguf import gguf_tokenizer

    bad = gguf_files.rewrite(good, tmp_path / "pre.gguf",
                             set_fields={"tokenizer.ggml.pre": ("mystery", gguf.GGUFValueType.STRING)})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre='mystery' names a pre-tokenizer"):
        gguf_tokenizer(bad)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        GGUFFile(tmp_path / "nothing.gguf")


def test_type_without_a_dequantiser_names_the_tensor(good, tmp_path):
    import numpy as np

    def as_i8(items):  # a norm stored as ggml I8: a known type nothing here can turn into floats
        return [(n, np.zeros((64,), dtype=np.uint8) if n == "blk.0.attn_norm.weight" else t,
                 gguf.GGMLQuantizationType.I8 if n == "blk.0.attn_norm.weight" else ty) for n, t, ty in items]

    bad = gguf_files.rewrite(good, tmp_path / "i8.gguf", tensors=as_i8)
    with pytest.raises(GGUFError, match=r"tensor blk.0.attn_norm.weight is I8, which the gguf package cannot "
                                        "dequantise"):
        _load(bad)
