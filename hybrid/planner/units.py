"""Parsing and printing of byte sizes and token counts given by people ("24GiB", "32k")."""

from __future__ import annotations

import re

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(text, what: str = "size") -> int:
    """'24GiB' -> 25769803776, '24GB' -> 24e9, '1.5g' -> 1.5e9, 123 -> 123."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{what}: {text} is negative")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"{what}: cannot read {text!r} as a size (examples: 24GiB, 80GB, "
                         f"512MiB, 1.5e9)") from None
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_tokens(text, what: str = "tokens") -> int:
    """'32k' -> 32768, '128K' -> 131072, '1m' -> 1048576, '5000' -> 5000."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{what}: {text} is negative")
        return text
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"{what}: cannot read {text!r} as a token count (examples: 32k, 4096)")
    mult = {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    return int(m.group(1)) * mult


def fmt_bytes(n: float) -> str:
    """Human-readable, binary units: 25769803776 -> '24.00 GiB'."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.2f} {unit}" if unit != "B" else f"{sign}{int(n)} B"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


def compact_ids(ids) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sorted, ranges collapsed); [] -> ''."""
    ids = sorted(int(i) for i in ids)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def expand_ids(text: str, limit: int, what: str = "ids") -> list:
    """Inverse of compact_ids; every id must be in 0..limit-1 and appear once."""
    text = str(text).strip()
    if not text:
        return []
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"{what}: cannot read {part!r} (expected e.g. '0-3,7,12')")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"{what}: range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: an id appears twice in {text!r}")
    if out and (min(out) < 0 or max(out) >= limit):
        raise ValueError(f"{what}: ids must be in 0..{limit - 1}, got {text!r}")
    return sorted(out)
