"""Images through a live `hybrid serve` (tiny K2.5 with a vision tower): the openai and anthropic
SDKs send a picture as a data: URI / base64 block and the answer equals what the engine gives for
the same prompt and image; a local file only under --allow-local-images; refusals are 4xx with a
reason (bad base64, an unsupported format, a remote URL with fetching off, too many images, too
many pixels, a file outside the allowed directory, images to a text-only model) and the server
keeps serving.
"""

import base64
import io

import anthropic
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from test_serve_support import LiveServer, model as text_model, vision_model

GREEDY = dict(temperature=0, max_tokens=8)


def _png(w=40, h=28, seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _data_uri(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "cat.png").write_bytes(_png(seed=1))
    return d


@pytest.fixture(scope="module")
def server(local_dir):
    s = LiveServer({"max_images": 2, "max_image_pixels": 200 * 200, "allow_local_images": str(local_dir),
                    "max_body_bytes": 4 * 1024 * 1024}, loaded=vision_model())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def claude(server):
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60) as c:
        yield c


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _img_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, extra_body={"thinking": False},
                                          **GREEDY, **kw)


def _engine_answer(server, messages, pictures):
    """The same request straight on the engine: the template, the expansion, greedy decoding."""
    from hybrid.engine.sampling import SamplingParams

    m = vision_model()
    tok = m.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=False)
    ids, spans = m.vision.expand(tok.encode_chat(text, []), m.vision.prepare(pictures))
    out = server.engine.submit(ids, SamplingParams(temperature=0.0), max_tokens=8, images=spans).result()
    text = out.text
    for special in tok.special_tokens:  # the server's output parser shows no special-token text
        text = text.replace(special, "")
    return text, len(ids)


def test_openai_data_uri_image(server, oai):
    png = _png(seed=2)
    r = _chat(oai, _user({"type": "text", "text": "What is in this picture? "}, _img_part(_data_uri(png))))
    text, n = _engine_answer(server, _user({"type": "text", "text": "What is in this picture? "}, {"type": "image"}),
                             [png])
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == n  # the image's tokens are prompt tokens
    assert n > 5 * 4  # a 40x28 image is 5 x 4 tokens (patch 4, merge 2, padded to 40x32)


def test_openai_stream_with_two_images_and_jpeg(server, oai):
    a, b = _png(seed=3), _png(32, 32, seed=4, fmt="JPEG")
    msgs = _user(_img_part(_data_uri(a)), {"type": "text", "text": "and"}, _img_part(_data_uri(b, "image/jpeg")))
    whole = _chat(oai, msgs).choices[0].message.content
    chunks = list(_chat(oai, msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_openai_local_file_under_the_allowed_dir(server, oai, local_dir):
    by_path = _chat(oai, _user(_img_part(str(local_dir / "cat.png")))).choices[0].message.content
    by_url = _chat(oai, _user(_img_part((local_dir / "cat.png").as_uri()))).choices[0].message.content
    inline = _chat(oai, _user(_img_part(_data_uri((local_dir / "cat.png").read_bytes())))).choices[0].message.content
    assert by_path == by_url == inline


def test_anthropic_base64_image(server, claude):
    png = _png(seed=5)
    # this SDK version takes no sampling arguments: temperature travels in extra_body
    r = claude.messages.create(model="tiny", max_tokens=8, extra_body={"temperature": 0},
                               thinking={"type": "disabled"},
                               messages=[{"role": "user", "content": [
                                   {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                "data": base64.b64encode(png).decode()}},
                                   {"type": "text", "text": "Describe it."}]}])
    text, n = _engine_answer(server, _user({"type": "image"}, {"type": "text", "text": "Describe it."}), [png])
    assert "".join(b.text for b in r.content if b.type == "text") == text
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n


def _refused(server, path, body, status=400):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def _oa(*parts):
    return {"model": "tiny", "max_tokens": 4, "messages": _user(*parts)}


def _an(block):
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [block]}]}


def test_refusals_name_the_reason_and_the_server_keeps_serving(server, oai, local_dir, tmp_path):
    png = _png(seed=6)
    cases = [
        (_oa(_img_part("data:image/png;base64,@@@not-base64")), "not valid base64"),
        (_oa(_img_part("data:image/bmp;base64," + base64.b64encode(png).decode())), "media type image/bmp"),
        (_oa(_img_part(_data_uri(_png(fmt="BMP")))), "image format BMP is not supported"),
        (_oa(_img_part(_data_uri(b"\x89PNG\r\n\x1a\n garbage"))), "cannot decode"),
        (_oa(_img_part("https://example.com/cat.png")), "does not fetch images from the network"),
        (_oa(*[_img_part(_data_uri(png))] * 3), "at most 2 per request"),
        (_oa(_img_part(_data_uri(_png(300, 200, seed=7)))), "at most 40000"),
        (_oa(_img_part(str(tmp_path / "elsewhere.png"))), "outside the directory"),
        (_oa(_img_part(str(local_dir / "nope.png"))), "no image file"),
        (_oa(_img_part("ftp://example.com/cat.png")), "scheme 'ftp'"),
    ]
    for body, why in cases:
        assert why in _refused(server, "/v1/chat/completions", body), why
    an = [
        (_an({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}),
         "not valid base64"),
        (_an({"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}),
         "does not fetch images"),
        (_an({"type": "image", "source": {"type": "file", "file_id": "f"}}), "may be 'base64' or 'url'"),
        (_an({"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "AAAA"}}),
         "media type image/tiff"),
    ]
    for body, why in an:
        assert why in _refused(server, "/v1/messages", body), why
    (tmp_path / "elsewhere.png").write_bytes(png)
    assert "outside the directory" in _refused(server, "/v1/chat/completions",
                                               _oa(_img_part(str(tmp_path / "elsewhere.png"))))
    # an image in an assistant turn is not something the model was trained to read
    body = {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [_img_part(_data_uri(png))]},
        {"role": "user", "content": "again"}]}
    assert "accepts text only here" in _refused(server, "/v1/chat/completions", body)
    assert _chat(oai, _user(_img_part(_data_uri(png)))).choices[0].finish_reason in ("stop", "length")


def test_a_text_only_model_refuses_images():
    s = LiveServer(loaded=text_model())
    try:
        msg = _refused(s, "/v1/chat/completions", _oa(_img_part(_data_uri(_png()))))
        assert "accepts text only" in msg
    finally:
        s.stop()
