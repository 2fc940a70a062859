"""`hybrid chat`'s /image on a tiny K2.5 with a vision tower: the image goes with the next message,
the next turn reuses its KV (no second encoding), /reset forgets it, a text-only model or a file
that is not an image is a clear message, and /save writes where the image was."""

import io

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from hybrid.chat.repl import ChatApp
from hybrid.chat.session import ChatSession, Settings
from test_serve_support import CONTEXT, model as text_model, vision_model


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("chat") / "shot.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8)).save(p)
    return str(p)


def _session(m):
    from hybrid.engine.engine import Engine

    e = Engine(m, tokenizer=m.tokenizer, max_seqs=1, max_context=CONTEXT)
    return ChatSession(e, m.tokenizer, Settings(temperature=0, max_tokens=4, mode="instant"), model=m), e


def _app(s):
    out = io.StringIO()
    return ChatApp(s, Console(file=out, width=100, color_system=None), reader=None, markdown=False), out


def test_image_command_attaches_to_the_next_message(picture, tmp_path):
    m = vision_model()
    s, e = _session(m)
    try:
        app, out = _app(s)
        app.command(f"/image {picture}")
        assert "40x28, 20 tokens" in out.getvalue() and len(s.pending_images) == 1
        list(s.ask("what is this?"))
        assert s.pending_images == [] and len(s.images) == 1
        assert s.messages[0]["content"][0] == {"type": "image", "path": picture}
        calls = []
        real = m.encode_image
        m.encode_image = lambda im: calls.append(im) or real(im)
        try:
            reply = s.ask("and now?")
            list(reply)
        finally:
            del m.encode_image
        assert calls == []  # the image's KV came from the first turn
        assert reply.stats.reused_tokens >= 20
        s.save(str(tmp_path / "t.md"))
        assert f"[image: {picture}]" in (tmp_path / "t.md").read_text()
        s.reset()
        assert s.images == [] and s.pending_images == []
    finally:
        e.close()


def test_image_command_errors(picture, tmp_path):
    (tmp_path / "x.png").write_text("not a picture")
    s, e = _session(vision_model())
    try:
        app, out = _app(s)
        app.command(f"/image {tmp_path / 'x.png'}")
        app.command("/image")
        assert "cannot decode" in out.getvalue() and "usage: /image PATH" in out.getvalue()
        assert s.pending_images == []
    finally:
        e.close()
    s, e = _session(text_model())
    try:
        app, out = _app(s)
        app.command(f"/image {picture}")
        assert "takes no images" in out.getvalue()
    finally:
        e.close()
