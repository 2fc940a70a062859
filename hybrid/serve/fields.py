"""Typed reads of fields from a parsed JSON body, each failure a 400 naming the field.

We validate by hand rather than with pydantic models so that (1) every message names the field
path the way the client wrote it ("messages[2].content"), (2) errors come back in the route's own
error shape, and (3) unknown extra fields are ignored as both OpenAI and Anthropic do.
"""

from __future__ import annotations

import json
import math
import re

from hybrid.serve.errors import ApiError, bad_request
from hybrid.tokenizer import replace_lone_surrogates

_MISSING = object()
# A lone surrogate reaches a str through a JSON escape (\ud800) or, since json.loads decodes
# bytes with surrogatepass, as its 3-byte UTF-8 form (ED A0..BF ..).
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object. Every lone UTF-16 surrogate in it (a client that cut a string
    inside an emoji), in any string or key, becomes U+FFFD, as undecodable bytes do in output:
    the same rule for every field of every route, so no text can fail later in the tokenizer."""
    if not raw:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer over 4300 digits
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {_kind(body)}")
    if _MAYBE_SURROGATE.search(raw):
        try:
            body = _without_surrogates(body)
        except RecursionError:
            raise bad_request("request body is nested too deeply") from None
    return body


def _without_surrogates(v):
    if isinstance(v, str):
        return replace_lone_surrogates(v)
    if isinstance(v, list):
        return [_without_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {replace_lone_surrogates(k): _without_surrogates(x) for k, x in v.items()}
    return v


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def get(obj: dict, key: str, path: str, kind, default=_MISSING, allow_none: bool = True):
    """obj[key] checked against `kind` (a type or tuple of types); bool is never an int here."""
    where = f"{path}.{key}" if path else key
    if key not in obj or (obj[key] is None and allow_none):
        if default is _MISSING:
            raise bad_request(f"'{where}' is required", param=where)
        return default
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        names = " or ".join(_type_name(k) for k in kinds)
        raise bad_request(f"'{where}' must be {names}, got {_kind(v)}", param=where)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad_request(f"'{where}' must be a finite number", param=where)
    return v


def _type_name(k) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}.get(
        k, k.__name__
    )


def get_number(obj: dict, key: str, path: str, lo: float, hi: float, default=None, integer: bool = False):
    v = get(obj, key, path, int if integer else float, default=default)
    if v is None:
        return None
    where = f"{path}.{key}" if path else key
    if not (lo <= v <= hi):
        raise bad_request(f"'{where}' must be between {lo:g} and {hi:g}, got {v}", param=where)
    return v


def get_stop_list(obj: dict, key: str, max_items: int = 16) -> list[str]:
    """OpenAI `stop` (string or array) / Anthropic `stop_sequences` (array) -> list of strings."""
    v = obj.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f"'{key}' must be a string or an array of strings", param=key)
    if len(v) > max_items:
        raise bad_request(f"'{key}' has {len(v)} entries; at most {max_items} are allowed", param=key)
    if any(s == "" for s in v):
        raise bad_request(f"'{key}' entries must not be empty strings", param=key)
    return list(v)


def check_model(body: dict, served: str) -> str:
    """The request's "model" must be the one this server serves (404 otherwise, as OpenAI does)."""
    model = get(body, "model", "", str)
    if model != served:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")
    return model


def check(cond: bool, message: str, param: str | None = None) -> None:
    if not cond:
        raise ApiError(400, message, param=param)


def iter_messages(raw):
    """(where, message, role) for each entry of a non-empty 'messages' array, each checked to be
    an object with a string role; the dialects check what the role allows."""
    check(isinstance(raw, list), "'messages' must be an array", "messages")
    check(len(raw) > 0, "'messages' must contain at least one message", "messages")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        check(isinstance(m, dict), f"'{where}' must be an object", where)
        yield where, m, get(m, "role", where, str)


def iter_tools(body: dict):
    """(where, tool) for each entry of the optional 'tools' array, each checked to be an object;
    the dialects read what a tool holds."""
    for i, t in enumerate(get(body, "tools", "", list, default=None) or []):
        where = f"tools[{i}]"
        check(isinstance(t, dict), f"'{where}' must be an object", where)
        yield where, t


def unique_name(obj: dict, where: str, names: set) -> str:
    """obj's 'name': a non-empty string not yet in `names` (added to it)."""
    name = get(obj, "name", where, str)
    check(name != "" and name not in names, f"'{where}.name' must be a unique, non-empty name", f"{where}.name")
    names.add(name)
    return name
