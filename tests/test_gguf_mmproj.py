"""Kimi K2.5's vision tower from llama.cpp's mmproj GGUF (hybrid/models/moonvit_gguf.py), as GGUF
users hold it beside the text model, and hybrid's own writer of that file
(hybrid/convert/gguf_mmproj_export.py, run by `hybrid convert`).

A tiny release-named Kimi K2.5 checkpoint with a vision tower (tests/checkpoints_vision.py) is
written as a text GGUF plus an mmproj GGUF; loading the text GGUF finds the mmproj beside it, and:
the tower's output equals the checkpoint's own tower exactly in f32 (the same values, llama.cpp's
query/key row order undone) and within f16 rounding from an f16 file; fp32 logits of prompts with
images equal transformers' Kimi_K25 within the text model's tolerance. The file's layout is checked
against llama.cpp's converter rule written out independently here (its per-head permute of the
query/key rows, its names and keys); on this machine the writer's output was also compared with
the file llama.cpp's own convert_hf_to_gguf.py --mmproj writes for the same checkpoint: the same
tensors, types, shapes, values and clip metadata. Then how the file is found, and bad files.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import checkpoints_vision as cv
import gguf_files
from checkpoints import reference_logits

TOL = 1e-3  # fp32 logits against transformers, as tests/test_vision_vs_transformers.py
# (width, height) the mmproj's resize rule treats as the checkpoint's: the file does not carry the
# release's patch_limit_on_one_side (16 in the tiny checkpoint, K2.5's 512 is assumed), so sizes
# whose longer side fits in 16 patches after the patch budget
SIZES = [(53, 37), (40, 40), (90, 75), (3, 5)]
PROMPTS = [[5, 10, 11, 12, 13], [2, 3, 4, 5, 20, 21, 22], [2, 5, 40, 41, 5, 42, 43]]




def _checkpoint(tmp, naming="release", seed=0):
    path, ref = cv.build(tmp, seed, naming, shards=1, vocab_size=gguf_files.VOCAB)
    gguf_files.add_bpe_tokenizer(path, specials=gguf_files.MEDIA_SPECIALS)
    return path, ref


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(folder, text GGUF, f32 mmproj beside it, f16 mmproj elsewhere, checkpoint, reference model)."""
    from hybrid.convert.gguf_export import convert_to_gguf
    from hybrid.convert.gguf_mmproj_export import write_mmproj

    tmp = tmp_path_factory.mktemp("mmproj")
    path, ref = _checkpoint(tmp)
    folder = tmp / "gguf"
    folder.mkdir()
    text = convert_to_gguf(path, folder / "tiny-k25-f32.gguf", "f32", progress=False)
    mm32 = write_mmproj(path, folder / "mmproj-tiny-k25-f32.gguf", "f32", progress=False)
    mm16 = write_mmproj(path, tmp / "mmproj-tiny-k25-f16.gguf", "f16", progress=False)
    return folder, text, mm32, mm16, path, ref


@pytest.fixture(scope="module")
def loaded(files):
    import hybrid

    _, text, _, _, path, _ = files
    kw = dict(dtype=torch.float32, progress=False, experts_backend="torch", device_ops="torch")
    return hybrid.load(text, **kw), hybrid.load(path, **kw)


def _load(path, **kw):
    import hybrid

    return hybrid.load(path, **dict(dict(dtype=torch.float32, progress=False, experts_backend="torch",
                                         device_ops="torch"), **kw))


