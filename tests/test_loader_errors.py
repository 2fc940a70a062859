"""Bad checkpoints fail with a clear error naming the file and the tensor or field, and
loading never writes into the checkpoint directory."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build
from hybrid.config import ConfigError
from checkpoints import load_model
from hybrid.loaders.safetensors_files import CheckpointError

NORM = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("bad"), num_hidden_layers=2)
    return path


def _copy(ckpt, tmp_path):
    dst = tmp_path / "ck"
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(path, name, value=None):
    """Replace (or with value None, drop) one tensor in its shard, keeping the index as is."""
    shard = _shard_of(path, name)
    tensors = load_file(str(shard))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def _load(path):
    return load_model(path, "cpu", torch.float32, progress=False)


def test_missing_shard(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    shard = _shard_of(p, NORM)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        _load(p)


def test_missing_tensor(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    _rewrite(p, NORM)
    index = json.loads((p / "model.safetensors.index.json").read_text())
    del index["weight_map"][NORM]
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is missing"):
        _load(p)


def test_tensor_in_index_but_not_in_shard(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    shard = _rewrite(p, NORM)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*{NORM}"):
        _load(p)


def test_wrong_shape(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    shard = _rewrite(p, NORM, torch.ones(65))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {NORM} has shape \[65\], config.json implies \[64\]"):
        _load(p)


def test_wrong_expert_shape(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    name = "model.layers.1.mlp.experts.7.down_proj.weight"
    _rewrite(p, name, torch.ones(64, 31))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[64, 31\]"):
        _load(p)


def test_wrong_dtype(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    shard = _rewrite(p, NORM, torch.ones(64, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {NORM} has dtype torch.int32"):
        _load(p)


def test_truncated_file(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    shard = _shard_of(p, NORM)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        _load(p)


def test_unknown_model_type(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    raw = json.loads((p / "config.json").read_text())
    raw["model_type"] = "llama"
    (p / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        _load(p)


def test_unknown_quantization(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    raw = json.loads((p / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (p / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        _load(p)


@pytest.mark.parametrize("field,value,msg", [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("scoring_func", "softmax", "scoring_func='softmax' is not supported"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "rope type 'llama3' is not supported"),
    ("n_group", 5, "n_group=5 must divide n_routed_experts=64"),
    ("hidden_size", None, "missing required field.*hidden_size"),
])
def test_unsupported_fields(ckpt, tmp_path, field, value, msg):
    p = _copy(ckpt, tmp_path)
    raw = json.loads((p / "config.json").read_text())
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    (p / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=msg):
        _load(p)


def test_int4_weights_without_quant_config(tmp_path):
    path, _ = build(tmp_path, variant="int4", num_hidden_layers=2)
    raw = json.loads((path / "config.json").read_text())
    del raw["quantization_config"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="weight_packed is INT4 but config.json has no compressed-tensors"):
        _load(path)


def test_load_writes_nothing_into_checkpoint(ckpt):
    before = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.iterdir()}
    _load(ckpt)
    after = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.iterdir()}
    assert before == after


@pytest.mark.parametrize("shard", ["../good/model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_cannot_name_a_file_outside_the_checkpoint(tmp_path, shard):
    import json

    path, _ = build(tmp_path, shards=2)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is not a file name inside the checkpoint directory"):
        _load(path)


def test_index_listing_a_tensor_nobody_reads_is_still_refused(ckpt, tmp_path):
    p = _copy(ckpt, tmp_path)
    index = json.loads((p / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][NORM]
    index["weight_map"]["model.layers.1.extra.weight"] = shard
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard}: does not hold tensor.*model.layers.1.extra.weight"):
        _load(p)


def test_nan_router_bias_is_refused(ckpt, tmp_path):
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    p = _copy(ckpt, tmp_path)
    bias = load_file(str(_shard_of(p, name)))[name].clone()
    bias[3] = float("nan")
    shard = _rewrite(p, name, bias)
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor {name} holds NaN or Inf"):
        _load(p)


def _as_bf16_checkpoint(ckpt, tmp_path):
    """The fixture checkpoint with every float tensor stored BF16 and config.json saying so."""
    p = _copy(ckpt, tmp_path)
    for shard in sorted(p.glob("*.safetensors")):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(shard)).items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    cfg = json.loads((p / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (p / "config.json").write_text(json.dumps(cfg))
    return p


def _relabel(shard, tensor=None):
    """BF16 -> F16 in the safetensors header (all tensors, or one), bytes untouched."""
    blob = bytearray(shard.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    head = blob[8:8 + n].decode()
    if tensor is None:
        head = head.replace('"dtype":"BF16"', '"dtype":"F16" ')
    else:
        at = head.index(f'"{tensor}":')
        head = head[:at] + head[at:].replace('"dtype":"BF16"', '"dtype":"F16" ', 1)
    blob[8:8 + n] = head.encode()
    shard.write_bytes(bytes(blob))


def test_bf16_relabelled_f16_is_refused(ckpt, tmp_path):
    p = _as_bf16_checkpoint(ckpt, tmp_path)
    _load(p)  # the BF16 checkpoint itself loads
    _relabel(_shard_of(p, NORM), NORM)
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is F16 but .* as BF16: .* one was relabelled"):
        _load(p)
    for shard in p.glob("*.safetensors"):
        _relabel(shard)
    with pytest.raises(CheckpointError, match=r"is F16, but config.json declares the checkpoint bfloat16"):
        _load(p)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": 7, "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": -1, "data_offsets": [0, 8]},
    "F32",
])
def test_malformed_header_entries_name_file_and_tensor(ckpt, tmp_path, entry):
    p = _copy(ckpt, tmp_path)
    shard = _shard_of(p, NORM)
    blob = shard.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    head = json.loads(blob[8:8 + n])
    head[NORM] = entry
    new = json.dumps(head).encode()
    shard.write_bytes(len(new).to_bytes(8, "little") + new + blob[8 + n:])
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt safetensors header: tensor '{NORM}'"):
        _load(p)
