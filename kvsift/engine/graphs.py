"""The CUDA-graph cache of the :class:`~kvsift.engine.runner.ModelRunner`: decode-step graphs, held by
the runner (not by one generation) and looked up by batch-size bucket, kind of step and layout.

A graph replays the kernels it recorded over the exact memory it recorded them on: the static
input buffers (token ids and positions of one step) and the KV buffers and method counters of the
cache it ran over. So an entry is keyed by

* ``bucket``: the batch size rounded up to one of :data:`GRAPH_BUCKETS` (:func:`batch_bucket`); the
  static input buffers are the runner's, one pair per bucket and device, reused by every
  generation (:meth:`GraphCache.inputs`);
* ``kind``: ``method.decode_variant(run, step)`` (steps of different kinds run different code);
* ``layout``: a token naming the memory the graph reads besides its inputs, i.e. the cache the
  step runs over (:func:`layout_token`). Entries of a layout leave the cache when that memory
  does (:meth:`GraphCache.release`), so a graph is never replayed over freed or foreign memory.

Today every generation has a cache of its own, so its layout (and its graphs) end with it; a
generation whose cache lives in runner-owned buffers of a bucket (a KV arena reused across
requests, see docs/DESIGN.md, "Engine roles") would find the graphs recorded by an earlier one.
The bookkeeping (buckets, LRU, hits, captures, releases) is plain Python and tested on CPU with
stand-in entries; recording itself needs CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(n: int, buckets: tuple[int, ...] = GRAPH_BUCKETS) -> int | None:
    """The smallest bucket holding ``n`` rows, or None when ``n`` is larger than every bucket
    (such a batch decodes statically, without a graph)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {n!r}")
    return next((b for b in buckets if b >= n), None)


def layout_token(obj: Any) -> tuple[str, int]:
    """The layout of a graph's memory: the identity of the object owning it (a cache)."""
    return (type(obj).__name__, id(obj))


@dataclass(slots=True)
class GraphEntry:
    """One recorded step: ``graph`` (a ``torch.cuda.CUDAGraph``, or a stand-in in tests) and the
    buffer its logits land in."""

    graph: Any
    logits: Any = None
    replays: int = 0


@dataclass(slots=True)
class GraphStats:
    captures: int = 0     # graphs recorded
    hits: int = 0         # lookups that found a graph
    misses: int = 0       # lookups that did not
    evicted: int = 0      # entries dropped by the LRU bound
    released: int = 0     # entries dropped with their layout


@dataclass(slots=True)
class GraphCache:
    """Decode graphs by ``(bucket, kind, layout)``, least recently used first out past
    ``max_graphs``. One per :class:`~kvsift.engine.runner.ModelRunner`."""

    max_graphs: int = 64
    buckets: tuple[int, ...] = GRAPH_BUCKETS
    stats: GraphStats = field(default_factory=GraphStats)
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _inputs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.max_graphs, bool) or not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {self.max_graphs!r}")
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing integers >= 1, got {self.buckets!r}")

    def bucket(self, n: int) -> int | None:
        return batch_bucket(n, self.buckets)

    @staticmethod
    def key(bucket: int, kind: Hashable, layout: Hashable) -> tuple:
        return (bucket, kind, layout)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key) -> GraphEntry | None:
        """The entry of ``key`` (now the most recently used), counting the hit or miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        entry.replays += 1
        return entry

    def put(self, key, entry: GraphEntry) -> None:
        """Keep a newly recorded entry (counted as a capture); the least recently used go past the bound."""
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self.stats.captures += 1
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
            self.stats.evicted += 1

    def release(self, layout: Hashable) -> int:
        """Drop the entries recorded over ``layout`` (its memory is going away); returns how many."""
        gone = [k for k in self._entries if k[2] == layout]
        for k in gone:
            del self._entries[k]
        self.stats.released += len(gone)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self._inputs.clear()

    def inputs(self, bucket: int, device: torch.device,
               make: Callable[[int, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = None):
        """The static input buffers ``(token ids, positions)``, ``(bucket, 1)`` each, of ``bucket`` on
        ``device``: made once, reused by every generation's graphs of that bucket."""
        k = (bucket, str(device))
        got = self._inputs.get(k)
        if got is None:
            if make is None:
                got = (torch.zeros(bucket, 1, dtype=torch.long, device=device),
                       torch.zeros(bucket, 1, dtype=torch.int32, device=device))
            else:
                got = make(bucket, device)
            self._inputs[k] = got
        return got


def capacity_bucket(n: int, floor: int = 256) -> int:
    """Slots of a KV arena holding ``n`` tokens per row: the next power of two (at least ``floor``),
    so that generations of nearby lengths share one arena and its graphs."""
    if n < 1:
        raise ValueError(f"capacity must be >= 1 token, got {n}")
    return max(floor, 1 << (n - 1).bit_length())