# ---- the file's layout: llama.cpp's converter rule, written out here -------------------------
def test_layout_is_llamacpp_converters(files):
    """Names, shapes in ggml order, metadata keys, and attn_qkv's query/key rows reordered per head
    as llama.cpp's KimiK25Model.permute does: w.reshape(nh, hd/4, 2, 2, in).permute(0, 2, 1, 3, 4)."""
    import gguf
    from safetensors.torch import load_file

    _, _, mm32, _, path, _ = files
    r = gguf.GGUFReader(str(mm32))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    D, nh, I, L = cv.VISION["hidden_size"], cv.VISION["num_attention_heads"], cv.VISION["intermediate_size"], cv.VISION["num_hidden_layers"]
    assert f["general.architecture"] == "clip" and f["general.type"] == "mmproj"
    assert f["clip.projector_type"] == "kimik25" and f["clip.has_vision_encoder"] is True
    assert (f["clip.vision.embedding_length"], f["clip.vision.block_count"], f["clip.vision.attention.head_count"],
            f["clip.vision.feed_forward_length"], f["clip.vision.patch_size"]) == (D, L, nh, I, cv.VISION["patch_size"])
    assert f["clip.vision.projection_dim"] == 64 and f["clip.vision.projector.scale_factor"] == 2
    assert (f["vision.pos_emb_height"], f["vision.pos_emb_width"]) == (8, 8)
    assert f["clip.vision.image_max_pixels"] == cv.MEDIA["in_patch_limit"] * 16
    assert np.allclose(f["clip.vision.image_mean"], cv.MEDIA["image_mean"])
    t = {x.name: x for x in r.tensors}
    want = {"v.patch_embd.weight": [4, 4, 3, D], "v.position_embd.weight": [D, 8, 8], "mm.1.weight": [4 * D, 4 * D],
            "mm.2.weight": [4 * D, 64], "mm.input_norm.weight": [D], "v.post_ln.bias": [D]}
    for i in range(L):
        want.update({f"v.blk.{i}.attn_qkv.weight": [D, 3 * D], f"v.blk.{i}.attn_qkv.bias": [3 * D],
                     f"v.blk.{i}.attn_out.weight": [D, D], f"v.blk.{i}.ffn_up.weight": [D, I],
                     f"v.blk.{i}.ffn_down.weight": [I, D], f"v.blk.{i}.ln1.weight": [D], f"v.blk.{i}.ln2.bias": [D]})
    for name, shape in want.items():
        assert [int(n) for n in t[name].shape] == shape, name
    release = load_file(str(path / "model.safetensors"))
    hd = D // nh
    for i in range(L):
        w = release[f"vision_tower.encoder.blocks.{i}.wqkv.weight"]
        q, k, v = w[:D], w[D:2 * D], w[2 * D:]
        perm = [x.reshape(nh, hd // 4, 2, 2, D).permute(0, 2, 1, 3, 4).reshape(D, D) for x in (q, k)]
        stored = torch.from_numpy(np.array(t[f"v.blk.{i}.attn_qkv.weight"].data)).reshape(3 * D, D)
        assert torch.equal(stored, torch.cat([*perm, v]))


def test_transformers_naming_writes_the_same_file(files, tmp_path):
    """A transformers-named checkpoint of the same model (q/k/v apart, halves rotary form) gives the
    same tensors."""
    import gguf
    from hybrid.convert.gguf_mmproj_export import write_mmproj

    path, _ = _checkpoint(tmp_path, "transformers", seed=0)
    ours = write_mmproj(path, tmp_path / "mmproj-t.gguf", "f32", progress=False)
    a = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(files[2])).tensors}
    b = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(ours)).tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.allclose(a[name], b[name], atol=1e-6), name


# ---- values ------------------------------------------------------------------------------------
def test_found_beside_the_text_gguf(loaded, files):
    g, _ = loaded
    assert g.vision is not None and g.vision.source == files[2]
    assert g.vision.placeholder_id == cv.PLACEHOLDER


def test_tower_equals_the_checkpoints(loaded):
    g, d = loaded
    assert g.vision.config == d.vision.config
    for k, (w, h) in enumerate(SIZES):
        pic = cv.picture(w, h, k)
        a, b = g.vision.prepare([pic])[0], d.vision.prepare([pic])[0]
        assert a.grid == b.grid and torch.equal(a.pixels, b.pixels)
        assert torch.equal(g.vision.encode(a), d.vision.encode(b))


