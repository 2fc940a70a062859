"""The fuzz corpus in CI, bounded: tests/fuzz/ (python -m tests.fuzz) with a few cases per area
in a subprocess of its own (it forks a child per case, and sets its thread counts before torch
loads), plus a property test of the config parsers with hypothesis where it is installed (the
`test` extra): any JSON a config.json can hold is parsed or refused with a ConfigError, never
another exception.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_corpus_bounded_run():
    """80 cases (10 per area), seed 0: each a correct result or a clean error naming the input."""
    r = subprocess.run([sys.executable, "-m", "tests.fuzz", "--cases", "80", "--seed", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "80 cases in" in r.stdout, r.stdout


@functools.lru_cache(maxsize=None)
def _configs() -> tuple[dict, ...]:
    """Kimi K2.5 (plain and YaRN), its multimodal wrapper, and Qwen3-MoE as shipped."""
    from checkpoints import YARN
    from checkpoints_qwen3 import _shipped_spelling, hf_config

    from hybrid.models.spec import KIMI_K25_CONFIG as K25

    qwen = _shipped_spelling(json.loads(hf_config().to_json_string(use_diff=False)))
    return (K25, dict(K25, rope_scaling=dict(YARN)), {"model_type": "kimi_k25", "text_config": dict(K25, model_type="kimi_k2")},
            qwen)


def test_config_fields_of_any_json_type():
    """Every top-level field of the Kimi K2.5 config replaced by values of every JSON kind: a
    ConfigError naming the field, or a config (the field was optional or tolerant)."""
    from hybrid.config import ConfigError

    kinds = [None, True, False, 0, -1, 2**64, 1.5, float("nan"), float("inf"), "", "x", [], [1], {}, {"a": 1}]
    from hybrid.models import config_from_dict, model_class

    for base in _configs():
        for key in base:
            for v in kinds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        cfg = config_from_dict(dict(base, **{key: v}), source="ckpt/config.json")
                        model_class(cfg.model_type).facts(cfg)
                    except ConfigError as e:
                        assert "ckpt/config.json" in str(e), (key, v, e)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)


_FIELDS = sorted({"rope_scaling", "rope_parameters", "quantization_config", "text_config", "model_type",
                  "num_experts", "decoder_sparse_step", "mlp_only_layers", "head_dim", "n_shared_experts"}
                 | {"hidden_size", "vocab_size", "num_hidden_layers", "rms_norm_eps", "eos_token_id"})


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.dictionaries(st.sampled_from(_FIELDS), _json, min_size=1, max_size=4))
def test_config_parsers_property(edits):
    """Any JSON values in 1-4 fields of each seed config: a config or a ConfigError naming the file."""
    from hybrid.config import ConfigError
    from hybrid.models import config_from_dict, model_class

    for base in _configs():
        raw = json.loads(json.dumps(dict(base, **edits)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cfg = config_from_dict(raw, "ckpt/config.json")
                model_class(cfg.model_type).facts(cfg)
            except ConfigError as e:
                assert "ckpt/config.json" in str(e)
