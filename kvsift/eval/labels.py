"""Grid labels: a method (or a kvpress press) with options in brackets, and comma lists that keep
the commas inside brackets. No imports beyond the standard library, so that ``bench/vs_kvpress.py``
can load this file alone inside the kvpress venv (where ``kvsift``'s engine does not import)."""

from __future__ import annotations

import json
import re
from typing import Any

_LABEL = re.compile(r"(?P<spec>[^\[\]]+)\[(?P<opts>[^\[\]]*)\]")


def split_label(method: str) -> tuple[str, dict[str, Any]]:
    """A grid method with its options in brackets, ``kivi[bits=2]`` or ``snapkv[window=64,pooling=max]``,
    -> ``("kivi", {"bits": 2})``. The whole label names the rows (so ``kivi`` and ``kivi[bits=2]`` are
    different cells); values are JSON where they parse (``2``, ``0.5``, ``true``), else strings. A
    method without brackets comes back as it is, with no options."""
    m = _LABEL.fullmatch(method.strip())
    if m is None:
        if "[" in method or "]" in method:
            raise ValueError(f"bad method label {method!r}: expected name[key=value,...], e.g. kivi[bits=2]")
        return method, {}
    opts: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in m["opts"].split(","))):
        key, eq, v = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in method label {method!r}: expected key=value")
        try:
            opts[key.strip()] = json.loads(v.strip())
        except json.JSONDecodeError:
            opts[key.strip()] = v.strip()
    return m["spec"].strip(), opts


def split_items(text: str) -> list[str]:
    """Comma-separated items, stripped, empty ones dropped; commas inside brackets or parentheses
    (``kivi[bits=2,group=64]``, ``adakv(snapkv)``) stay."""
    items, cur, depth = [], "", 0
    for ch in str(text):
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth <= 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [t.strip() for t in items + [cur] if t.strip()]
