"""Device memory accounting: the numbers computed from config.json before loading equal the
bytes the loaded model holds, the cache size is exact, and a budget too small is refused with
the breakdown."""

import pytest
import torch

from checkpoints import build
from checkpoints import load_model
from hybrid.config import ModelConfig
from hybrid.models import facts_of
from hybrid.models.kv_cache import LatentKVCache
from hybrid.models.spec import KIMI_K25_CONFIG as KIMI_K25
from hybrid.planner.device_memory import device_bytes
from hybrid.runtime.memory import check_fits, device_formats_option, options_table


def _held_bytes(net) -> int:
    """Bytes of every tensor the model keeps on its device, except the host embedding table
    and the routed experts (a separate budget), each storage counted once."""
    from hybrid.experts.torch_moe import TorchMoE

    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth)
        elif (hasattr(obj, "__dict__") and depth < 6 and not isinstance(obj, (TorchMoE, type))
              and not callable(getattr(obj, "__func__", None)) and type(obj).__name__ != "module"):
            for k, v in vars(obj).items():
                if k not in ("embed", "config", "ops", "_lib", "staging", "inv_freq"):
                    walk(v, depth + 1)

    walk(net)
    return total


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_weight_bytes_match_loaded_model(tmp_path, fmt):
    path, _ = build(tmp_path, q_lora_rank=None if fmt == "int8" else 48)
    formats = device_formats_option(fmt)
    cfg, net = load_model(path, "cpu", torch.bfloat16, device_formats=formats, progress=False)
    predicted = device_bytes(facts_of(cfg), 2, formats).weights
    assert predicted == _held_bytes(net)


def test_kv_cache_bytes():
    cfg = ModelConfig.from_dict(KIMI_K25)
    assert LatentKVCache.bytes_per_token_for(cfg, torch.bfloat16) == 61 * (512 + 64) * 2  # 70,272
    small = ModelConfig.from_dict(dict(KIMI_K25, num_hidden_layers=2, first_k_dense_replace=1))
    cache = LatentKVCache(small, 3, 16, "cpu", torch.bfloat16)
    # every slot's rows and the spare row (static decode's padding), what the memory check counts
    assert cache.nbytes == cache.bytes_per_token * LatentKVCache.tokens_for(3, 16) == cache.bytes_per_token * (3 * 16 + 1)
    cache.latent[1][2, 5] = 1.0
    cache.reset(2)
    assert cache.latent[1].abs().sum() == 0
    with pytest.raises(IndexError, match="slot 3 out of range"):
        cache.reset(3)


def test_budget_refused_with_numbers(tmp_path):
    cfg = ModelConfig.from_dict(KIMI_K25)
    with pytest.raises(MemoryError, match=r"needs weights 19\.95 GiB \+ KV cache 17\.16 GiB .* only 24\.00 GiB"):
        check_fits(facts_of(cfg), "k25", "cpu", torch.bfloat16, {}, max_len=262144, max_vram=24 * 2**30)
    # int8 device weights at 32K fit 24 GiB
    need = check_fits(facts_of(cfg), "k25", "cpu", torch.bfloat16, device_formats_option("int8"), max_len=32768,
                      max_vram=24 * 2**30)
    assert need.total < 24 * 2**30


def test_hybrid_load_refuses_before_loading(tmp_path):
    import hybrid

    path, _ = build(tmp_path, num_hidden_layers=2)
    with pytest.raises(MemoryError, match="this configuration needs"):
        hybrid.load(path, device="cpu", max_vram=1000, progress=False)


def test_options_table_prints_k25():
    table = options_table()
    print(table)
    assert "bf16" in table and "int8" in table and "fp8" in table and "256K context" in table
