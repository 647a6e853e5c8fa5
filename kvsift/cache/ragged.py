"""Compact per-head KV: a layer whose KV heads keep different numbers of tokens (AdaKV's per-head
budgets, DuoAttention's retrieval vs streaming heads) stores them without padding back to the
longest head.

Layout, per batch row: head 0's tokens, then head 1's, ... in one flat buffer:

* ``keys``/``values`` ``(batch, total, head_dim)`` and ``positions (batch, total)`` int32 (-1 =
  unused: rows whose heads keep fewer tokens in all are padded up to the longest row's ``total``);
* ``slots (batch, kv_heads, width)`` int32: the flat slots of each head's tokens (``-1`` = unused),
  ``width`` the longest head's length.

The sparse decode kernel reads it in place: the flat buffers are passed as ``(batch, kv_heads,
total, head_dim)`` views with a zero head stride (:meth:`RaggedKV.source`) and each head walks its
own slot list. Bytes held: ``total * head_dim * 2`` per row for K and V plus 4 bytes per slot entry
(positions, and the table padded to the longest head: 4 of the ``2 * head_dim * 2`` bytes a bf16
K+V pair per head takes), instead of ``kv_heads * width * head_dim * 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedKV:
    keys: torch.Tensor        # (batch, total, head_dim)
    values: torch.Tensor      # (batch, total, head_dim)
    positions: torch.Tensor   # (batch, total) int32, -1 = unused
    slots: torch.Tensor       # (batch, kv_heads, width) int32, -1 = unused

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, idx: torch.Tensor) -> "RaggedKV":
        """Keep slots ``idx (batch, kv_heads, k)`` (``-1`` = none, anywhere in the row; order kept)
        of ``keys/values (batch, kv_heads, n, head_dim)``, ``positions (batch, kv_heads, n)``."""
        b, h, n, d = keys.shape
        valid = idx >= 0
        # valid entries first, in their order (a stable sort on "is a hole")
        order = (~valid).to(torch.int8).sort(dim=-1, stable=True).indices
        idx = idx.gather(-1, order)
        lens = valid.sum(-1)                                                   # (b, h)
        width = int(lens.max()) if lens.numel() else 0
        idx = idx[..., :width]
        valid = torch.arange(width, device=idx.device) < lens[..., None]       # (b, h, width)
        offs = lens.cumsum(-1) - lens                                          # (b, h) exclusive
        total = max(1, int(lens.sum(-1).max()) if lens.numel() else 1)
        dest = offs[..., None] + torch.arange(width, device=idx.device)        # (b, h, width)
        safe = idx.clamp(min=0)
        gk = keys.gather(2, safe[..., None].expand(b, h, width, d))[valid]     # (m, d)
        gv = values.gather(2, safe[..., None].expand(b, h, width, d))[valid]
        gp = positions.gather(2, safe)[valid]
        row = torch.arange(b, device=idx.device)[:, None, None].expand(b, h, width)[valid]
        flat = (row * total + dest[valid]).to(torch.int64)
        fk = keys.new_zeros(b * total, d)
        fv = values.new_zeros(b * total, d)
        fp = torch.full((b * total,), -1, dtype=torch.int32, device=keys.device)
        fk[flat], fv[flat], fp[flat] = gk, gv, gp.to(torch.int32)
        slots = torch.where(valid, dest, -1).to(torch.int32)
        return cls(fk.view(b, total, d), fv.view(b, total, d), fp.view(b, total), slots)

    @classmethod
    def from_dense(cls, keys, values, positions) -> "RaggedKV":
        """Every slot with a position >= 0 of a dense ``(batch, kv_heads, n, head_dim)`` layer."""
        n = positions.shape[-1]
        idx = torch.where(positions >= 0, torch.arange(n, device=positions.device), -1)
        return cls.build(keys, values, positions, idx)

    @classmethod
    def stack(cls, rows: list["RaggedKV"]) -> "RaggedKV":
        """One batch from single-row stores (sequences prefilled one at a time), padded to the
        longest ``total`` and ``width``."""
        total = max(r.keys.shape[1] for r in rows)
        width = max(r.slots.shape[2] for r in rows)
        b, h, d = len(rows), rows[0].slots.shape[1], rows[0].keys.shape[2]
        k = rows[0].keys.new_zeros(b, total, d)
        v = rows[0].values.new_zeros(b, total, d)
        p = torch.full((b, total), -1, dtype=torch.int32, device=k.device)
        s = torch.full((b, h, width), -1, dtype=torch.int32, device=k.device)
        for i, r in enumerate(rows):
            t, w = r.keys.shape[1], r.slots.shape[2]
            k[i, :t], v[i, :t], p[i, :t], s[i, :, :w] = r.keys[0], r.values[0], r.positions[0], r.slots[0]
        return cls(k, v, p, s)

    # ---- views ----------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.slots.shape[1]

    def source(self):
        """The store as a :class:`~kvsift.methods.base.SlotSource` over ``(batch, kv_heads, total,
        ...)`` zero-stride views (no copy): what the sparse decode kernel and ``gather`` read."""
        from kvsift.methods.base import SlotSource

        b, t, d = self.keys.shape
        h = self.kv_heads
        return SlotSource(self.keys[:, None].expand(b, h, t, d), self.values[:, None].expand(b, h, t, d),
                          self.positions[:, None].expand(b, h, t), self.slots)

    def head_lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64 tokens held per head."""
        return (self.slots >= 0).sum(-1)

    def tokens(self) -> int:
        """Token entries held (all heads and rows): what the KV bytes are proportional to."""
        return int((self.positions >= 0).sum())

    # ---- LayerState-like protocol ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "slots": self.slots}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def used_bytes(self) -> int:
        return 2 * self.tokens() * self.keys.shape[-1] * self.keys.element_size()

    def clone(self, batch_repeat: int = 1) -> "RaggedKV":
        if batch_repeat > 1:
            return RaggedKV(*(t.repeat_interleave(batch_repeat, 0) for t in self.tensors().values()))
        return RaggedKV(*(t.clone() for t in self.tensors().values()))

    def to(self, device) -> "RaggedKV":
        return RaggedKV(*(t.to(device) for t in self.tensors().values()))

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RaggedKV":
        for name in ("keys", "values", "positions", "slots"):
            if name not in t:
                raise ValueError(f"ragged KV is missing {name!r}")
        k, v, p, s = t["keys"], t["values"], t["positions"], t["slots"]
        if k.dim() != 3 or v.shape != k.shape or tuple(p.shape) != tuple(k.shape[:2]) or s.dim() != 3 \
                or s.shape[0] != k.shape[0]:
            raise ValueError(f"ragged KV: unexpected shapes {tuple(k.shape)}, {tuple(v.shape)}, {tuple(p.shape)}, "
                             f"{tuple(s.shape)}")
        if bool((s >= k.shape[1]).any()):
            raise ValueError("ragged KV: a slot points past the buffer")
        return cls(k, v, p.to(torch.int32), s.to(torch.int32))
