"""Thin KV cache: preallocated buffers plus bookkeeping, one layer per decoder layer.

Shapes: keys/values ``(batch, kv_heads, slots, head_dim)``, positions ``(batch, kv_heads, slots)``.
Positions are the logical token positions of each slot (``-1`` = padding / empty slot). The order of
slots carries no meaning: attention masks derive from positions, so methods may evict, gather or
overwrite slots freely.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsift.cache.quant import QuantKV
from kvsift.cache.ragged import RaggedKV
from kvsift.kernels.dispatch import kv_append

RAGGED_SAVING = 0.9
"""``keep`` stores per-head kept lengths compactly (:class:`RaggedKV`) when that holds at most this
fraction of the padded layout's token entries."""


class SiftLayer(CacheLayerMixin):
    """One decoder layer's KV: buffers ``k_buf``/``v_buf``/``pos_buf`` with ``length`` used slots."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "SiftCache", layer_idx: int):
        super().__init__()
        # a weak reference: no layer <-> cache cycle, so a finished generation's KV (GiBs at long
        # context) is freed at once, not at the next garbage collection
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.pos_buf: torch.Tensor | None = None
        self.length = 0
        # static decode (see SiftCache.begin_static): the next write slot, a (1,) int64 device tensor
        self.wslot: torch.Tensor | None = None
        # per-layer method state: method name -> LayerState (typed: clone, nbytes, repeat_batch,
        # kv_state_dict / kv_from_state_dict, offloaded); the engine only calls those
        self.state: dict[str, Any] = {}
        # kept KV whose length differs per head, stored compactly (kvsift.cache.ragged); the buffers
        # above then hold only what came after (decode tokens, a context's question)
        self.ragged: RaggedKV | None = None
        # quantized KV (kvsift.cache.quant, e.g. kivi): every slot's KV lives there (and new tokens
        # go there); the buffers above stay empty
        self.quant: QuantKV | None = None
        # some used slot is a hole (position -1 inside the used length): attention needs the mask
        self.holes = False
        # a reused context's KV read by reference (SiftCache.share): (keys (batch, kv_heads, n,
        # head_dim), values, positions (batch, kv_heads, n)) with the batch expanded from the context's
        # one row (stride 0, whatever the batch: no copy), attended by every row besides the buffers
        # above, which hold only what came after (the question, the answer). Read-only: the context
        # stays as it was. Every slot holds finite values (a hole's are zeros), so readers need not
        # zero empty slots (see shared_rows)
        self.prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def offloaded(self) -> bool:
        """Part of this layer's KV lives outside its buffer (e.g. sentencekv's host store): attention
        needs the method's selection during prefill too (a reused context)."""
        return any(getattr(v, "offloaded", False) for v in self.state.values())

    def prefix_source(self):
        """The shared prefix as a :class:`~kvsift.methods.base.SlotSource` over all its slots (for
        the paths that gather copies: a prefill chunk, soft-capped logits)."""
        from kvsift.methods.base import SlotSource

        k, v, p = self.prefix
        slots = torch.arange(p.shape[2], device=p.device, dtype=torch.int64).expand(p.shape)
        return SlotSource(k, v, p, slots)

    def prefix_nbytes(self) -> int:
        """Bytes of the shared prefix's one stored row (0 without one)."""
        return 0 if self.prefix is None else sum(t[:1].numel() * t.element_size() for t in self.prefix)

    @property
    def cache(self) -> "SiftCache":
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this SiftLayer's SiftCache was freed")
        return cache

    # ---- views -------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:  # (batch, kv_heads, length, head_dim)
        return None if self.k_buf is None else self.k_buf[:, :, : self.length]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        if value is not None:
            raise AttributeError("SiftLayer.keys is a view; use set_kv()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v_buf is None else self.v_buf[:, :, : self.length]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("SiftLayer.values is a view; use set_kv()")

    @property
    def positions(self) -> torch.Tensor | None:  # (batch, kv_heads, length) int32
        return None if self.pos_buf is None else self.pos_buf[:, :, : self.length]

    # ---- transformers hooks ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, d = key_states.shape
        cap = max(q, self.cache.capacity_hint)
        self._alloc(b, h, cap, d, key_states.dtype, key_states.device)
        self.is_initialized = True

    def _alloc(self, b, h, cap, d, dtype, device):
        self.k_buf = torch.empty(b, h, cap, d, dtype=dtype, device=device)
        self.v_buf = torch.empty(b, h, cap, d, dtype=dtype, device=device)
        self.pos_buf = torch.full((b, h, cap), -1, dtype=torch.int32, device=device)
        self.dtype, self.device = dtype, device

    def _ensure_capacity(self, needed: int, exact: bool = False) -> None:
        """Room for ``needed`` slots: grown by half at least, or (``exact``: every slot that will be
        needed is known) to ``needed``."""
        cap = self.k_buf.shape[2]
        if needed <= cap:
            return
        new_cap = needed if exact else max(needed, int(math.ceil(cap * 1.5)) + 16)
        b, h, _, d = self.k_buf.shape
        k, v, p = self.k_buf, self.v_buf, self.pos_buf
        self._alloc(b, h, new_cap, d, k.dtype, k.device)
        self.k_buf[:, :, : self.length] = k[:, :, : self.length]
        self.v_buf[:, :, : self.length] = v[:, :, : self.length]
        self.pos_buf[:, :, : self.length] = p[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(batch, kv_heads, q, head_dim)`` new states at the cache's step positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.ragged is not None:  # compact per-head KV: append after each head's tokens
            q = key_states.shape[2]
            if not self.cache.static and self.ragged.room < q:
                self.ragged = self.ragged.with_room(q + self.cache.reserve)
            self.ragged.append(key_states, value_states, self.cache.step_positions, static=self.cache.static)
            return self.keys, self.values
        if self.quant is not None:  # quantized KV: append there (device-side during static decode)
            self.quant.append(key_states, value_states, self.cache.step_positions, step=self.cache.static_step)
            return self.keys, self.values
        if self.wslot is not None:
            # static decode: write at a device-side slot and return the whole buffers; no host state
            # changes, so a CUDA graph can replay it (empty slots have position -1 and are masked)
            # (one launch on CUDA: key, value, position, then the slot advanced)
            kv_append(self.k_buf, self.v_buf, self.pos_buf, self.wslot, key_states, value_states,
                      self.cache.step_positions)
            return self.k_buf, self.v_buf
        q = key_states.shape[2]
        self._ensure_capacity(self.length + q)
        s, e = self.length, self.length + q
        self.k_buf[:, :, s:e].copy_(key_states)
        self.v_buf[:, :, s:e].copy_(value_states)
        self.pos_buf[:, :, s:e].copy_(self.cache.step_positions[:, None, :])
        self.length = e
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.k_buf = self.v_buf = self.pos_buf = None
        self.length = 0
        self.wslot = None
        self.ragged = None
        self.quant = None
        self.holes = False
        self.prefix = None
        self.state.clear()
        self.is_initialized = False

    # ---- method helpers ------------------------------------------------------------------------
    def set_kv(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, reserve: int | None = None,
               holes: bool | None = None):
        """Replace the content by ``keys/values (batch, kv_heads, n, head_dim)`` and ``positions
        (batch, kv_heads, n)``; the new buffers hold ``n + reserve`` slots (reserve defaults to the
        cache's decode reserve), so the old, larger buffers are really freed. ``holes``: whether any
        position is -1, where the caller knows it (None: read from ``positions``, a device sync)."""
        b, h, n, d = keys.shape
        reserve = self.cache.reserve if reserve is None else reserve
        self._alloc(b, h, n + reserve, d, keys.dtype, keys.device)
        self.k_buf[:, :, :n] = keys
        self.v_buf[:, :, :n] = values
        self.pos_buf[:, :, :n] = positions
        self.length = n
        self.holes = (bool((positions < 0).any()) if holes is None else holes) if n else False
        self.is_initialized = True

    def set_quant_rows(self, rows: list) -> None:
        """Stack quantized rows (one :class:`~kvsift.cache.quant.QuantKV` per sequence, prefilled and
        quantized one at a time, or rows of a running batch that requests join, :meth:`QuantKV.row
        <kvsift.cache.quant.QuantKV.row>`) into this layer's quantized store, with the cache's decode
        reserve (:meth:`QuantKV.join <kvsift.cache.quant.QuantKV.join>`: rows of other lengths keep
        their own windows); the layer's own buffers stay empty."""
        self.quant = QuantKV.join(rows, room=self.cache.reserve)
        b, h, _, d = self.quant.k_res.shape
        rows.clear()
        self._alloc(b, h, 0, d, self.quant.k_res.dtype, self.quant.k_res.device)
        self.length = 0
        self.holes = False
        self.is_initialized = True

    def set_rows(self, rows: list) -> bool:
        """Stack one ``(keys (1, kv_heads, n_i, head_dim), values, positions (1, kv_heads, n_i),
        ragged)`` per batch row (sequences prefilled one at a time) into this layer's buffers,
        shorter rows padded with position -1 (``ragged``: the row's compact per-head KV or None; if
        any row has one, every row's KV goes to one compact batch store); each row's entry is
        dropped from ``rows`` once copied (its memory can go). Returns True when padding was added.
        Rows that are quantized stores (a running batch's quantized rows, :func:`QuantKV.row`) go to
        :meth:`set_quant_rows`."""
        if self.quant is not None:
            raise RuntimeError("quantized KV cannot be stacked row by row")
        if rows and all(isinstance(r, QuantKV) for r in rows):
            self.set_quant_rows(rows)
            return True
        if any(r[3] is not None for r in rows):
            if any(r[3] is not None and r[0].shape[2] > 0 for r in rows):
                raise RuntimeError("a row holds both compact per-head KV and buffered KV at prefill end")
            self.ragged = RaggedKV.stack([r[3] if r[3] is not None else RaggedKV.from_dense(*r[:3]) for r in rows])
            k0 = rows[0][0]
            b, h, d = len(rows), k0.shape[1], k0.shape[3]
            rows.clear()
            self._alloc(b, h, 0, d, k0.dtype, k0.device)
            self.length = 0
            self.is_initialized = True
            return True
        k0 = rows[0][0]
        _, h, _, d = k0.shape
        m = max(r[0].shape[2] for r in rows)
        self._alloc(len(rows), h, m + self.cache.reserve, d, k0.dtype, k0.device)
        padded = False
        for i in range(len(rows)):
            k, v, p = rows[i][:3]
            n = k.shape[2]
            self.k_buf[i, :, :n] = k[0]
            self.v_buf[i, :, :n] = v[0]
            self.pos_buf[i, :, :n] = p[0]
            if n < m:  # padding must hold finite numbers: a masked key still multiplies its value by 0
                self.k_buf[i, :, n:m] = 0
                self.v_buf[i, :, n:m] = 0
                padded = True
            rows[i] = None
        self.length = m
        self.is_initialized = True
        return padded

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only slots ``idx (batch, kv_heads, k)`` (in that order); ``-1`` entries are none, so
        kept lengths may differ per (batch, kv_head). When they differ enough that a compact layout
        holds at most :data:`RAGGED_SAVING` of the padded one, the kept KV moves to ``self.ragged``
        (no padding back to the longest head; the buffers then start empty, for what comes next);
        otherwise the shorter heads' missing slots become holes (position -1, zero KV)."""
        if self.quant is not None:
            raise RuntimeError("evicting from quantized KV is not supported: the quantizing stage comes last "
                               "(e.g. snapkv+kivi)")
        d = self.k_buf.shape[-1]
        hole = idx < 0
        if self.ragged is None and bool(hole.any()):
            lens = (~hole).sum(-1)
            padded = lens.shape[0] * lens.shape[1] * int(lens.max())
            if int(lens.sum(-1).max()) * lens.shape[0] <= RAGGED_SAVING * padded:
                self.ragged = RaggedKV.build(self.keys, self.values, self.positions, idx, room=self.cache.reserve)
                b, h = lens.shape
                self.set_kv(self.k_buf.new_zeros(b, h, 0, d), self.v_buf.new_zeros(b, h, 0, d),
                            self.pos_buf.new_zeros(b, h, 0), reserve=0)
                return
        safe = idx.clamp(min=0)
        gi = safe[..., None].expand(*idx.shape, d)
        k, v, p = self.keys.gather(2, gi), self.values.gather(2, gi), self.positions.gather(2, safe)
        self.set_kv(k.masked_fill(hole[..., None], 0), v.masked_fill(hole[..., None], 0), p.masked_fill(hole, -1))

    def truncate(self, n: int) -> None:
        """Drop every slot from ``n`` on (e.g. a reread pass's tokens); their positions become -1, so
        a static decode reading the whole buffer never sees them."""
        if self.ragged is not None or self.quant is not None:
            raise RuntimeError("truncating compact per-head or quantized KV is not supported")
        if self.k_buf is not None and n < self.length:
            self.pos_buf[:, :, n:self.length] = -1
            self.length = n

    def head_lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64: tokens really held per head (slots with a position >= 0, and
        the compact per-head part)."""
        n = (self.positions >= 0).sum(-1)
        if self.quant is not None:
            n = n + self.quant.head_lengths()
        return n if self.ragged is None else n + self.ragged.head_lengths()

    def written_slots(self, q: int) -> torch.Tensor:
        """``(q,)`` int64 device slots the last ``update`` wrote (static decode: from the device slot
        counter, no host sync)."""
        if self.ragged is not None:
            raise RuntimeError("a layer of compact per-head KV has no common write slot")
        if self.quant is not None:
            return self.quant.written_slots(q)
        if self.wslot is not None:
            return self.wslot - 1 if q == 1 else self.wslot - q + torch.arange(q, device=self.wslot.device)
        return torch.arange(self.length - q, self.length, device=self.k_buf.device)

    # ---- quantized KV ----------------------------------------------------------------------------
    def quantize(self, bits: int, group: int, residual: int) -> None:
        """Move the used slots into a :class:`~kvsift.cache.quant.QuantKV` (same slot numbers; the
        newest 1 .. ``residual`` tokens stay in full precision), with room for the cache's decode
        reserve; the layer's own buffers are then empty and new tokens go to the store."""
        if self.quant is not None:
            return
        if self.ragged is not None:
            raise RuntimeError("compact per-head KV cannot be quantized")
        if self.wslot is not None:
            raise RuntimeError("cannot quantize during static decode")
        b, h, _, d = self.k_buf.shape
        self.quant = QuantKV.from_dense(self.keys, self.values, self.positions, bits, group, residual,
                                        room=self.cache.reserve)
        self.set_kv(self.k_buf.new_zeros(b, h, 0, d), self.v_buf.new_zeros(b, h, 0, d),
                    self.pos_buf.new_zeros(b, h, 0), reserve=0)

    @property
    def slot_capacity(self) -> int:
        """Slots a method's selection may name: the buffer's capacity (or the quantized store's)."""
        return self.quant.capacity if self.quant is not None else self.k_buf.shape[2]

    def slot_keys(self, slots: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Keys at ``slots (s,)`` int64 device slots ``(batch, kv_heads, s, head_dim)``; without
        ``slots``, ``(keys, positions)`` of the used slots (static decode: of the whole buffer, whose
        unwritten slots hold position -1, since ``length`` catches up only when it ends). Quantized
        slots come dequantized (a copy), so decode-time selection (Quest) reads either layout."""
        if self.quant is not None:
            if slots is None:
                k, _, p = self.quant.dense()
                return k, p
            return self.quant.slot_keys(slots)
        if slots is None:
            return (self.k_buf, self.pos_buf) if self.wslot is not None else (self.keys, self.positions)
        return self.k_buf.index_select(2, slots)

    def replace_oldest(self, limit: int, protect_below: int = 0) -> None:
        """While more than ``limit`` slots are used, move the newest slot into the slot holding the
        oldest unprotected token (position >= ``protect_below``; padding goes first). O(slots) per
        token, no buffer copy: StreamingLLM's rolling window."""
        while self.length > limit:
            pos = self.pos_buf[:, :, : self.length - 1].to(torch.int64)
            big = torch.iinfo(torch.int64).max
            pos = torch.where((pos >= 0) & (pos < protect_below), big, pos)
            self.replace_slot(pos.argmin(-1, keepdim=True))

    def replace_slot(self, victim: torch.Tensor) -> None:
        """Evict the tokens at slots ``victim (batch, kv_heads, 1)`` int64: the newest slot moves into
        each victim's slot (a victim may be the newest slot itself) and ``length`` drops by one. No
        buffer copy; a method's per-slot state follows with the same scatter."""
        last = self.length - 1
        vi = victim[..., None].expand(*victim.shape, self.k_buf.shape[-1])
        self.k_buf.scatter_(2, vi, self.k_buf[:, :, last : last + 1])
        self.v_buf.scatter_(2, vi, self.v_buf[:, :, last : last + 1])
        self.pos_buf.scatter_(2, victim, self.pos_buf[:, :, last : last + 1])
        self.pos_buf[:, :, last] = -1  # a slot past the used ones is empty (a static read masks it)
        self.length = last

    def nbytes(self) -> int:
        if self.k_buf is None:
            return 0
        r = self.ragged.nbytes() if self.ragged is not None else 0
        r += self.quant.nbytes() if self.quant is not None else 0
        return r + sum(t.numel() * t.element_size() for t in (self.k_buf, self.v_buf, self.pos_buf))

    def used_bytes(self) -> int:
        if self.k_buf is None:
            return 0
        b, h, _, d = self.k_buf.shape
        r = self.ragged.used_bytes() if self.ragged is not None else 0
        r += self.quant.used_bytes() if self.quant is not None else 0
        return r + 2 * b * h * self.length * d * self.k_buf.element_size()


def shared_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t``'s first row seen as ``rows`` rows (batch stride 0, even for one row: no copy; readers
    tell such shared KV by that stride)."""
    return t[:1].as_strided((rows, *t.shape[1:]), (0, *t.stride()[1:]))


class SiftCache(Cache):
    """The KV cache kvsift's engine passes to transformers models.

    ``seen`` is the number of logical tokens processed so far (positions derive from it, never
    from ``cache_position`` kwargs). ``step_positions (batch, q)`` are the positions of the tokens
    of the forward pass in flight (-1 for left padding); the engine sets them before each call.
    ``capacity_hint`` sizes the first allocation (prompt + decode reserve) so decode writes in place.
    """

    def __init__(self, num_layers: int, capacity_hint: int = 0, reserve: int = 0):
        self.capacity_hint = capacity_hint
        self.reserve = reserve
        self.seen = 0
        self.step_positions: torch.Tensor | None = None
        self.static = False  # between begin_static and end_static
        self.static_step = 0  # static decode: the step in flight (0-based; the decode runner sets it)
        super().__init__(layers=[SiftLayer(self, i) for i in range(num_layers)])

    @property
    def is_sliding(self):
        return [False] * len(self.layers)

    @property
    def is_linear(self):
        return [False] * len(self.layers)

    @property
    def is_dummy(self):
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    # ---- static decode ------------------------------------------------------------------------
    def begin_static(self, steps: int) -> None:
        """Fix the shapes for ``steps`` decode steps of one token per sequence: every layer gets room
        for them now, and writes go to a device-side slot counter (``layer.wslot``) instead of
        ``layer.length``. Attention then reads the whole buffers, empty slots masked by position -1.
        Nothing in a step depends on host state: the step can be captured in a CUDA graph."""
        for layer in self.layers:
            if layer.k_buf is None:
                continue
            if layer.ragged is not None:  # appends go after each head's tokens, counted on the device
                if layer.ragged.room < steps:
                    layer.ragged = layer.ragged.with_room(steps)
                continue
            if layer.quant is not None:  # the quantized store writes at its own device slot
                layer.quant.begin_static(steps)
                continue
            layer._ensure_capacity(layer.length + steps, exact=True)   # static decode reads every slot
            layer.wslot = torch.tensor([layer.length], dtype=torch.int64, device=layer.k_buf.device)
        self.static = True
        self.static_step = 0

    def decode_variant(self, step: int) -> tuple:
        """The cache's kind of static step ``step``: the quantized layers whose full-precision window
        is quantized at that step (a CUDA graph per kind; ``()`` without quantized layers)."""
        return tuple(i for i, ly in enumerate(self.layers) if ly.quant is not None and ly.quant.flush_at(step))

    def end_static(self, steps: int) -> None:
        """Leave static decode after ``steps`` steps ran: the layers' lengths catch up."""
        for layer in self.layers:
            if layer.ragged is not None:
                layer.ragged.room -= steps
            if layer.quant is not None:
                layer.quant.end_static(steps)
            if layer.wslot is not None:
                layer.length += steps
                layer.wslot = None
        self.static = False

    def memory(self) -> dict[str, int]:
        """Bytes really allocated: ``device`` (compute-device buffers and method state there),
        ``host`` (host stores, e.g. offloaded chunks), ``device_used`` (used KV slots only)."""
        device = host = used = 0
        for layer in self.layers:
            device += layer.nbytes() + layer.prefix_nbytes()   # a shared prefix once, whatever the batch
            used += layer.used_bytes() + layer.prefix_nbytes()
            for v in layer.state.values():
                dev_b, host_b = v.nbytes()
                device += dev_b
                host += host_b
        return {"device": device, "host": host, "device_used": used}

    def clone(self, batch_repeat: int = 1, room: int | None = None) -> "SiftCache":
        """Deep copy (e.g. a reusable context answering a new question), optionally repeated over
        the batch dimension; ``room``: free slots per layer for what comes next (a question's tokens
        and its decode: no buffer grows by half on its first append), None: the cache's reserve."""
        new = SiftCache(len(self.layers), self.capacity_hint, self.reserve)
        new.seen = self.seen
        for src, dst in zip(self.layers, new.layers):
            if src.k_buf is None:
                continue
            rep = (lambda t: t.repeat_interleave(batch_repeat, 0)) if batch_repeat > 1 else (lambda t: t)
            # a layer of compact per-head KV keeps its new tokens there: its buffers need no room
            dst.set_kv(rep(src.keys), rep(src.values), rep(src.positions),
                       reserve=0 if src.ragged is not None or src.quant is not None
                       else self.reserve if room is None else room)
            dst.ragged = src.ragged.clone(batch_repeat) if src.ragged is not None else None
            dst.quant = src.quant.clone(batch_repeat, room) if src.quant is not None else None
            dst.holes = src.holes
            dst.state = {k: v.clone() for k, v in src.state.items()}
            if batch_repeat > 1:
                for v in dst.state.values():
                    v.repeat_batch(batch_repeat)
        return new

    def shareable(self) -> bool:
        """True when :meth:`share` applies: one row, and every layer's KV plain in its buffers (no
        compact per-head or quantized store, no method state such as offloaded chunks or summaries,
        no prefix of its own)."""
        return all(ly.k_buf is None or (ly.k_buf.shape[0] == 1 and ly.ragged is None and ly.quant is None
                                        and not ly.state and ly.prefix is None) for ly in self.layers)

    def share(self, batch_repeat: int = 1) -> "SiftCache":
        """A cache that reads this one's KV by reference (a reusable context answering
        ``batch_repeat`` questions at once): each layer's used KV becomes the new layer's read-only
        ``prefix``, its batch expanded from the one row (no copy), and the new layer's own buffers
        start empty for what comes next. Needs :meth:`shareable`."""
        if not self.shareable():
            raise ValueError("only a one-row cache of plain KV can be shared (use clone)")
        new = SiftCache(len(self.layers), self.capacity_hint, self.reserve)
        new.seen = self.seen
        b = batch_repeat
        for src, dst in zip(self.layers, new.layers):
            if src.k_buf is None:
                continue
            k, v, p = src.keys, src.values, src.positions
            dst.prefix = tuple(shared_rows(t, b) for t in (k, v, p))
            _, h, _, d = k.shape
            dst.set_kv(k.new_empty(b, h, 0, d), v.new_empty(b, h, 0, d), p.new_empty(b, h, 0))
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of the used slots (for safetensors): ``layers.{i}.keys|values|positions``."""
        out = {}
        for i, layer in enumerate(self.layers):
            if layer.k_buf is not None:
                out[f"layers.{i}.keys"] = layer.keys.contiguous()
                out[f"layers.{i}.values"] = layer.values.contiguous()
                out[f"layers.{i}.positions"] = layer.positions.contiguous()
                if layer.ragged is not None:
                    out.update({f"layers.{i}.ragged.{k}": t.contiguous() for k, t in layer.ragged.tensors().items()})
                if layer.quant is not None:
                    out.update({f"layers.{i}.quant.{k}": t.contiguous() for k, t in layer.quant.tensors().items()})
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], num_layers: int, seen: int, reserve: int = 0,
                        device: torch.device | str | None = None) -> "SiftCache":
        cache = cls(num_layers, reserve=reserve)
        cache.seen = seen
        for i, layer in enumerate(cache.layers):
            if f"layers.{i}.keys" in tensors:
                t = {k: tensors[f"layers.{i}.{k}"] for k in ("keys", "values", "positions")}
                if device is not None:
                    t = {k: v.to(device) for k, v in t.items()}
                layer.set_kv(t["keys"], t["values"], t["positions"].to(torch.int32))
                pre = f"layers.{i}.ragged."
                rag = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                if rag:
                    r = RaggedKV.from_tensors(rag)
                    if r.slots.shape[1] != t["keys"].shape[1] or r.keys.shape[1] != t["keys"].shape[3] \
                            or r.slots.shape[0] != t["keys"].shape[0]:
                        raise ValueError(f"layer {i}: ragged KV does not match the layer's shape")
                    layer.ragged = r.to(layer.k_buf.device)
                pre = f"layers.{i}.quant."
                qt = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                if qt:
                    if layer.length or rag:
                        raise ValueError(f"layer {i}: quantized KV comes with empty buffers and no compact KV")
                    z = QuantKV.from_tensors(qt, device=layer.k_buf.device, room=reserve)
                    if z.k_res.shape[:2] != t["keys"].shape[:2] or z.head_dim != t["keys"].shape[3]:
                        raise ValueError(f"layer {i}: quantized KV does not match the layer's shape")
                    layer.quant = z
        return cache