class KVArena:
    """Runner-owned static KV of one ``(bucket, capacity)``: the memory decode graphs of that shape are
    recorded on, so that a later generation replays them instead of recording its own.

    ``cache`` is a :class:`~kvsift.cache.SiftCache` of ``bucket`` rows and ``capacity`` slots per
    layer, in static mode for good (device-side write slots that stay the same tensors). ``load``
    copies a generation's prefilled dense KV into its first rows and empties everything else
    (positions -1, zero KV: a masked key must still hold finite numbers), so earlier generations'
    tokens are never seen. Only for caches of plain dense KV (``full``: no method state, no compact
    per-head KV), one generation at a time (the runner's lock). A running batch whose rows change
    (continuous batching) and stay in this arena's bucket is changed in place (:meth:`restack`): its
    cache then is the arena's own, which :meth:`ModelRunner.arena_for` hands back without a load."""

    def __init__(self, num_layers: int, bucket: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        from kvsift.cache import SiftCache

        self.bucket, self.capacity = bucket, capacity
        self.cache = SiftCache(num_layers)
        for layer in self.cache.layers:
            layer._alloc(bucket, kv_heads, capacity, head_dim, dtype, device)
            layer.k_buf.zero_()
            layer.v_buf.zero_()
            layer.is_initialized = True
            layer.wslot = torch.zeros(1, dtype=torch.int64, device=device)
        self.cache.static = True
        self.loads = 0   # batches loaded into this arena (the runner counts over all its arenas too)

    @staticmethod
    def fits(cache, rows: int, bucket: int, capacity: int) -> bool:
        """Whether ``cache`` (``rows`` sequences) can be loaded into an arena of that shape."""
        return rows <= bucket and all(
            ly.k_buf is not None and ly.ragged is None and ly.prefix is None and not ly.state
            and ly.length <= capacity
            for ly in cache.layers)

    def load(self, src, rows: int) -> None:
        """Put the dense KV of ``src`` (``rows`` sequences) in the arena's first rows; empty the rest."""
        for s, d in zip(src.layers, self.cache.layers):
            n = s.length
            if s.k_buf.shape[1:2] != d.k_buf.shape[1:2] or s.k_buf.shape[3] != d.k_buf.shape[3]:
                raise ValueError("the cache's layer shapes do not match the arena's")
            d.k_buf[:rows, :, :n].copy_(s.k_buf[:, :, :n])
            d.v_buf[:rows, :, :n].copy_(s.v_buf[:, :, :n])
            d.pos_buf[:rows, :, :n].copy_(s.pos_buf[:, :, :n])
            d.k_buf[:rows, :, n:].zero_()
            d.v_buf[:rows, :, n:].zero_()
            d.pos_buf[:rows, :, n:].fill_(-1)
            d.k_buf[rows:].zero_()
            d.v_buf[rows:].zero_()
            d.pos_buf[rows:].fill_(-1)
            d.length = n
            d.holes = s.holes
            d.wslot.fill_(n)
        self.cache.seen = src.seen
        self.loads += 1

    def write_slot(self) -> int:
        """The slot the next decode step writes (every row and layer alike; one device sync)."""
        return int(self.cache.layers[0].wslot)

    def restack(self, keep: list[int], rows: list[list[tuple]], rows_before: int, w: int) -> None:
        """Change the batch's rows in place, without a copy of the rows that stay where they are:
        row ``j`` becomes old row ``keep[j]`` (a move only where ``keep[j] != j``), then the new rows
        follow, ``rows[t]`` one per layer as ``(keys, values, positions)`` of ``(1, kv_heads, m,
        head_dim)`` / ``(1, kv_heads, m)`` (its used slots), right-aligned before the write slot ``w``
        (:meth:`write_slot`, read by the caller; slots before them: position -1, zero KV) so they
        decode on at ``w`` with the others; the old rows past the new batch get position -1 up to
        ``w`` (a batch row past it reads nothing). The rows must fit (at most ``bucket``, each new row
        at most ``w`` slots)."""
        n_new = len(keep) + len(rows)
        if n_new > self.bucket or any(r[0][0].shape[2] > w for r in rows):
            raise ValueError("the rows do not fit this arena in place")
        for li, d in enumerate(self.cache.layers):
            for j, r in enumerate(keep):   # ascending: a source row is never overwritten before it moves
                if r != j:
                    d.k_buf[j, :, :w].copy_(d.k_buf[r, :, :w])
                    d.v_buf[j, :, :w].copy_(d.v_buf[r, :, :w])
                    d.pos_buf[j, :, :w].copy_(d.pos_buf[r, :, :w])
            for t, row in enumerate(rows):
                k, v, pos = row[li][:3]
                i, m = len(keep) + t, k.shape[2]
                d.k_buf[i, :, : w - m].zero_()
                d.v_buf[i, :, : w - m].zero_()
                d.pos_buf[i, :, : w - m].fill_(-1)
                d.k_buf[i, :, w - m: w].copy_(k[0])
                d.v_buf[i, :, w - m: w].copy_(v[0])
                d.pos_buf[i, :, w - m: w].copy_(pos[0])
            if rows_before > n_new:
                d.pos_buf[n_new:rows_before, :, :w].fill_(-1)
            d.holes = True
