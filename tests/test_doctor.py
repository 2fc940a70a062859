"""`hybrid doctor`: JSON has its keys; a checkpoint dir and the built-in model both work.
Measurements are skipped (--no-measure): tests never time anything."""

import json

from hybrid.cli import main as cli_main

TINY_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "n_routed_experts": 64, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16, "v_head_dim": 16,
}


def _run(capsys, argv):
    assert cli_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_json_keys(capsys):
    r = _run(capsys, ["doctor", "--json", "--no-measure"])
    m = r["machine"]
    for key in ("cpu_model", "physical_cores", "logical_cores", "numa_nodes", "ram_total_bytes",
                "ram_available_bytes", "thp", "isa_supported", "isa_chosen", "gpus", "disk"):
        assert key in m, key
    assert "scalar" in m["isa_supported"]
    assert m["ram_total_bytes"] > 0
    e = r["expect"]
    assert e["model"]["id"] == "kimi-k2.5"
    assert e["ram"]["needed_bytes"] > 500 * 2**30          # K2.5's experts alone are ~530 GiB
    for fmt in ("bf16", "int8"):
        d = e["device_weights"][fmt]
        assert d["no_cache"]["decode_tok_s"] > 0 and d["no_cache"]["prefill_tok_s"] > 0
    assert isinstance(r["advice"], list)


def test_doctor_on_checkpoint_dir(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    r = _run(capsys, ["doctor", str(tmp_path), "--json", "--no-measure"])
    e = r["expect"]
    assert e["model"]["moe_layers"] == 2 and e["model"]["experts"] == 64
    assert e["ram"]["fits"] is True
    assert r["machine"]["disk"]["path"] == str(tmp_path)


def test_doctor_bad_model_is_reported_not_crashed(capsys):
    r = _run(capsys, ["doctor", "no-such-model", "--json", "--no-measure"])
    assert "no-such-model" in r["expect"]["error"]


def test_doctor_screen_renders(capsys):
    assert cli_main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "RAM" in out and "kimi-k2.5" in out and "decode" in out
    assert "images: a vision tower of 471M weights" in " ".join(out.split())  # K2.5's MoonViT, counted


def test_doctor_counts_the_vision_tower_without_a_gpu(capsys):
    """No GPU here: the device side (and so the tower, bf16) is in the RAM the doctor asks for."""
    r = _run(capsys, ["doctor", "--json", "--no-measure"])
    e = r["expect"]
    assert e["model"]["vision_params"] > 4.5e8
    if not r["machine"]["gpus"]:
        assert e["ram"]["parts"]["vision_tower"] == 2 * e["model"]["vision_params"]


def test_doctor_uses_a_calibrated_machine_file(capsys, tmp_path):
    import yaml

    from hybrid.planner.cost import reference_workstation

    m = reference_workstation("48GiB").to_dict()
    m.update(name="calibrated box", layer_overhead_us=5000.0)   # slow host: speed must drop
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    base = _run(capsys, ["doctor", "--json", "--no-measure", "--machine", str(path)])
    assert base["machine_model"]["name"] == "calibrated box"
    m["layer_overhead_us"] = 0.0
    path.write_text(yaml.safe_dump(m))
    fast = _run(capsys, ["doctor", "--json", "--no-measure", "--machine", str(path)])
    slow_tps = base["expect"]["device_weights"]["bf16"]["no_cache"]["decode_tok_s"]
    fast_tps = fast["expect"]["device_weights"]["bf16"]["no_cache"]["decode_tok_s"]
    assert slow_tps < fast_tps
    path.write_text("name: x\n")
    bad = _run(capsys, ["doctor", "--json", "--no-measure", "--machine", str(path)])
    assert "missing field" in bad["expect"]["error"]
