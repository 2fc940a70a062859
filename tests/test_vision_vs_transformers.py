"""Image input against transformers' own Kimi_K25 model, on tiny random checkpoints (several
seeds, both tensor namings): the placeholder expansion equals Kimi_K25Processor's, the tower +
projector output equals get_image_features on the same pixel_values, and fp32 logits of prompts
with images (at the start, middle and end; two in one prompt; padded and resized images) equal
transformers' within 1e-3 at positions whose routing is not a near-tie. The preprocessing rule
is checked against the documented algorithm (transformers' image processor needs torchvision,
which is not installed beside torch here)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints_vision as cv
from checkpoints import reference_logits

TOL = 1e-3




# (width, height): padded only, resized by the patch budget (160), wide and tall, a tiny one
SIZES = [(53, 37), (40, 40), (90, 75), (120, 20), (18, 66), (3, 5)]


@pytest.fixture(scope="module", params=[("release", 0), ("transformers", 1), ("release", 2)])
def loaded(request, tmp_path_factory):
    import hybrid

    naming, seed = request.param
    path, ref = cv.build(tmp_path_factory.mktemp("vision"), seed, naming)
    model = hybrid.load(path, dtype=torch.float32, progress=False, experts_backend="torch", device_ops="torch")
    return naming, seed, path, ref, model


def test_release_checkpoint_is_what_transformers_loads(loaded, tmp_path):
    """The release-named writer is right: transformers' loader (its release conversion: wqkv
    unfused and rotary-permuted, blocks -> layers, ...) reads it back to the same weights."""
    from transformers import Kimi_K25ForConditionalGeneration

    naming, _, path, ref, _ = loaded
    if naming != "release":
        pytest.skip("release naming only")
    back = Kimi_K25ForConditionalGeneration.from_pretrained(path, config=ref.config).eval()
    want, got = ref.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_tower_matches_get_image_features(loaded):
    _, seed, _, ref, model = loaded
    for i, (w, h) in enumerate(SIZES):
        [im] = model.vision.prepare([cv.picture(w, h, seed * 10 + i)])
        pv, grid = cv.reference_inputs([im])
        with torch.no_grad():
            want = ref.model.get_image_features(pv, grid).pooler_output[0]
        got = model.vision.encode(im)
        err = (got - want).abs().max().item()
        print(f"{w}x{h} grid {im.grid}: max |tower - transformers| {err:.2e} (scale {want.abs().max():.2f})")
        assert got.shape == want.shape == (im.tokens, model.config.hidden_size)
        assert err < 1e-4


def test_two_images_in_one_batch_match_one_at_a_time(loaded):
    """Images of different grids in one tower call attend only within themselves."""
    _, seed, _, ref, model = loaded
    ims = model.vision.prepare([cv.picture(53, 37, seed), cv.picture(90, 75, seed + 1)])
    pv, grid = cv.reference_inputs(ims)
    with torch.no_grad():
        want = ref.model.get_image_features(pv, grid).pooler_output
    got = model.vision.tower.encode(torch.cat([im.pixels for im in ims]), [im.grid for im in ims])
    for g, w, one in zip(got, want, ims):
        assert (g - w).abs().max() < 1e-4
        assert (g - model.vision.encode(one)).abs().max() < 1e-5


def _processor_expansion(ids, grids, placeholder):
    """Kimi_K25Processor's own replace_image_token, applied to each placeholder in turn."""
    from transformers.models.kimi_k25.processing_kimi_k25 import Kimi_K25Processor

    proc = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<P>")
    inputs = {"image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}
    out, k = [], 0
    for t in ids:
        if t == placeholder:
            text = Kimi_K25Processor.replace_image_token(proc, inputs, k)  # "<P>" * tokens
            out += [placeholder] * text.count("<P>")
            k += 1
        else:
            out.append(t)
    return out


# prompts: image at the start, in the middle, at the end; two images in one prompt
PROMPTS = [[5, 10, 11, 12, 13], [2, 3, 4, 5, 20, 21, 22], [2, 30, 31, 32, 5], [2, 5, 40, 41, 5, 42, 43]]


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_logits_with_images_match_transformers(loaded, k):
    _, seed, _, ref, model = loaded
    ids = PROMPTS[k]
    n = ids.count(cv.PLACEHOLDER)
    pictures = [cv.picture(*SIZES[(k + j + seed) % len(SIZES)], seed * 100 + k * 10 + j) for j in range(n)]
    ims = model.vision.prepare(pictures)
    expanded, spans = model.vision.expand(ids, ims)
    assert expanded == _processor_expansion(ids, [im.grid for im in ims], cv.PLACEHOLDER)
    assert [expanded[s.start:s.end] for s in spans] == [[cv.PLACEHOLDER] * im.tokens for im in ims]
    pv, grid = cv.reference_inputs(ims)
    want, ties = reference_logits(ref, torch.tensor(expanded), pixel_values=pv, image_grid_thw=grid)
    got = model.logits(ids, images=pictures)
    assert got.shape == want.shape
    err = (got - want).abs().max(-1)[0]
    ok = ~ties
    print(f"prompt {k}: {len(expanded)} positions ({sum(im.tokens for im in ims)} image), {int(ties.sum())} "
          f"near ties; max |logit diff| elsewhere {err[ok].max():.2e} (logit scale {want.abs().max():.2f})")
    assert ok.sum() >= len(expanded) // 2
    assert err[ok].max() < TOL


def test_images_given_as_path_and_bytes(loaded, tmp_path):
    import io

    _, seed, _, _, model = loaded
    pic = cv.picture(40, 28, seed)
    pic.save(tmp_path / "a.png")
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    ids = [2, 5, 9]
    a = model.logits(ids, images=[pic])
    assert torch.equal(a, model.logits(ids, images=[tmp_path / "a.png"]))
    assert torch.equal(a, model.logits(ids, images=[buf.getvalue()]))


def test_generate_with_an_image_follows_the_logits(loaded):
    _, seed, _, _, model = loaded
    pic = cv.picture(53, 37, seed)
    ids = [2, 5, 9, 10]
    out = model.generate(ids, 3, images=[pic], stop_at_eos=False)
    seq = list(ids)
    for tok in out:  # greedy: each token is the argmax after the previous ones
        assert model.logits(seq, images=[pic])[-1].argmax().item() == tok
        seq.append(tok)


def test_bad_image_inputs_are_clear_errors(loaded, tmp_path):
    from hybrid.models.moonvit_images import ImageError

    _, _, _, _, model = loaded
    with pytest.raises(ImageError, match=r"images\[0\]: cannot decode"):
        model.logits([2, 5], images=[b"not an image"])
    with pytest.raises(ImageError, match=r"images\[0\]: cannot read"):
        model.logits([2, 5], images=[tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="2 image placeholder"):
        model.logits([5, 5], images=[cv.picture(8, 8, 0)])
    with pytest.raises(ImageError, match="expected a PIL image"):
        model.logits([5], images=[12])


def test_images_disabled_and_text_only(loaded):
    import hybrid

    _, _, path, _, model = loaded
    text = hybrid.load(path, dtype=torch.float32, progress=False, experts_backend="torch", device_ops="torch",
                       images_enabled=False)
    assert text.vision is None
    assert torch.equal(text.logits([2, 3, 4]), model.logits([2, 3, 4]))
    with pytest.raises(ValueError, match="images_enabled=False"):
        text.logits([2, 5], images=[cv.picture(8, 8, 0)])


# ---- the preprocessing rule -------------------------------------------------------------------
def test_resize_rule_is_the_documented_one():
    """K2.5's media_proc_cfg (in_patch_limit 16384, 512 patches a side, patch 14, merge 2): never
    upscaled, the patch budget or a side limit scales both sides, then padded to 28."""
    from hybrid.models.moonvit_images import ImageRule

    rule = ImageRule.from_dict({"media_proc_cfg": {"in_patch_limit": 16384, "patch_limit_on_one_side": 512,
                                                   "patch_size": 14, "merge_kernel_size": 2}})
    # scale = 128 / 292 (4096 // 14 = 292): int(4096 * 0.43836) = 1795 -> 1820 = 65 * 28
    cases = {(1024, 1024): ((1024, 1024), (1036, 1036), 37 * 37),
             (28, 28): ((28, 28), (28, 28), 1),
             (1, 1): ((1, 1), (28, 28), 1),
             (4096, 4096): ((1795, 1795), (1820, 1820), 65 * 65),
             (14336, 140): ((7168, 70), (7168, 84), 256 * 3),
             (100, 50): ((100, 50), (112, 56), 4 * 2)}
    for (w, h), (resized, padded, tokens) in cases.items():
        assert rule.sizes(w, h) == (resized, padded), (w, h)
        assert rule.tokens_for(w, h) == tokens, (w, h)


def test_pixels_are_resized_padded_normalised_patches(tmp_path):
    from hybrid.models.moonvit_images import ImageRule, prepare

    rule = ImageRule.from_dict({"media_proc_cfg": cv.MEDIA})
    pic = cv.picture(90, 75, 3)  # 22*18 = 396 patches > 160: resized
    (nw, nh), (pw, ph) = rule.sizes(90, 75)
    assert (nw, nh) != (90, 75)
    im = prepare(pic, rule)
    resized = np.asarray(pic.resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(cv.MEDIA["image_mean"]), np.array(cv.MEDIA["image_std"])
    full = np.broadcast_to((0.0 - mean) / std, (ph, pw, 3)).astype(np.float32)  # padding: black pixels
    full[:nh, :nw] = (resized - mean) / std
    P = 4
    h, w = im.grid
    assert (h, w) == (ph // P, pw // P) and im.tokens == h * w // 4
    for r, c in [(0, 0), (1, 3), (h - 1, w - 1), (h // 2, w - 2)]:
        want = full[r * P:(r + 1) * P, c * P:(c + 1) * P].transpose(2, 0, 1)
        np.testing.assert_allclose(im.pixels[r * w + c].numpy(), want, atol=1e-6)


def test_equal_pixels_share_a_digest():
    from hybrid.models.moonvit_images import ImageRule, prepare

    rule = ImageRule.from_dict({"media_proc_cfg": cv.MEDIA})
    a, b = prepare(cv.picture(40, 40, 1), rule), prepare(cv.picture(40, 40, 1), rule)
    c = prepare(cv.picture(40, 40, 2), rule)
    assert a.digest == b.digest != c.digest


def test_vision_config_keys_checked(tmp_path):
    from hybrid.config import ConfigError
    from hybrid.models.moonvit_config import VisionConfig

    base = {"vision_config": {"vt_hidden_size": 32, "vt_num_attention_heads": 2}, "media_placeholder_token_id": 5}
    vc = VisionConfig.from_dict(base, 64)
    assert (vc.hidden_size, vc.num_heads, vc.num_layers, vc.placeholder_id) == (32, 2, 27, 5)
    hf = VisionConfig.from_dict({"vision_config": {"hidden_size": 32, "num_attention_heads": 2},
                                 "image_token_id": 5, "projection_hidden_size": 32}, 64)
    assert hf == vc
    with pytest.raises(ConfigError, match="vt_hidden_size=32 and hidden_size=48 disagree"):
        VisionConfig.from_dict({"vision_config": {"vt_hidden_size": 32, "hidden_size": 48}}, 64)
    with pytest.raises(ConfigError, match="num_layers must be a positive integer"):
        VisionConfig.from_dict({"vision_config": {"vt_num_hidden_layers": 0}}, 64)
    with pytest.raises(ConfigError, match="merge_kernel_size"):
        VisionConfig.from_dict({"vision_config": {"merge_kernel_size": [2]}}, 64)
    assert VisionConfig.from_dict({}, 64) is None


def test_bf16_tower_within_what_bf16_costs_transformers(loaded):
    """bf16 tower + projector against the fp32 reference: mean error at most twice what
    transformers' own model costs in bf16 on the same pixels."""
    import copy

    import hybrid

    _, seed, path, ref, _ = loaded
    m16 = hybrid.load(path, dtype=torch.bfloat16, progress=False, experts_backend="torch", device_ops="torch")
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    [im] = m16.vision.prepare([cv.picture(90, 75, seed)])
    pv, grid = cv.reference_inputs([im])
    with torch.no_grad():
        want = ref.model.get_image_features(pv, grid).pooler_output[0]
        theirs = ref16.model.get_image_features(pv.to(torch.bfloat16), grid).pooler_output[0].float()
    ours = m16.vision.encode(im).float()
    e_ours, e_theirs = (ours - want).abs().mean().item(), (theirs - want).abs().mean().item()
    print(f"bf16 tower mean |error|: ours {e_ours:.4f}, transformers-bf16 {e_theirs:.4f}")
    assert e_ours <= 2 * e_theirs + 1e-3


def test_parameter_count_is_the_models(loaded):
    """The memory plan's count of the tower + projector equals transformers' module sizes."""
    from hybrid.models.moonvit import MoonViT

    _, _, _, ref, model = loaded
    want = sum(p.numel() for m in (ref.model.vision_tower, ref.model.mm_projector) for p in m.parameters())
    assert MoonViT.parameter_count(model.vision.config) == want
    assert model.vision.nbytes() == want * 4  # fp32