def test_f16_file_within_f16_rounding(files, loaded):
    _, d = loaded
    m = _load(files[1], mmproj=files[3])
    assert m.vision.source == files[3]
    pic = cv.picture(53, 37, 7)
    want = d.vision.encode(d.vision.prepare([pic])[0])
    got = m.vision.encode(m.vision.prepare([pic])[0])
    rel = float((got - want).abs().max() / want.abs().max())
    print(f"f16 mmproj: max |diff| / max |value| = {rel:.2e}")
    assert 0 < rel < 5e-3


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_logits_with_images_match_transformers(loaded, files, k):
    g, _ = loaded
    ref = files[5]
    ids = PROMPTS[k]
    pictures = [cv.picture(*SIZES[(k + j) % len(SIZES)], 100 + 10 * k + j) for j in range(ids.count(cv.PLACEHOLDER))]
    ims = g.vision.prepare(pictures)
    expanded, _ = g.vision.expand(ids, ims)
    pv, grid = cv.reference_inputs(ims)
    want, ties = reference_logits(ref, torch.tensor(expanded), pixel_values=pv, image_grid_thw=grid)
    got = g.logits(ids, images=pictures)
    err = (got - want).abs().max(-1)[0]
    ok = ~ties
    print(f"prompt {k}: {len(expanded)} positions, max |logit diff| {err[ok].max():.2e}")
    assert ok.sum() >= len(expanded) // 2 and err[ok].max() < TOL


# ---- finding the file ----------------------------------------------------------------------------
def test_none_several_or_refused(files, tmp_path):
    folder, text, mm32, mm16, _, _ = files
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(text, alone / text.name)
    assert _load(alone / text.name).vision is None  # no mmproj beside it: text only
    assert _load(alone / text.name, mmproj=mm32).vision.source == mm32  # named anywhere
    assert _load(text, mmproj=False).vision is None
    assert _load(text, images_enabled=False).vision is None
    shutil.copy(mm16, alone / "mmproj-b.gguf")
    shutil.copy(mm32, alone / "mmproj-a.gguf")
    with pytest.warns(UserWarning, match="2 mmproj files .*mmproj-a.gguf, mmproj-b.gguf.*--mmproj"):
        assert _load(alone / text.name).vision is None
    assert _load(alone / text.name, mmproj=alone / "mmproj-b.gguf").vision.source == alone / "mmproj-b.gguf"


def test_checkpoint_directory_refuses_mmproj(files):
    with pytest.raises(ValueError, match="carries its own vision tower"):
        _load(files[4], mmproj=files[2])
    with pytest.raises(FileNotFoundError, match="mmproj file .* does not exist"):
        _load(files[1], mmproj=files[0] / "nope.gguf")


def _bad(files, tmp_path, name, **kw):
    from gguf import GGUFValueType as T

    out = gguf_files.rewrite(files[2], tmp_path / name, **kw)
    return out, T


@pytest.mark.parametrize("case, match", [
    ("projector", r"clip.projector_type is 'llava'.*kimik25"),
    ("width", r"clip.vision.projection_dim=32, but the text model is 64 wide"),
    ("embedding", r"clip.vision.embedding_length=48, but v.patch_embd.bias says 32"),
    ("blocks", r"clip.vision.block_count=3, but v.blk.0 .. v.blk.1 says 2"),
    ("missing", r"tensor v.blk.1.ffn_down.weight .* is missing"),
    ("text", r"general.architecture is 'deepseek2', not 'clip'"),
])
def test_bad_files_are_clear_errors(files, tmp_path, case, match):
    from gguf import GGUFValueType as T
    from hybrid.loaders.gguf_file import GGUFError

    if case == "text":
        bad = files[1]
    else:
        kw = {"projector": dict(set_fields={"clip.projector_type": ("llava", T.STRING)}),
              "width": dict(set_fields={"clip.vision.projection_dim": (32, T.UINT32)}),
              "embedding": dict(set_fields={"clip.vision.embedding_length": (48, T.UINT32)}),
              "blocks": dict(set_fields={"clip.vision.block_count": (3, T.UINT32)}),
              "missing": dict(tensors=lambda items: [x for x in items if x[0] != "v.blk.1.ffn_down.weight"]),
              }[case]
        bad = gguf_files.rewrite(files[2], tmp_path / f"mmproj-{case}.gguf", **kw)
    with pytest.raises(GGUFError, match=match) as e:
        _load(files[1], mmproj=bad)
    assert str(bad) in str(e.value)
    if case != "text":  # found beside the model instead of named: skipped with the reason
        alone = tmp_path / "beside"
        alone.mkdir()
        shutil.copy(files[1], alone / files[1].name)
        shutil.copy(bad, alone / bad.name)
        with pytest.warns(UserWarning, match=f"not using {bad.name}.*{match}"):
            assert _load(alone / files[1].name).vision is None


