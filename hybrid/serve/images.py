"""Images in requests: both dialects' image parts, where their bytes may come from, and the limits.

OpenAI: {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (or the url as a
plain string). Anthropic: {"type": "image", "source": {"type": "base64", "media_type": "image/png",
"data": "..."}} or {"type": "url", "url": ...}. A data: URI or base64 source is decoded while the
request is parsed (bad base64 is a 400 naming the field); other URLs are resolved by the policy
the server was started with:

  - a local file (a path, or file://) only under --allow-local-images DIR (off by default);
  - http(s) only with --allow-remote-images (off by default: the server does not fetch from the
    network on a client's behalf), bounded by the byte limit and a timeout.

Each image in the template's view of a message is a {"type": "image"} part: Kimi's chat template
writes <|media_begin|>image<|media_content|><|media_pad|><|media_end|> for it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from hybrid.serve.errors import ApiError, bad_request
from hybrid.serve.fields import get

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF"})  # Pillow's names of what clients may send
MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)
REMOTE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ImageRef:
    where: str                 # the request field it came from ("messages[0].content[1]")
    data: bytes | None = None  # decoded already (data: URI, base64 source)
    url: str | None = None     # to resolve under the server's policy


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"'{where}' is not valid base64 ({e})", where) from None


def _media_type(kind: str | None, where: str) -> None:
    if kind is not None and kind.lower() not in MEDIA_TYPES:
        raise bad_request(f"'{where}': media type {kind} is not supported (image/png, image/jpeg, "
                          "image/webp, image/gif)", where)


def _from_url(url: str, where: str) -> ImageRef:
    if url.startswith("data:"):
        m = _DATA_URI.fullmatch(url)
        if m is None:
            raise bad_request(f"'{where}' is a data: URI but not a base64 one (data:image/png;base64,...)", where)
        _media_type(m.group("type"), where)
        return ImageRef(where, data=_b64(m.group("data"), where))
    return ImageRef(where, url=url)


def openai_image(part: dict, where: str) -> ImageRef:
    """An OpenAI image_url content part."""
    iu = part.get("image_url")
    url = iu if isinstance(iu, str) else get(get(part, "image_url", where, dict), "url", f"{where}.image_url", str)
    return _from_url(url, f"{where}.image_url")


def anthropic_image(block: dict, where: str) -> ImageRef:
    """An Anthropic image block."""
    src = get(block, "source", where, dict)
    sw = f"{where}.source"
    kind = get(src, "type", sw, str)
    if kind == "base64":
        _media_type(get(src, "media_type", sw, str), f"{sw}.media_type")
        return ImageRef(sw, data=_b64(get(src, "data", sw, str), f"{sw}.data"))
    if kind == "url":
        return _from_url(get(src, "url", sw, str), f"{sw}.url")
    raise bad_request(f"'{sw}.type' is '{kind}'; image sources may be 'base64' or 'url'", f"{sw}.type")


@dataclass(frozen=True)
class ImagePolicy:
    """Where image bytes may come from, and how many and how large (the server's options)."""

    local_dir: Path | None = None   # --allow-local-images DIR
    allow_remote: bool = False      # --allow-remote-images
    max_images: int = 8             # per request
    max_bytes: int = 20 * 1024 * 1024  # encoded, per image
    max_pixels: int = 64 * 1024 * 1024  # width x height, per image as decoded

    def bytes_of(self, ref: ImageRef) -> bytes:
        if ref.data is not None:
            data = ref.data
        else:
            data = self._fetch(ref)
        if len(data) > self.max_bytes:
            raise ApiError(413, f"'{ref.where}': the image is {len(data)} bytes; at most {self.max_bytes} "
                                "bytes per image", param=ref.where)
        return data

    def _fetch(self, ref: ImageRef) -> bytes:
        u = urlparse(ref.url)
        if u.scheme in ("http", "https"):
            if not self.allow_remote:
                raise bad_request(f"'{ref.where}': this server does not fetch images from the network (it was "
                                  "not started with --allow-remote-images); send the image as a base64 data: URI",
                                  ref.where)
            return self._download(ref)
        if u.scheme in ("", "file"):
            return self._local(ref, unquote(u.path) if u.scheme == "file" else ref.url)
        raise bad_request(f"'{ref.where}': URL scheme '{u.scheme}' is not supported for images "
                          "(data:, and http(s) or local files when the server allows them)", ref.where)

    def _local(self, ref: ImageRef, path: str) -> bytes:
        if self.local_dir is None:
            raise bad_request(f"'{ref.where}': local image files are off (start the server with "
                              "--allow-local-images DIR); send the image as a base64 data: URI", ref.where)
        root = self.local_dir.resolve()
        p = Path(path)
        full = (p if p.is_absolute() else root / p).resolve()
        if full != root and root not in full.parents:
            raise bad_request(f"'{ref.where}': {path} is outside the directory this server serves images "
                              f"from", ref.where)
        if not full.is_file():
            raise bad_request(f"'{ref.where}': no image file {path} under the allowed directory", ref.where)
        size = full.stat().st_size
        if size > self.max_bytes:
            raise ApiError(413, f"'{ref.where}': the image is {size} bytes; at most {self.max_bytes} bytes "
                                "per image", param=ref.where)
        return full.read_bytes()

    def _download(self, ref: ImageRef) -> bytes:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(ref.url, timeout=REMOTE_TIMEOUT_S) as r:
                data = r.read(self.max_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise bad_request(f"'{ref.where}': could not fetch the image ({e})", ref.where) from None
        if len(data) > self.max_bytes:
            raise ApiError(413, f"'{ref.where}': the image is over {self.max_bytes} bytes", param=ref.where)
        return data
