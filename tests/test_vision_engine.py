"""Image requests on the continuous-batching engine (tiny K2.5 with a vision tower, fp32): greedy
output follows the logits, an image split over prefill chunks and an image request batched with
text requests give the same answers as alone, and prefix reuse keys an image by its pixels (the
next turn about the same image reuses its KV; another image with the same placeholder ids does not).
"""

import numpy as np
import pytest
from PIL import Image

from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams

from test_serve_support import MEDIA_PAD, vision_model

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return vision_model()


def _request(model, words, pictures):
    ids = [ord(c) for c in words.replace("@", chr(0))]
    ids = [MEDIA_PAD if t == 0 else t for t in ids]
    return model.vision.expand(ids, model.vision.prepare(pictures))


def _alone(model, ids, spans, n=5, **kw):
    with Engine(model, max_seqs=1, max_context=512, prefix_reuse=False, **kw) as e:
        return e.submit(ids, GREEDY, max_tokens=n, images=spans).result().token_ids


def test_greedy_with_an_image_follows_the_logits(model):
    pic = _image(40, 28, 0)
    ids, spans = _request(model, "look: @ what?", [pic])
    out = _alone(model, ids, spans)
    seq = [ord(c) for c in "look: "] + [MEDIA_PAD] + [ord(c) for c in " what?"]
    for tok in out:
        assert model.logits(seq, images=[pic])[-1].argmax().item() == tok
        seq.append(tok)


def test_image_split_over_prefill_chunks(model):
    ids, spans = _request(model, "a@b@c", [_image(40, 28, 1), _image(30, 30, 2)])
    whole = _alone(model, ids, spans)
    assert _alone(model, ids, spans, prefill_chunk=7) == whole  # chunks end inside both images


def test_image_request_batches_with_text_requests(model):
    ids, spans = _request(model, "see @ here", [_image(53, 37, 3)])
    text_ids = [ord(c) for c in "plain text prompt"]
    want_img, want_txt = _alone(model, ids, spans), _alone(model, text_ids, [])
    with Engine(model, max_seqs=3, max_context=512) as e:
        handles = [e.submit(ids, GREEDY, max_tokens=5, images=spans), e.submit(text_ids, GREEDY, max_tokens=5),
                   e.submit(text_ids[:5], GREEDY, max_tokens=5)]
        got = [h.result().token_ids for h in handles]
    assert got[0] == want_img and got[1] == want_txt


def test_prefix_reuse_keys_images_by_pixels(model):
    a, b = _image(40, 28, 4), _image(40, 28, 5)
    ids, spans = _request(model, "q @ tell", [a])
    with Engine(model, max_seqs=1, max_context=512) as e:
        first = e.submit(ids, GREEDY, max_tokens=4, images=spans).result()
        # next turn about the same image: everything computed so far is reused, nothing re-encoded
        turn2 = ids + first.token_ids + [ord(c) for c in " more"]
        calls = []
        real = model.encode_image
        model.encode_image = lambda im: calls.append(im) or real(im)
        try:
            second = e.submit(turn2, GREEDY, max_tokens=4, images=spans).result()
        finally:
            del model.encode_image
        assert calls == []
        assert second.usage.cached_tokens == len(ids) + len(first.token_ids) - 1
        assert second.token_ids == _alone(model, turn2, spans, n=4)
        # the same ids with another picture: reuse stops where the image starts
        ids_b, spans_b = _request(model, "q @ tell", [b])
        assert ids_b == ids
        third = e.submit(ids_b, GREEDY, max_tokens=4, images=spans_b).result()
        assert third.usage.cached_tokens == spans_b[0].start
        assert third.token_ids == _alone(model, ids_b, spans_b, n=4)


def test_image_spans_checked(model):
    ids, spans = _request(model, "x @", [_image(20, 20, 6)])
    with Engine(model, max_seqs=1, max_context=512) as e:
        with pytest.raises(ValueError, match="leaves the prompt"):
            e.submit(ids[:-2], GREEDY, max_tokens=2, images=spans)


def test_a_failing_image_fails_its_request_only(model):
    ids, spans = _request(model, "x @ y", [_image(20, 20, 7)])
    with Engine(model, max_seqs=2, max_context=512) as e:
        real = model.encode_image

        def boom(im):
            raise RuntimeError("tower broke")
        model.encode_image = boom
        try:
            bad = e.submit(ids, GREEDY, max_tokens=2, images=spans)
            with pytest.raises(Exception, match="tower broke"):
                bad.result()
        finally:
            model.encode_image = real
            del model.encode_image
        assert len(e.submit([65, 66], GREEDY, max_tokens=2).result().token_ids) == 2