def test_text_model_without_the_placeholder_token(files, tmp_path):
    """An mmproj named for a text model whose vocabulary has no <|media_pad|>."""
    from hybrid.loaders.gguf_file import GGUFError

    text, _, _ = gguf_files.deepseek2_gguf(tmp_path, hidden_size=64)
    with pytest.raises(GGUFError, match=r"no <\|media_pad\|> token"):
        _load(text, mmproj=files[2])


# ---- hybrid convert ----------------------------------------------------------------------------
def test_convert_writes_the_mmproj_beside(files, tmp_path, capsys):
    from hybrid.cli import main

    path = files[4]
    assert main(["convert", str(path), "--to", "gguf", "--out", str(tmp_path / "k.gguf"), "--type", "f16"]) == 0
    assert (tmp_path / "mmproj-k.gguf").is_file()
    assert "vision tower, llama.cpp's mmproj format" in capsys.readouterr().err
    m = _load(tmp_path / "k.gguf")
    assert m.vision is not None and m.vision.source == tmp_path / "mmproj-k.gguf"
    assert main(["convert", str(path), "--to", "gguf", "--out", str(tmp_path / "t.gguf"), "--no-mmproj"]) == 0
    assert not (tmp_path / "mmproj-t.gguf").exists()


# ---- what the user is told ---------------------------------------------------------------------
def test_load_line_and_doctor_name_the_file(files, capsys):
    from hybrid.chat.loading import load_model_or_explain
    from hybrid.runtime.gguf_experts import describe_gguf

    folder, text, mm32, _, _, _ = files
    m = load_model_or_explain(str(text), "hybrid chat", progress=False, experts_backend="torch")
    assert m is not None and m.vision is not None
    assert f"hybrid chat: images: the vision tower of {mm32}" in capsys.readouterr().err
    d = describe_gguf(text)["mmproj"]
    assert d["path"] == str(mm32) and d["params"] > 0 and d["file_bytes"] == mm32.stat().st_size


def test_plan_counts_the_mmproj_tower(files, loaded):
    """The planner's spec of the GGUF counts the tower hybrid.load takes from the mmproj beside it
    (the checkpoint directory's own count)."""
    from hybrid.models.moonvit import MoonViT
    from hybrid.models.spec import load_model_spec
    from hybrid.runtime.gguf_experts import model_spec_for

    _, text, _, _, path, _ = files
    want = load_model_spec(str(path)).vision_params
    assert want > 0 and model_spec_for(str(text)).vision_params == want
    assert MoonViT.parameter_count(loaded[0].vision.config) == want


# ---- served ------------------------------------------------------------------------------------
def test_served_image_request_answers_as_the_checkpoint(loaded):
    """`hybrid serve` over the GGUF + mmproj: an OpenAI image request gives what the checkpoint
    directory's own model answers for the same prompt and picture (fp32 both, the same weights)."""
    import base64
    import io

    import openai

    from hybrid.engine.engine import Engine
    from hybrid.engine.sampling import SamplingParams
    from test_serve_support import LiveServer

    g, d = loaded
    buf = io.BytesIO()
    cv.picture(53, 37, 3).save(buf, format="PNG")
    png = buf.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    s = LiveServer({"max_body_bytes": 4 * 1024 * 1024}, loaded=g, context=256)
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            r = c.chat.completions.create(model="tiny", temperature=0, max_tokens=8, extra_body={"thinking": False},
                                          messages=[
                {"role": "user", "content": [{"type": "text", "text": "the fox "},
                                             {"type": "image_url", "image_url": {"url": uri}}]}])
        got = r.choices[0].message.content
    finally:
        s.stop()
    tok = d.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "the fox "},
                                                                {"type": "image"}]}], add_generation_prompt=True,
                                   thinking=False)
    ids, spans = d.vision.expand(tok.encode_chat(text, []), d.vision.prepare([png]))
    e = Engine(d, tokenizer=tok, max_seqs=2, max_context=256)
    try:
        want = e.submit(ids, SamplingParams(temperature=0.0), max_tokens=8, images=spans).result().text
    finally:
        e.close()
    for special in tok.special_tokens:
        want = want.replace(special, "")
    assert got == want and got.strip(), (got, want)
