"""API keys and tenants.

Each key belongs to an *owner*. A context belongs to the owner of the key that created it: listing,
reading, answering from and deleting it is for that owner only (another owner gets the same 404 as
for an id that never existed), except for *admin* keys, which see every context.

* no key configured: every request is the anonymous admin (a loopback-only server by default);
* ``--api-key KEY``: one key, owner ``default``, admin;
* ``--api-keys-file FILE``: several keys. Either JSON, a list of ``{"key", "owner", "admin"}`` or an
  object ``{key: owner}`` / ``{key: {"owner", "admin", "max_concurrent"}}``, or text lines
  ``KEY OWNER [admin] [max_concurrent=N]`` (``#`` starts a comment).

A key's ``max_concurrent`` (optional, an integer >= 1) is how many of its requests may be queued or
running at once; it overrides the server's ``--max-concurrent-per-key`` for that key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

ANONYMOUS = "anonymous"
DEFAULT_OWNER = "default"
_OWNER_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller. ``max_concurrent``: its key's own limit of requests queued or running (None: the
    server's ``max_concurrent_per_key``); ``key_id``: which key it came with (a digest prefix, never
    the key; None for the anonymous caller of a server without keys): the bucket its requests are
    counted in."""

    owner: str
    admin: bool = False
    max_concurrent: int | None = None
    key_id: str | None = field(default=None, compare=False, repr=False)

    def may_see(self, owner: str | None) -> bool:
        return self.admin or owner == self.owner


ANONYMOUS_ADMIN = Principal(ANONYMOUS, admin=True)


class KeyRing:
    """Keys -> principals. Lookup compares against every key in constant time per key."""

    def __init__(self, entries: list[tuple[str, Principal]]):
        if not entries:
            raise ValueError("no API keys given")
        seen = set()
        for key, p in entries:
            if not isinstance(key, str) or len(key.strip()) < 8 or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError("API keys must be at least 8 characters without whitespace")
            if not _OWNER_RE.match(p.owner):
                raise ValueError(f"owner names are 1-128 characters of A-Z a-z 0-9 _ . @ : -, got {p.owner!r}")
            if key in seen:
                raise ValueError("the same API key is listed twice")
            mc = p.max_concurrent
            if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
                raise ValueError(f"max_concurrent of owner {p.owner!r} must be an integer >= 1, got {mc!r}")
            seen.add(key)
        self._entries = [_entry(k, p) for k, p in entries]

    @classmethod
    def single(cls, key: str) -> "KeyRing":
        key = key.strip()
        ring = cls.__new__(cls)
        if not key:
            raise ValueError("api_key must not be empty")
        ring._entries = [_entry(key, Principal(DEFAULT_OWNER, admin=True))]
        return ring

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyRing":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, where: str = "keys file") -> "KeyRing":
        stripped = text.lstrip()
        entries: list[tuple[str, Principal]] = []
        if stripped.startswith(("[", "{")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            items = []
            if isinstance(data, dict):
                for k, v in data.items():
                    items.append({"key": k, **(v if isinstance(v, dict) else {"owner": v})})
            elif isinstance(data, list):
                items = data
            for i, it in enumerate(items):
                mc = it.get("max_concurrent") if isinstance(it, dict) else None
                if not isinstance(it, dict) or not isinstance(it.get("key"), str) or \
                        not isinstance(it.get("owner"), str) or not isinstance(it.get("admin", False), bool) or \
                        (mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1)):
                    raise ValueError(f"{where}: entry {i} needs a string 'key', a string 'owner', an optional "
                                     f"boolean 'admin' and an optional integer 'max_concurrent' >= 1")
                entries.append((it["key"], Principal(it["owner"], bool(it.get("admin", False)), mc)))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                mc = None
                if len(parts) >= 3 and parts[-1].startswith("max_concurrent="):
                    value = parts.pop().partition("=")[2]
                    if not value.isdigit() or int(value) < 1:
                        raise ValueError(f"{where}:{n}: max_concurrent must be an integer >= 1, got {value!r}")
                    mc = int(value)
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                    raise ValueError(f"{where}:{n}: expected 'KEY OWNER [admin] [max_concurrent=N]'")
                entries.append((parts[0], Principal(parts[1], len(parts) == 3, mc)))
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for d, p in self._entries:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(d, digest):
                found = p
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _entry(key: str, p: Principal) -> tuple[bytes, Principal]:
    """A key ring entry: the key's sha256 and its principal, tagged with a prefix of that digest."""
    digest = hashlib.sha256(key.encode()).digest()
    return digest, replace(p, key_id=digest.hex()[:16])
