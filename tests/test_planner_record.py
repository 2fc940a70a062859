"""`hybrid profile`: the recorded trace equals the routing the model really did."""

import json

import numpy as np
import pytest
import yaml
from checkpoints import build
from test_engine_model import VOCAB, write_tiny_tokenizer

import hybrid
from hybrid.cli import main
from hybrid.planner import trace as traces
from hybrid.models.spec import load_model_spec

PROMPTS = ["hello world", "the quick brown fox", "", "def f(x): return x"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("rec"), vocab_size=VOCAB, shards=1)
    write_tiny_tokenizer(path)
    return path


def test_profile_command_records_the_routing(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "t.safetensors"
    summary = tmp_path / "summary.yaml"
    assert main(["profile", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                 "--new-tokens", "3", "--summary", str(summary)]) == 0
    tr = traces.load(str(out))
    s = yaml.safe_load(summary.read_text())
    assert s["tokens"] == tr.tokens and not s["synthetic"]
    assert str(prompts) in s["recorded_with"]
    assert sum(v["experts_used"] for v in s["layers"].values()) == int((tr.counts > 0).sum())
    spec = load_model_spec(str(ckpt))
    assert tr.config_hash == spec.config_hash and tr.layers == list(spec.moe_layers)
    assert not tr.synthetic and tr.source.startswith("recorded")

    # The same prompts, run again with a plain hook, give the same ids in the same order.
    model = hybrid.load(ckpt, progress=False)
    seen = {l: [] for l in spec.moe_layers}
    for m in model.moe_layers().values():
        m.add_observer(on_routing=lambda layer, ids: seen[layer].append(ids.detach().cpu().numpy()))
    for p in PROMPTS:
        if p:
            model.generate(model.tokenizer.encode(p), 3)
    for i, l in enumerate(spec.moe_layers):
        ids = np.concatenate(seen[l])
        np.testing.assert_array_equal(tr.seq[:, i, :], ids)
        np.testing.assert_array_equal(tr.counts[i], np.bincount(ids.ravel(), minlength=tr.num_experts))


def test_profile_jsonl_errors_name_the_line(ckpt, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + "{not json\n")
    assert main(["profile", str(ckpt), "--prompts", str(bad), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err
