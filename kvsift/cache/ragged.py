"""Compact per-head KV: a layer whose KV heads keep different numbers of tokens (AdaKV's per-head
budgets, DuoAttention's retrieval vs streaming heads) stores them without padding back to the
longest head, nor any row back to the longest row.

Layout: one region per (batch row, KV head), in order (row 0's head 0, head 1, ..., then row 1's
...), in one flat buffer; a region holds the head's kept tokens, then ``room`` free slots for the
tokens that come next (decode, a context's question):

* ``keys``/``values`` ``(total, head_dim)`` and ``positions (total,)`` int32 (-1 = free slot);
* ``slots (batch, kv_heads, width)`` int32: each head's region, ``start .. start + capacity``
  (``-1`` past it); ``width`` the longest region;
* ``start (batch, kv_heads)`` int64 and ``counts (batch, kv_heads)`` int32: where each region
  starts and how many of its slots are used (device tensors: an append moves them on the device,
  so a CUDA graph can replay it);
* ``room``: free slots left in every region (host int; all heads append alike); ``fill``: how full
  the slot table is at its fullest (host float), which sets the kernel's splits.

The sparse decode kernel reads the whole layer in one call, in place: the flat buffers as
``(batch, kv_heads, total, head_dim)`` views with zero batch and head strides
(:meth:`RaggedKV.source`), each head walking its own slots up to its count. Bytes held:
``2 * total * head_dim`` K/V elements plus 4 bytes per slot (positions) and per table entry, where
the padded layout holds ``batch * kv_heads * longest`` K/V pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedKV:
    keys: torch.Tensor        # (total, head_dim)
    values: torch.Tensor      # (total, head_dim)
    positions: torch.Tensor   # (total,) int32, -1 = free
    slots: torch.Tensor       # (batch, kv_heads, width) int32: start + j for j < capacity, else -1
    start: torch.Tensor       # (batch, kv_heads) int64
    counts: torch.Tensor      # (batch, kv_heads) int32 used slots per region
    room: int = 0             # free slots left in every region
    fill: float = 1.0         # sum of region capacities / (batch * kv_heads * width)

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, idx: torch.Tensor,
              room: int = 0) -> "RaggedKV":
        """Keep slots ``idx (batch, kv_heads, k)`` (``-1`` = none, anywhere in the row; order kept)
        of ``keys/values (batch, kv_heads, n, head_dim)``, ``positions (batch, kv_heads, n)``, with
        ``room`` free slots after each head's tokens."""
        b, h, n, d = keys.shape
        valid = idx >= 0
        # valid entries first, in their order (a stable sort on "is a hole")
        order = (~valid).to(torch.int8).sort(dim=-1, stable=True).indices
        idx = idx.gather(-1, order)
        lens = valid.sum(-1)                                                   # (b, h)
        width = int(lens.max()) if lens.numel() else 0
        idx = idx[..., :width]
        valid = torch.arange(width, device=idx.device) < lens[..., None]       # (b, h, width)
        cap = lens + room
        start = (cap.flatten().cumsum(0) - cap.flatten()).view(b, h)           # exclusive, over (row, head)
        total = int(cap.sum())
        dest = (start[..., None] + torch.arange(width, device=idx.device))[valid]
        safe = idx.clamp(min=0)
        fk, fv = keys.new_zeros(total, d), values.new_zeros(total, d)
        fp = torch.full((total,), -1, dtype=torch.int32, device=keys.device)
        fk[dest] = keys.gather(2, safe[..., None].expand(b, h, width, d))[valid]
        fv[dest] = values.gather(2, safe[..., None].expand(b, h, width, d))[valid]
        fp[dest] = positions.gather(2, safe)[valid].to(torch.int32)
        return cls._with_table(fk, fv, fp, start, cap, lens.to(torch.int32), room)

    @classmethod
    def _with_table(cls, keys, values, positions, start, cap, counts, room) -> "RaggedKV":
        width = int(cap.max()) if cap.numel() else 0
        ar = torch.arange(width, device=start.device)
        slots = torch.where(ar < cap[..., None], start[..., None] + ar, -1).to(torch.int32)
        fill = float(cap.sum()) / max(1, cap.numel() * width)
        return cls(keys, values, positions, slots, start.to(torch.int64), counts, room, fill)

    @classmethod
    def from_dense(cls, keys, values, positions, room: int = 0) -> "RaggedKV":
        """Every slot with a position >= 0 of a dense ``(batch, kv_heads, n, head_dim)`` layer."""
        n = positions.shape[-1]
        idx = torch.where(positions >= 0, torch.arange(n, device=positions.device), -1)
        return cls.build(keys, values, positions, idx, room)

    @classmethod
    def stack(cls, rows: list["RaggedKV"]) -> "RaggedKV":
        """One batch from stores of single rows (or of several), in order, with no padding."""
        room = min(r.room for r in rows)
        rows = [r.with_room(room) if r.room != room else r for r in rows]
        base, starts = 0, []
        for r in rows:
            starts.append(r.start + base)
            base += r.keys.shape[0]
        cap = torch.cat([r.capacity() for r in rows])
        return cls._with_table(torch.cat([r.keys for r in rows]), torch.cat([r.values for r in rows]),
                               torch.cat([r.positions for r in rows]), torch.cat(starts), cap,
                               torch.cat([r.counts for r in rows]), room)

    def rows(self, idx: list[int]) -> "RaggedKV":
        """A new store of rows ``idx`` only, in that order: each head's used slots, no room (e.g. one
        running sequence, to stack it with others into a new batch)."""
        sel = torch.as_tensor(idx, dtype=torch.long, device=self.start.device)
        start, counts = self.start[sel], self.counts[sel]
        b, h = counts.shape
        cap = counts.long()
        new_start = (cap.flatten().cumsum(0) - cap.flatten()).view(b, h)
        ar = torch.arange(int(cap.max()) if cap.numel() else 0, device=start.device)
        ok = ar < cap[..., None]
        src, dst = (start[..., None] + ar)[ok], (new_start[..., None] + ar)[ok]
        total, d = int(cap.sum()), self.keys.shape[1]
        k, v = self.keys.new_empty(total, d), self.values.new_empty(total, d)
        p = torch.full((total,), -1, dtype=torch.int32, device=self.keys.device)
        k[dst], v[dst], p[dst] = self.keys[src], self.values[src], self.positions[src]
        return RaggedKV._with_table(k, v, p, new_start, cap, counts.clone(), 0)

    # ---- appends ------------------------------------------------------------------------------
    def capacity(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64 slots of each region (used and free)."""
        return (self.slots >= 0).sum(-1)

    def with_room(self, room: int) -> "RaggedKV":
        """A copy whose regions have exactly ``room`` free slots (grown or trimmed; the used slots
        move along, no other copy of the KV is made)."""
        b, h = self.counts.shape
        used = self.capacity() - self.room                                     # (b, h) used slots
        new_cap = used + room
        new_start = (new_cap.flatten().cumsum(0) - new_cap.flatten()).view(b, h)
        total = int(new_cap.sum())
        ar = torch.arange(int(used.max()) if used.numel() else 0, device=self.start.device)
        ok = ar < used[..., None]
        src = (self.start[..., None] + ar)[ok]
        dst = (new_start[..., None] + ar)[ok]
        d = self.keys.shape[1]
        k, v = self.keys.new_zeros(total, d), self.values.new_zeros(total, d)
        p = torch.full((total,), -1, dtype=torch.int32, device=self.keys.device)
        k[dst], v[dst], p[dst] = self.keys[src], self.values[src], self.positions[src]
        return RaggedKV._with_table(k, v, p, new_start, new_cap, self.counts.clone(), room)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, static: bool = False) -> None:
        """Write ``keys/values (batch, kv_heads, q, head_dim)`` at ``positions (batch, q)`` after
        each head's used slots (no host sync: a CUDA graph may replay it). The caller made room
        (``with_room``); ``static``: the host-side ``room`` is settled later (``SiftCache.end_static``)."""
        b, h, q, d = keys.shape
        dest = (self.start + self.counts)[..., None] + torch.arange(q, device=keys.device)   # (b, h, q)
        dest = dest.flatten()
        self.keys.index_copy_(0, dest, keys.reshape(-1, d))
        self.values.index_copy_(0, dest, values.reshape(-1, d))
        self.positions.index_copy_(0, dest, positions.to(torch.int32)[:, None, :].expand(b, h, q).reshape(-1))
        self.counts.add_(q)
        if not static:
            self.room -= q

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
        """Token entries held (all heads and rows; a host sync): what the used KV bytes count."""
        return int(self.counts.sum())

    # ---- LayerState-like protocol ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "slots": self.slots,
                "start": self.start, "counts": self.counts}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def used_bytes(self) -> int:
        return 2 * self.tokens() * self.keys.shape[-1] * self.keys.element_size()

    def clone(self, batch_repeat: int = 1) -> "RaggedKV":
        """A copy; ``batch_repeat``: each row repeated (rows ``i*n .. i*n+n-1`` copy row ``i``)."""
        if batch_repeat <= 1:
            return RaggedKV(*(t.clone() for t in self.tensors().values()), room=self.room, fill=self.fill)
        b = self.slots.shape[0]
        t = self.keys.shape[0]
        copy = (torch.arange(b * batch_repeat, device=self.slots.device) % batch_repeat) * t   # each copy's base
        start = self.start.repeat_interleave(batch_repeat, 0) + copy[:, None]
        slots = self.slots.repeat_interleave(batch_repeat, 0)
        slots = torch.where(slots >= 0, slots + copy[:, None, None].to(slots.dtype), -1)
        return RaggedKV(self.keys.repeat(batch_repeat, 1), self.values.repeat(batch_repeat, 1),
                        self.positions.repeat(batch_repeat), slots, start,
                        self.counts.repeat_interleave(batch_repeat, 0), self.room, self.fill)

    def to(self, device) -> "RaggedKV":
        return RaggedKV(*(t.to(device) for t in self.tensors().values()), room=self.room, fill=self.fill)

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RaggedKV":
        """Rebuild from :meth:`tensors` (persisted), checking the layout; the table is rebuilt from
        ``start`` and each region's capacity."""
        for name in ("keys", "values", "positions", "slots", "start", "counts"):
            if name not in t:
                raise ValueError(f"ragged KV is missing {name!r}")
        k, v, p, s, st, c = (t[x] for x in ("keys", "values", "positions", "slots", "start", "counts"))
        if k.dim() != 2 or v.shape != k.shape or tuple(p.shape) != (k.shape[0],) or s.dim() != 3 \
                or tuple(c.shape) != tuple(s.shape[:2]) or tuple(st.shape) != tuple(s.shape[:2]):
            raise ValueError(f"ragged KV: unexpected shapes {tuple(k.shape)}, {tuple(v.shape)}, {tuple(p.shape)}, "
                             f"{tuple(s.shape)}, {tuple(st.shape)}, {tuple(c.shape)}")
        if any(x.is_floating_point() for x in (p, s, st, c)):
            raise ValueError("ragged KV: slots, start, counts and positions must be integers")
        cap = (s >= 0).sum(-1)
        if bool((st < 0).any()) or bool((st + cap > k.shape[0]).any()) or bool((c > cap).any()) or \
                bool((c < 0).any()):
            raise ValueError("ragged KV: a region or a count points past the buffer")
        room = int((cap - c).min()) if c.numel() else 0
        return cls._with_table(k, v, p.to(torch.int32), st.to(torch.int64), cap, c.to(torch.int32), room)
