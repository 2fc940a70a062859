"""Structured mutations, all driven by one random.Random (so a case is its seed).

mutate_json: a JSON value with 1-3 edits at random places: a key dropped, a value replaced by
  one of a list of awkward values (wrong types, zero, negative, huge, NaN, long strings, deep
  nesting), a number nudged (+-1, x2, negated), a type swapped (1 -> "1" -> 1.0 -> [1]), a list
  element duplicated or dropped, a key added.
mutate_bytes: a byte string with 1-4 edits: bytes flipped, a run overwritten, cut short,
  extended, a little-endian u64 overwritten with an edge value.
"""

from __future__ import annotations

import copy
import math
import random
import struct

AWKWARD = [
    None, True, False, 0, -1, 1, 2, 3, 7, 31, 33, 2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1,
    2**64, 10**30, -(10**30), 0.0, -0.0, 0.5, 1e-300, 1e308, -1e308, math.inf, -math.inf, math.nan,
    "", "x", "0", "1e3", "true", "null", "\u0000", "\ud800", "../" * 8 + "etc/passwd", "/dev/zero",
    "A" * 5000, [], [0], [1, 2], [None], [[[]]], {}, {"a": 1}, {"": None},
]
EDGE_U64 = [0, 1, 2, 31, 32, 33, 4095, 4096, 2**21, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _paths(v, here=()):
    """Every (path, value) inside v, containers included."""
    yield here, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, here + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, here + (i,))


def _set(root, path, value):
    if not path:
        return value
    node = root
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return root


def _nudge(rng: random.Random, v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, -v, v * 2, v // 2, 0, v * 2**20])
    if isinstance(v, float):
        return rng.choice([v * 2, -v, v + 1, v / 1e6, 0.0, math.nan, v * 1e300])
    if isinstance(v, str):
        return rng.choice([v + "x", v[:-1], v.upper(), v * 3, ""])
    return rng.choice(AWKWARD)


def _swap_type(rng: random.Random, v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return rng.choice([str(v), float(v) if isinstance(v, int) else int(v) if math.isfinite(v) else None,
                           [v], {"value": v}, bool(v)])
    if isinstance(v, str):
        return rng.choice([len(v), [v], {v: v}, None])
    if isinstance(v, list):
        return rng.choice([{str(i): x for i, x in enumerate(v)}, v[0] if v else None, len(v)])
    if isinstance(v, dict):
        return rng.choice([list(v.values()), list(v), None, ""])
    return rng.choice(AWKWARD)


def mutate_json(rng: random.Random, value, edits: int | None = None):
    out = copy.deepcopy(value)
    for _ in range(edits or rng.randint(1, 3)):
        paths = list(_paths(out))
        path, v = rng.choice(paths)
        op = rng.randrange(7)
        parent = None
        if path:
            parent = out
            for p in path[:-1]:
                parent = parent[p]
        if op == 0 and path:  # drop
            del parent[path[-1]]
        elif op == 1:
            out = _set(out, path, copy.deepcopy(rng.choice(AWKWARD)))
        elif op == 2:
            out = _set(out, path, _nudge(rng, v))
        elif op == 3:
            out = _set(out, path, _swap_type(rng, v))
        elif op == 4 and isinstance(v, list) and v:
            i = rng.randrange(len(v))
            v.insert(i, copy.deepcopy(v[i])) if rng.random() < 0.5 else v.pop(i)
        elif op == 5 and isinstance(v, dict):
            v[rng.choice(["extra", "", "__metadata__", "x" * 300, "0"])] = copy.deepcopy(rng.choice(AWKWARD))
        else:  # wrap: a value where a container was expected, or one level deeper
            out = _set(out, path, rng.choice([[v], {"v": v}]))
    return out


def mutate_bytes(rng: random.Random, data: bytes, hot: tuple[int, int] | None = None, edits: int | None = None) -> bytes:
    """`hot`: (begin, end) most edits land in (a header), the rest anywhere."""
    b = bytearray(data)
    for _ in range(edits or rng.randint(1, 4)):
        if not b:
            b += bytes([rng.randrange(256)])
        lo, hi = hot if hot and rng.random() < 0.8 else (0, len(b))
        hi = max(lo + 1, min(hi, len(b)))
        at = rng.randrange(lo, hi)
        op = rng.randrange(6)
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            n = rng.randint(1, 16)
            b[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
        elif op == 2:
            del b[at:]
        elif op == 3:
            b += bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 4096])))
        elif op == 4 and at + 8 <= len(b):
            b[at:at + 8] = struct.pack("<Q", rng.choice(EDGE_U64))
        else:
            b[at:at + 1] = b""
    return bytes(b)
