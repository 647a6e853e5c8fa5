"""Compact per-head KV: a layer whose KV heads keep different numbers of tokens (AdaKV's per-head
budgets, DuoAttention's retrieval vs streaming heads) stores them without padding back to the
longest head, nor any row back to the longest row.

Layout: every kept token of the layer, of all batch rows and KV heads, in one flat buffer (row 0's
head 0, head 1, ..., then row 1's ...):

* ``keys``/``values`` ``(total, head_dim)`` and ``positions (total,)`` int32;
* ``slots (batch, kv_heads, width)`` int32: the flat slots of each head's tokens in order, valid
  entries first (``-1`` = unused), ``width`` the longest head's length;
* ``counts (batch, kv_heads)`` int32: valid entries per head (the kernel stops there);
* ``fill``: host float, ``sum(counts) / (batch * kv_heads * width)``, how full the table is (the
  kernel launch gives the heads more splits when it is sparse, so long heads do not run alone).

The sparse decode kernel reads it in place: the flat buffers are passed as ``(batch, kv_heads,
total, head_dim)`` views with zero batch and head strides (:meth:`RaggedKV.source`) and each head
walks its own slot list up to its count. Bytes held: ``2 * total * head_dim`` elements for K and V
plus 4 bytes per token (positions) and per table entry, instead of ``batch * kv_heads * width``
K/V pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedKV:
    keys: torch.Tensor        # (total, head_dim)
    values: torch.Tensor      # (total, head_dim)
    positions: torch.Tensor   # (total,) int32
    slots: torch.Tensor       # (batch, kv_heads, width) int32, valid entries first, -1 = unused
    counts: torch.Tensor      # (batch, kv_heads) int32
    fill: float = 1.0

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
        offs = (lens.flatten().cumsum(0) - lens.flatten()).view(b, h)          # exclusive, over (row, head)
        dest = offs[..., None] + torch.arange(width, device=idx.device)        # (b, h, width)
        safe = idx.clamp(min=0)
        keys = keys.gather(2, safe[..., None].expand(b, h, width, d))[valid]   # (total, d), row-major order
        values = values.gather(2, safe[..., None].expand(b, h, width, d))[valid]
        pos = positions.gather(2, safe)[valid].to(torch.int32)
        slots = torch.where(valid, dest, -1).to(torch.int32)
        return cls(keys, values, pos, slots, lens.to(torch.int32), _fill(lens, width))

    @classmethod
    def from_dense(cls, keys, values, positions) -> "RaggedKV":
        """Every slot with a position >= 0 of a dense ``(batch, kv_heads, n, head_dim)`` layer."""
        n = positions.shape[-1]
        idx = torch.where(positions >= 0, torch.arange(n, device=positions.device), -1)
        return cls.build(keys, values, positions, idx)

    @classmethod
    def stack(cls, rows: list["RaggedKV"]) -> "RaggedKV":
        """One batch from stores of single rows (or of several), in order, with no padding."""
        width = max(r.slots.shape[2] for r in rows)
        base, slots = 0, []
        for r in rows:
            s = torch.where(r.slots >= 0, r.slots + base, -1)
            slots.append(torch.nn.functional.pad(s, (0, width - s.shape[2]), value=-1))
            base += r.keys.shape[0]
        counts = torch.cat([r.counts for r in rows])
        return cls(torch.cat([r.keys for r in rows]), torch.cat([r.values for r in rows]),
                   torch.cat([r.positions for r in rows]), torch.cat(slots), counts, _fill(counts, width))

    # ---- views ----------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.slots.shape[1]

    def source(self):
        """The store as a :class:`~kvsift.methods.base.SlotSource` over ``(batch, kv_heads, total,
        ...)`` zero-stride views (no copy): what the sparse decode kernel and ``gather`` read."""
        from kvsift.methods.base import SlotSource

        b, h, _ = self.slots.shape
        t, d = self.keys.shape
        return SlotSource(self.keys.expand(b, h, t, d), self.values.expand(b, h, t, d),
                          self.positions.expand(b, h, t), self.slots)

    def head_lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64 tokens held per head."""
        return self.counts.to(torch.int64)

    def tokens(self) -> int:
        """Token entries held (all heads and rows): what the KV bytes are proportional to."""
        return int(self.keys.shape[0])

    # ---- LayerState-like protocol ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "slots": self.slots,
                "counts": self.counts}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def used_bytes(self) -> int:
        return 2 * self.tokens() * self.keys.shape[-1] * self.keys.element_size()

    def clone(self, batch_repeat: int = 1) -> "RaggedKV":
        """A copy; ``batch_repeat``: each row repeated (rows ``i*n .. i*n+n-1`` copy row ``i``)."""
        if batch_repeat <= 1:
            return RaggedKV(*(t.clone() for t in self.tensors().values()), fill=self.fill)
        b = self.slots.shape[0]
        t = self.keys.shape[0]
        copy = torch.arange(b * batch_repeat, device=self.slots.device) % batch_repeat       # which copy
        slots = self.slots.repeat_interleave(batch_repeat, 0)
        slots = torch.where(slots >= 0, slots + (copy * t)[:, None, None].to(slots.dtype), -1)
        return RaggedKV(self.keys.repeat(batch_repeat, 1), self.values.repeat(batch_repeat, 1),
                        self.positions.repeat(batch_repeat), slots, self.counts.repeat_interleave(batch_repeat, 0),
                        fill=self.fill)

    def to(self, device) -> "RaggedKV":
        return RaggedKV(*(t.to(device) for t in self.tensors().values()), fill=self.fill)

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RaggedKV":
        for name in ("keys", "values", "positions", "slots", "counts"):
            if name not in t:
                raise ValueError(f"ragged KV is missing {name!r}")
        k, v, p, s, c = t["keys"], t["values"], t["positions"], t["slots"], t["counts"]
        if k.dim() != 2 or v.shape != k.shape or tuple(p.shape) != (k.shape[0],) or s.dim() != 3 \
                or tuple(c.shape) != tuple(s.shape[:2]):
            raise ValueError(f"ragged KV: unexpected shapes {tuple(k.shape)}, {tuple(v.shape)}, {tuple(p.shape)}, "
                             f"{tuple(s.shape)}, {tuple(c.shape)}")
        if s.is_floating_point() or c.is_floating_point() or p.is_floating_point():
            raise ValueError("ragged KV: slots, counts and positions must be integers")
        if bool((s >= k.shape[0]).any()) or bool((c > s.shape[2]).any()) or bool((c < 0).any()):
            raise ValueError("ragged KV: a slot or a count points past the buffer")
        c = c.to(torch.int32)
        return cls(k, v, p.to(torch.int32), s.to(torch.int32), c, _fill(c, s.shape[2]))


def _fill(counts: torch.Tensor, width: int) -> float:
    """How full a slot table of ``width`` columns is, from its ``counts`` (a host sync; at build)."""
    return float(counts.sum()) / max(1, counts.numel() * width)
