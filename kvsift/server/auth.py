"""API keys and tenants.

Each key belongs to an *owner*. A context belongs to the owner of the key that created it: listing,
reading, answering from and deleting it is for that owner only (another owner gets the same 404 as
for an id that never existed), except for *admin* keys, which see every context.

* no key configured: every request is the anonymous admin (a loopback-only server by default);
* ``--api-key KEY``: one key, owner ``default``, admin;
* ``--api-keys-file FILE``: several keys. Either JSON, a list of ``{"key", "owner", "admin"}`` or an
  object ``{key: owner}`` / ``{key: {"owner", "admin"}}``, or text lines ``KEY OWNER [admin]``
  (``#`` starts a comment).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = "anonymous"
DEFAULT_OWNER = "default"
_OWNER_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str
    admin: bool = False

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
            seen.add(key)
        self._entries = [(hashlib.sha256(k.encode()).digest(), p) for k, p in entries]

    @classmethod
    def single(cls, key: str) -> "KeyRing":
        key = key.strip()
        ring = cls.__new__(cls)
        if not key:
            raise ValueError("api_key must not be empty")
        ring._entries = [(hashlib.sha256(key.encode()).digest(), Principal(DEFAULT_OWNER, admin=True))]
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
                if not isinstance(it, dict) or not isinstance(it.get("key"), str) or \
                        not isinstance(it.get("owner"), str) or not isinstance(it.get("admin", False), bool):
                    raise ValueError(f"{where}: entry {i} needs a string 'key', a string 'owner' and an optional "
                                     f"boolean 'admin'")
                entries.append((it["key"], Principal(it["owner"], bool(it.get("admin", False)))))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "admin"):
                    raise ValueError(f"{where}:{n}: expected 'KEY OWNER [admin]'")
                entries.append((parts[0], Principal(parts[1], len(parts) == 3)))
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
