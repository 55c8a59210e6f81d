"""Release version ordering: Debian's rules (dpkg's verrevcmp), so `1.10 > 1.9` and `1.0~rc1 < 1.0`.

The SDK (`publish` points a channel at the newest bundle) and the device (anti-rollback) order versions
with this one function."""

from __future__ import annotations

import re

PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~-]{0,63}")


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as a sorts before, with or after b."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return -1 if first_diff < 0 else 1
    return 0


def newer(a: str, b: str) -> bool:
    """a is a later release than b."""
    return compare(a, b) > 0


def newest(versions: list[str]) -> str:
    best = versions[0]
    for v in versions[1:]:
        if newer(v, best):
            best = v
    return best
