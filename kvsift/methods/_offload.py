"""Host-memory chunk store with a device-side LRU cache of chunks (used by ``sentencekv``).

One :class:`ChunkStore` per decoder layer holds the offloaded KV in a chunk-padded layout

* host ``k, v``: ``(batch * kv_heads * T + 1, head_dim)`` in CPU memory (page-locked when the
  compute device is CUDA): (batch, kv_head) row ``r`` owns host rows ``[r*T, r*T + used[r])``, its
  tokens one chunk after the other, no padding; the last row is a zero pad row. Host ``pos``:
  ``(batch * kv_heads * T + 1,)`` int32 (pad: -1). One batch row's tokens are one contiguous block,
  so a prefill writes them with one device-to-host copy;
* device ``starts, lens``: ``(batch, kv_heads, chunks)`` first token and length of each chunk per
  KV head, ``mean`` ``(batch, kv_heads, chunks, head_dim)`` the mean key of each chunk (its
  semantic vector), and optionally Quest bounds ``kmin, kmax`` of the same shape.

Quantized (``bits`` 4 or 2, a composition ending with ``kivi``): host ``k, v`` hold packed codes
``(rows, head_dim * bits // 8)`` uint8; values are quantized per token (host ``vsz (rows, 2,
head_dim // vgroup)`` fp16 scale and zero), keys per chunk and channel (device ``ksz (batch,
kv_heads, chunks, 2, head_dim)``: the chunk is the group). Fetches dequantize on the device (the
device chunk cache holds full precision): on CUDA one UVA kernel reads the misses' codes, value
scales and positions (a quarter of the bytes at int4) and writes them dequantized into their cache
rows, with no staging and no host sync, so a CUDA graph can hold the step (``_uva_dequant``);
elsewhere they go through the host path.

Chunk lengths may differ per KV head (after a prefill eviction such as SnapKV each head keeps
different tokens). Fetched chunks come back padded to ``L`` (the longest chunk allowed) with
position ``-1`` on the padding, which attention masks.

:meth:`ChunkStore.fetch` brings selected chunks to the compute device. Without a device cache it
gathers the rows on the host and copies them; with one (``cache_chunks > 0``) it keeps the most
recently used chunks of every (batch, kv_head) on the device and copies only the misses
(``cache_chunks < 0``: sized to twice the first step's selection). On CUDA
the misses are copied by one Triton kernel that reads the pinned host rows directly (unified
virtual addressing, :mod:`kvsift.kernels.chunk_fetch`): the whole fetch, LRU bookkeeping included,
stays on the device with no host sync. Without Triton (or with ``KVSIFT_NO_UVA=1``) the host
gathers the rows into a pinned staging buffer and the copy runs on a side stream (one host sync
per fetch for the miss list).

Shared host rows (a reusable context answering questions): :meth:`ChunkStore.clone` and
:meth:`ChunkStore.repeat_batch` copy no host KV. A clone reads the same host tensors; a batch-1
store repeated over ``b`` questions maps every new (batch, kv_head) row onto the context's row of
its KV head by folding the offset into ``starts`` (row ``r`` reads host rows ``r*T + starts``, so
``starts`` of a mapped row point back into the first block; the fetch kernels need no change).
Such a store is ``shared``: before anything writes its host rows (an append, persistence) it makes
them its own (:meth:`ChunkStore.own_host`, the copy the clone did not make).

Values only (``keys=False``, ``shadowkv``): the host holds values and positions, no keys (the method
rebuilds them on the device); the key summaries (``mean``, bounds) are still computed from the keys
``append`` is given. Fetches return ``None`` for the keys (direct fetches only: no device chunk
cache; on CUDA the UVA kernel copies the values alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvsift.cache.host import capturing, pinned_empty
from kvsift.cache.quant import SCALE_DTYPE, coded_token_bytes, codes_of, quantize_values, range_params
from kvsift.kernels import chunk_fetch as _cf
from kvsift.kernels._triton import HAS_TRITON, triton_disabled


@dataclass(slots=True)
class FetchStats:
    """Counters over all layers of a generation. ``chunks`` may be a device tensor (accumulated
    without a host sync); :meth:`value` reads any counter as a Python number."""

    calls: Any = 0             # fetch calls (layers x decode steps); device-counted, see count_call
    head_calls: Any = 0        # fetch calls x batch x kv_heads
    chunks: Any = 0            # chunk selections, summed over (batch, kv_head)
    copied_chunks: Any = 0     # chunks copied host -> device (misses when a device cache is used)
    copied_bytes: Any = 0
    fetch_s: float = 0.0       # host wall time spent in fetch (includes the CUDA sync for misses)
    cache_lookups: Any = 0
    cache_hits: Any = 0

    _tracked: Any = None       # device (lookups, misses) counters of the device chunk caches, by id
    _chunk_bytes: int = 0
    _calls: Any = None         # device (calls, head_calls), counted in place (a replayed graph counts)
    _inc: Any = None
    _inc_heads: int = -1

    def count_call(self, heads: int, device: torch.device) -> None:
        """One more fetch over ``heads`` (batch x kv_heads) rows, counted on the device (one launch,
        no host state: a replayed CUDA graph keeps counting). The increment tensor is made on the
        first call, which never runs inside a graph recording (the engine warms each step up)."""
        if self._calls is None or self._calls.device != device:
            self._calls = torch.zeros(2, dtype=torch.int64, device=device)
            self._inc = None
        if self._inc is None or self._inc_heads != heads:
            self._inc = torch.tensor([1, heads], dtype=torch.int64, device=device)
            self._inc_heads = heads
        self._calls.add_(self._inc)

    def track(self, counts: torch.Tensor, chunk_bytes: int, cached: bool = True) -> None:
        """Count a device ``(lookups, misses)`` tensor that fetches update in place (no host sync, no
        launch; a replayed CUDA graph keeps counting): a device chunk cache's, or with
        ``cached=False`` a direct fetch's (every chunk copied, no cache lookups). Its values at the
        first call are the baseline."""
        if self._tracked is None:
            self._tracked = {}
        if id(counts) not in self._tracked:
            self._tracked[id(counts)] = (counts, counts.clone(), cached)
        self._chunk_bytes = chunk_bytes

    def value(self, name: str) -> float:
        if name in ("calls", "head_calls"):
            return 0 if self._calls is None else int(self._calls[0 if name == "calls" else 1])
        v = getattr(self, name)
        v = v.item() if isinstance(v, torch.Tensor) else v
        if self._tracked and name in ("chunks", "cache_lookups", "cache_hits", "copied_chunks", "copied_bytes"):
            for t, base, cached in self._tracked.values():
                lookups, misses = (int(x) for x in (t - base).tolist())
                if not cached and name in ("cache_lookups", "cache_hits"):
                    continue
                v += {"chunks": lookups, "cache_lookups": lookups, "cache_hits": lookups - misses,
                      "copied_chunks": misses, "copied_bytes": misses * self._chunk_bytes}[name]
        return v


COMPACT_SLACK = 64 << 20  # host bytes a stacked store may hold for rows that left, beyond 2x its rows' own


def uva_enabled() -> bool:
    """Whether host chunks may be fetched by the UVA copy kernel (Triton, not disabled, and not
    ``KVSIFT_NO_UVA``): the fetch that a CUDA graph can hold (the host path syncs)."""
    import os

    return HAS_TRITON and not triton_disabled() and \
        os.environ.get("KVSIFT_NO_UVA", "").strip().lower() not in {"1", "true", "yes", "on"}


class ChunkStore:
    """Offloaded chunks of one layer (see the module docstring for the layout). ``capacity``:
    tokens per (batch, kv_head) reserved at the first write (e.g. the prompt length when rows are
    written one at a time), so the host store is allocated once."""

    def __init__(self, batch: int, kv_heads: int, chunk_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, *, bounds: bool = False, cache_chunks: int = 0, pin: bool | None = None,
                 capacity: int = 0, bits: int = 0, vgroup: int = 0, keys: bool = True):
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        if bits not in (0, 2, 4) or (bits and head_dim % (vgroup or head_dim)):
            raise ValueError(f"bits must be 0, 2 or 4 and vgroup divide head_dim, got {bits}, {vgroup}")
        if not keys and (bits or cache_chunks):
            raise ValueError("a values-only store (keys=False) is neither quantized nor cached on the device")
        self.bits, self.vg = bits, (vgroup or head_dim)
        self.keys = keys     # False: the host holds values and positions only
        self.b, self.hk, self.L, self.d = batch, kv_heads, chunk_len, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.pin = (self.device.type == "cuda" and torch.cuda.is_available()) if pin is None else pin
        self.bounds = bounds
        self.cache_chunks = cache_chunks
        self.n = 0           # chunks stored
        self.T = 0           # host rows per (batch, kv_head); the store's last host row is a zero pad row
        self.capacity = capacity
        self.max_tokens = 0  # most tokens stored for one (batch, kv_head)
        hb = (batch, kv_heads, 0)
        row, rdt = ((head_dim * bits // 8,), torch.uint8) if bits else ((head_dim,), dtype)
        self.k = self._host_empty((1, *row), rdt)
        self.v = self._host_empty((1, *row), rdt)
        self.pos = self._host_empty((1,), torch.int32)
        self.vsz = self._host_empty((1, 2, head_dim // self.vg), SCALE_DTYPE) if bits else None
        self.ksz = torch.zeros((*hb, 2, head_dim), dtype=SCALE_DTYPE, device=self.device) if bits else None
        self._written = None  # CUDA event of the last asynchronous device -> host write (side stream)
        self._written_ordered = True  # the compute stream already waits for it (device side)
        self._wstream = None  # the side stream of those writes
        self._direct_counts = None  # (chunks, chunks) fetched without a device cache, device, in place
        self.used = torch.zeros(batch * kv_heads, dtype=torch.int64, device=self.device)
        self.starts = torch.zeros(hb, dtype=torch.int64, device=self.device)
        self.lens = torch.zeros(hb, dtype=torch.int32, device=self.device)
        self.mean = torch.zeros((*hb, head_dim), dtype=dtype, device=self.device)
        self.kmin = self.kmax = None
        if bounds:
            self.kmin = torch.zeros((*hb, head_dim), dtype=dtype, device=self.device)
            self.kmax = torch.zeros((*hb, head_dim), dtype=dtype, device=self.device)
        self._dev: dict[str, torch.Tensor] | None = None  # device LRU cache, built on first fetch
        self._cold_rows: list[int] = []  # batch rows a stack gave an empty cache beside carried ones
        self._stage: list[dict[str, torch.Tensor]] = []   # pinned staging buffers (CUDA)
        self._stage_events: list = []
        self._stage_i = 0
        self._stream = None
        self._uva = None  # CUDA: copy misses with the UVA kernel (None: not tried yet, False: refused)
        # host rows read from other stores' tensors (a clone, a context repeated over questions, the
        # rows of a running batch that requests joined): row r's tokens are host rows
        # row_base[r] .. row_base[r] + used[r] of host segment row_seg[r] (CPU int64 (BH,); None:
        # r*T of this store's own tensors); ``_segs``: the segments (None: k, v, pos, vsz)
        self.shared = False
        self._row_base: torch.Tensor | None = None
        self._row_seg: torch.Tensor | None = None
        self._seg_dev: torch.Tensor | None = None    # row_seg on the device
        self._segs: list[dict[str, torch.Tensor]] | None = None

    # ---- allocation ----------------------------------------------------------------------------
    @staticmethod
    def host_shapes(batch: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype, *, bits: int = 0,
                    vgroup: int = 0, keys: bool = True) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``(shape, dtype)`` of the host tensors (``k``, ``v``, ``pos``, ``vsz``) of a store of these
        options holding ``tokens`` tokens per (batch, kv_head): what it will allocate, so a caller
        can reserve the memory early (:meth:`HostPool.reserve <kvsift.cache.host.HostPool.reserve>`)."""
        rows = batch * kv_heads * tokens + 1
        row, rdt = ((head_dim * bits // 8,), torch.uint8) if bits else ((head_dim,), dtype)
        out = ([((rows, *row), rdt)] if keys else []) + [((rows, *row), rdt), ((rows,), torch.int32)]
        if bits:
            out.append(((rows, 2, head_dim // (vgroup or head_dim)), SCALE_DTYPE))
        return out

    @property
    def pad(self) -> int:
        """Index of the zero pad row of the flat host tensors (their last row)."""
        return self.pos.shape[0] - 1

    def own_host(self) -> None:
        """Make a ``shared`` store's host rows its own, one block of ``T`` rows per (batch, kv_head)
        copied from where it is read now (the tokens only), before they are written; nothing for a
        store that owns them."""
        if not self.shared:
            return
        self._host_ready()
        BH = self.b * self.hk
        base = self._row_base if self._row_base is not None else torch.arange(BH, dtype=torch.int64) * self.T
        seg = self._row_seg if self._row_seg is not None else torch.zeros(BH, dtype=torch.int64)
        segs = self._segments()
        used = self.used.cpu()
        T = self.T if self._segs is None else max(int(used.max()) if BH else 0, 1)
        ar = torch.arange(T, dtype=torch.int64)
        own = {name: self._host_empty((BH * T + 1, *t.shape[1:]), t.dtype) for name, t in segs[0].items()}
        for i, tens in enumerate(segs):
            rows = (seg == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            pad = tens["p"].shape[0] - 1
            src = torch.where(ar < used[rows, None], base[rows, None] + ar, pad).reshape(-1)
            dst = (rows[:, None] * T + ar).reshape(-1)
            for name, t in tens.items():
                own[name].index_copy_(0, dst, t.index_select(0, src))
        # addresses were r*T_old + starts; now r*T + local, local = address - base
        self.starts = self.starts + (torch.arange(BH, dtype=torch.int64) * self.T - base).to(self.device).view(
            self.b, self.hk, 1)
        self.T = T
        self.v, self.pos, self.vsz = own["v"], own["p"], own.get("s")
        if self.keys:  # (a values-only store keeps its one-row key placeholder, never written)
            self.k = own["k"]
        self.shared, self._row_base, self._row_seg, self._seg_dev, self._segs = False, None, None, None, None

    def _segments(self) -> list[dict[str, torch.Tensor]]:
        """The host tensor sets rows read from (``k, v, p`` and ``s``, as :meth:`_host_tensors`)."""
        return self._segs if self._segs is not None else [self._host_tensors()]

    def _rows_of_segment(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (device, (batch*kv_head) row of each entry) that read segment ``i``, as a bool mask."""
        return self._seg_dev[rows] == i

    def _host_empty(self, shape, dtype) -> torch.Tensor:
        """Host tensor of ``shape`` whose last row is padding (zeros; -1 for positions): padding must
        hold finite numbers, a masked key still multiplies its value by 0. Other rows are filled only
        for positions (-1 = no token); key/value rows are written before they are read."""
        t = pinned_empty(shape, dtype, self.device) if self.pin else torch.empty(shape, dtype=dtype)
        if dtype == torch.int32:
            t.fill_(-1)
        else:
            t[-1:].zero_()
        return t

    def _after_writes(self) -> None:
        """Before a kernel on the compute stream reads the host rows (UVA): order it after the
        side-stream writes still in flight (a device-side wait, no host sync; once per write, so
        the decode steps a CUDA graph records need none)."""
        if self._written is not None and not self._written_ordered:
            torch.cuda.current_stream(self.device).wait_event(self._written)
            self._written_ordered = True

    def __del__(self):
        """The host tensors go back to the pool after this: order the side-stream writes still in
        flight before the release point the pool records on the current stream (a device-side
        wait; the pool waits for that point before handing the blocks out again). Not inside a CUDA
        graph capture (the pool records no point there either: the next owner syncs the device)."""
        ev = getattr(self, "_written", None)
        if ev is not None and not getattr(self, "_written_ordered", True):
            try:
                stream = torch.cuda.current_stream(self.device)
                if not capturing(stream):
                    stream.wait_event(ev)
            except Exception:   # interpreter shutdown
                pass

    def ready(self) -> bool:
        """True when no asynchronous write to the host store is in flight (:meth:`_host_ready` would
        not wait); does not block."""
        return self._written is None or self._written.query()

    def _host_ready(self) -> None:
        """Wait for asynchronous writes to the host store before the host reads or replaces it."""
        if self._written is not None:
            self._written.synchronize()
            self._written = None

    def _grow(self, n_new: int, tokens: int) -> None:
        """Room for ``n_new`` more chunks and ``tokens`` tokens per (batch, kv_head) in all (host
        tensors are reallocated: a store normally grows once per prefill)."""
        cap = self.n + n_new
        b, hk, d = self.b, self.hk, self.d
        if tokens > self.T:
            self._host_ready()
            self._host_quiesce()
            T, newT, BH = self.T, max(tokens, self.capacity), b * hk
            names = (["k"] if self.keys else []) + ["v", "pos"] + (["vsz"] if self.bits else [])
            shapes = self.host_shapes(b, hk, newT, d, self.dtype, bits=self.bits, vgroup=self.vg, keys=self.keys)
            for name, (shape, dtype) in zip(names, shapes):   # the layout a reservation asks for
                t = self._host_empty(shape, dtype)
                if T:
                    t[:-1].view(BH, newT, *shape[1:])[:, :T] = getattr(self, name)[:-1].view(BH, T, *shape[1:])
                setattr(self, name, t)
            self.T = newT

        def dev(old, shape):
            t = torch.zeros(shape, dtype=old.dtype, device=self.device)
            t[:, :, : self.n] = old[:, :, : self.n]
            return t

        self.starts = dev(self.starts, (b, hk, cap))
        self.lens = dev(self.lens, (b, hk, cap))
        self.mean = dev(self.mean, (b, hk, cap, d))
        if self.bounds:
            self.kmin = dev(self.kmin, (b, hk, cap, d))
            self.kmax = dev(self.kmax, (b, hk, cap, d))
        if self.bits:
            self.ksz = dev(self.ksz, (b, hk, cap, 2, d))
        self._dev = None  # the slot map must be resized

    # ---- writing -------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bh: torch.Tensor,
               chunk: torch.Tensor, rank: torch.Tensor, n_new: int, row: int | None = None,
               counts: torch.Tensor | None = None, counts_dev: torch.Tensor | None = None) -> None:
        """Add ``n_new`` chunks from ``N`` tokens: ``keys/values (N, head_dim)`` and ``positions
        (N,)`` on the compute device; token ``i`` goes to (batch*kv_heads row ``bh[i]``, new chunk
        ``chunk[i]`` in ``[0, n_new)``, rank ``rank[i]`` in ``[0, L)`` inside its chunk).

        ``row=None``: the new chunks follow the stored ones in every batch row. ``row=i``: the tokens
        all belong to batch row ``i``, which must be empty, and become its chunks ``0..n_new-1``
        (sequences prefilled one at a time into one batch store); other rows are left as they are.
        ``counts``: ``(batch*kv_heads, n_new)`` int64 on the host, the tokens of each new chunk, when
        the caller knows them (then the chunk sizes and, in a fresh store, the host rows needed are
        known without reading the device); ``counts_dev``: the same already on the compute device (an
        upload from pageable host memory waits for the device's queue)."""
        if n_new <= 0:
            return
        self.own_host()  # rows read from a context's store are copied before this store writes
        if keys.shape[0] and int(counts.max() if counts is not None else rank.max() + 1) > self.L:
            raise ValueError(f"a chunk holds more than chunk_len={self.L} tokens")
        b, hk, d = self.b, self.hk, self.d
        BH = b * hk
        rs = slice(None) if row is None else slice(row, row + 1)
        if row is not None:
            if not 0 <= row < b:
                raise ValueError(f"row {row} is outside the store's batch of {b}")
            if self.n and bool(self.used[row * hk:(row + 1) * hk].any()):
                raise ValueError(f"batch row {row} of the store already holds chunks")
        base = self.n if row is None else 0
        bh, chunk, rank = bh.long(), chunk.long(), rank.long()
        rowc = bh * n_new + chunk                                       # (N,) row of (BH*n_new)
        if counts is not None:
            cnt = counts_dev if counts_dev is not None else counts.to(self.device, torch.int64)
        else:
            cnt = torch.zeros(BH * n_new, dtype=torch.int64, device=self.device)
            cnt.index_add_(0, rowc, torch.ones_like(rowc))
            cnt = cnt.view(BH, n_new)
        fresh = row is not None or self.max_tokens == 0                 # the written rows hold nothing yet
        new_starts = self.used[:, None] + cnt.cumsum(1) - cnt           # (BH, n_new) token offsets
        used = self.used + cnt.sum(1)
        # tokens per (batch, kv_head) in all: from the host counts when every row was empty
        tokens = int(counts.sum(1).max()) if counts is not None and self.max_tokens == 0 else int(used.max())
        self._grow(max(0, base + n_new - self.n), tokens)
        new = slice(base, base + n_new)
        self.starts[rs, :, new] = new_starts.view(b, hk, n_new)[rs]
        self.lens[rs, :, new] = cnt.view(b, hk, n_new)[rs].to(torch.int32)
        # semantic vectors on the device
        sums = torch.zeros(BH * n_new, d, dtype=torch.float32, device=self.device)
        sums.index_add_(0, rowc, keys.float())
        mean = sums / cnt.view(-1).clamp(min=1)[:, None].float()
        self.mean[rs, :, new] = mean.view(b, hk, n_new, d)[rs].to(self.dtype)
        if self.bounds:
            for name, how in (("kmin", "amin"), ("kmax", "amax")):
                t = torch.zeros(BH * n_new, d, dtype=torch.float32, device=self.device)
                t.scatter_reduce_(0, rowc[:, None].expand(-1, d), keys.float(), reduce=how, include_self=False)
                getattr(self, name)[rs, :, new] = t.view(b, hk, n_new, d)[rs].to(self.dtype)
        # the KV itself goes to host memory, compact (quantized: codes, value scales; key scales per
        # chunk stay on the device)
        writes = [(self.k, keys), (self.v, values), (self.pos, positions)] if self.keys else \
            [(self.v, values), (self.pos, positions)]
        if self.bits:
            lo_k = torch.full((BH * n_new, d), float("inf"), device=self.device)
            hi_k = torch.full((BH * n_new, d), float("-inf"), device=self.device)
            ix = rowc[:, None].expand(-1, d)
            lo_k.scatter_reduce_(0, ix, keys.float(), reduce="amin")
            hi_k.scatter_reduce_(0, ix, keys.float(), reduce="amax")
            ks, kz = range_params(lo_k, hi_k, self.bits)                 # (BH * n_new, d): chunk = group
            self.ksz[rs, :, new] = torch.stack([ks, kz], 1).view(b, hk, n_new, 2, d)[rs]
            n_tok = keys.shape[0]
            vc, vs, vz = quantize_values(values[None, None], torch.zeros(1, 1, n_tok, dtype=torch.int32,
                                                                          device=self.device), self.bits, self.vg)
            writes = [(self.k, codes_of(keys, ks[rowc], kz[rowc], self.bits)), (self.v, vc[0, 0]),
                      (self.pos, positions), (self.vsz, torch.stack([vs[0, 0], vz[0, 0]], 1))]
        flat = bh * self.T + new_starts.view(-1)[rowc] + rank           # (N,) host rows
        self._host_ready()
        # a later write into rows that all hold as many tokens (a prompt offloaded chunk by chunk):
        # the new tokens of each (batch, kv_head) are the host rows [u0, u1) of its block
        span = None
        if not fresh and row is None and keys.is_cuda and self.pin:
            u0, u1 = int(self.used.min()), int(used.max())
            if int(self.used.max()) == u0 and u1 > u0:
                span = (u0, u1)
        if (fresh or span is not None) and keys.is_cuda and self.pin:
            # lay the written rows out on the device and send them with asynchronous copies (slots
            # past a row's tokens are never read): the whole block of rows holding nothing yet, or
            # one slice per (batch, kv_head) of a span
            if span is None:
                lo = (0 if row is None else row * hk) * self.T
                hi = (BH if row is None else (row + 1) * hk) * self.T
                dst_rows = flat - lo
                pieces = [(slice(lo, hi), slice(None))]
            else:
                w = span[1] - span[0]
                dst_rows = bh * w + new_starts.view(-1)[rowc] + rank - span[0]
                pieces = [(slice(i * self.T + span[0], i * self.T + span[1]), slice(i * w, (i + 1) * w))
                          for i in range(BH)]
            staged = []
            for host, src in writes:
                dt = host.dtype
                rows_n = (pieces[0][0].stop - pieces[0][0].start) if span is None else BH * (span[1] - span[0])
                if span is None:
                    stage = torch.empty((rows_n, *host.shape[1:]), dtype=dt, device=self.device)
                else:  # rows a head does not fill keep the empty-row content (-1 positions, zeros)
                    stage = torch.full((rows_n, *host.shape[1:]), -1 if dt == torch.int32 else 0, dtype=dt,
                                       device=self.device)
                stage.index_copy_(0, dst_rows, src.to(dt))
                staged.append((host, stage))
            # the copies run on a side stream, overlapped with what the model computes next (the
            # next layer, the next prefill chunk); readers wait for them (_host_ready on the host,
            # _after_writes on the device)
            if self._wstream is None:
                self._wstream = torch.cuda.Stream(device=self.device)
            self._wstream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._wstream):
                for host, stage in staged:
                    for dst, part in pieces:
                        host[dst].copy_(stage[part], non_blocking=True)
                    stage.record_stream(self._wstream)   # not reused before the copy read it
                self._written = torch.cuda.Event()
                self._written.record(self._wstream)
            self._written_ordered = False
        else:
            flat = flat.cpu()
            for host, src in writes:
                host.index_copy_(0, flat, src.to("cpu", host.dtype))
        self.used = used
        self.n = max(self.n, base + n_new)
        self.max_tokens = tokens

    def max_chunks_within(self, budget: int) -> int:
        """Most chunks of one (batch, kv_head) whose lengths fit in ``budget`` tokens (the width a
        selection needs; one host sync per new budget, cached)."""
        memo = self.__dict__.setdefault("_kcap", {})
        key = (budget, self.n)
        if key not in memo:
            lens = self.lens[:, :, : self.n].to(torch.int64)
            lens = torch.where(lens > 0, lens, budget + 1).sort(dim=-1).values
            memo[key] = int((lens.cumsum(-1) <= budget).sum(-1).max()) if self.n else 0
        return memo[key]

    def summaries(self):
        """Device summaries of the stored chunks: mean keys ``(batch, kv_heads, n, head_dim)``, or
        the Quest ``(kmin, kmax)`` pair when the store keeps bounds."""
        if self.bounds:
            return self.kmin[:, :, : self.n], self.kmax[:, :, : self.n]
        return self.mean[:, :, : self.n]

    # ---- reading -------------------------------------------------------------------------------
    def fetch(self, chunk_idx: torch.Tensor, stats: FetchStats | None = None, slots: bool = False,
              cached: bool = True, compact: bool = False):
        """KV of the chunks ``chunk_idx (batch, kv_heads, k)`` (int64 on the device, ``-1`` = none)
        on the compute device: ``keys, values (batch, kv_heads, k*L, head_dim)`` and positions
        ``(batch, kv_heads, k*L)`` (``-1`` for padding and for ``-1`` entries).

        ``slots=True`` (static decode): no gathered copies; returns ``keys, values (batch, kv_heads,
        slots, head_dim)`` device buffers holding the chunks (the device chunk cache when there is
        one), their positions ``(batch, kv_heads, slots)`` and ``slot_idx (batch, kv_heads, k*L)``
        int32, the slots to read (``-1`` = none).

        ``cached=False``: through no device cache even when the store has one (a prefill chunk
        reading many chunks once: they are not worth keeping, and must not size the cache).

        ``compact=True``: a caller that reads the rows through their positions only (not as ``k``
        chunks of ``L`` slots) lets an unquantized CPU store without a device cache return just the
        chunks' tokens, each (batch, kv_head)'s first, cut to the longest one's count (:meth:`_compact_rows`;
        the width then changes from call to call)."""
        t0 = time.perf_counter()
        b, hk, k = chunk_idx.shape
        if (b, hk) != (self.b, self.hk):
            raise ValueError(f"chunk_idx {tuple(chunk_idx.shape)} does not match the store ({self.b}, {self.hk}, n)")
        if self._through_cache(cached):
            out = self._fetch_cached(chunk_idx, stats, slots)
        else:
            out = self._fetch_direct(chunk_idx, stats, compact)
            if slots:
                fk, fv, fp = out
                ar = torch.arange(fp.shape[-1], device=fp.device, dtype=torch.int32)
                out = fk, fv, fp, torch.where(fp >= 0, ar, -1)
        if stats is not None:
            stats.count_call(b * hk, chunk_idx.device)
            stats.fetch_s += time.perf_counter() - t0
        return out

    def source(self, chunk_idx: torch.Tensor, stats: FetchStats | None = None, cached: bool = True):
        """:meth:`fetch` ``(..., slots=True, compact=True)`` as a
        :class:`~kvsift.methods.base.SlotSource` read in place: on the CPU, a fetch that copies the
        chunks (no device cache) returns the selection itself, in order, so it is ``dense`` (read
        whole, not gathered again); on CUDA the kernel reads through the slot table."""
        from kvsift.methods.base import SlotSource

        dense = not self._through_cache(cached) and self.device.type == "cpu"
        return SlotSource(*self.fetch(chunk_idx, stats, slots=True, cached=cached, compact=True), dense=dense)

    def _through_cache(self, cached: bool) -> bool:
        """Whether :meth:`fetch` with ``cached`` reads through the device chunk cache."""
        return self.cache_chunks != 0 and cached

    def _token_rows(self, bh: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Host token rows of chunks: ``bh, chunk (m,)`` (``chunk`` -1 = none) -> ``(m*L,)`` rows of the
        flat host tensors; slots past a chunk's end point to the zero pad row."""
        n = max(self.n, 1)
        safe = chunk.clamp(min=0)
        st = self.starts.view(-1, n)[bh, safe] if self.n else torch.zeros_like(bh)
        ln = self.lens.view(-1, n)[bh, safe].to(torch.int64) if self.n else torch.zeros_like(bh)
        return self._host_rows(bh * self.T + st, torch.where(chunk >= 0, ln, 0))

    def _host_rows(self, first: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
        """``(m*L,)`` host rows of ``m`` chunks given their first host row and length ``(m,)`` (a
        length <= 0: none); slots past a chunk's end point to the zero pad row."""
        ar = torch.arange(self.L, device=first.device)
        pad = self.pad if self._segs is None else -1      # several segments: each its own pad row
        return torch.where(ar < ln[:, None], first[:, None] + ar, pad).reshape(-1)

    def _host_tensors(self) -> dict[str, torch.Tensor]:
        """The host tensors of token rows (``k, v, p``, and ``s``: value scales when quantized)."""
        out = {"k": self.k, "v": self.v, "p": self.pos}
        if not self.keys:
            del out["k"]
        if self.bits:
            out["s"] = self.vsz
        return out

    def _host_gather(self, rows_cpu: torch.Tensor, chunks: tuple[torch.Tensor, torch.Tensor] | None = None,
                     seg_cpu: torch.Tensor | None = None):
        """Gather host token rows into (pinned, when CUDA) staging tensors and bring them to the
        device. Returns ``k, v (m, head_dim)`` and ``pos (m,)`` for ``m = len(rows_cpu)``. A
        quantized store dequantizes them on the device: ``chunks = (bh, chunk)``, both ``(m // L,)``
        device tensors, name the chunk of each run of ``L`` rows (its key scales). A store of
        several host segments takes ``seg_cpu (m,)``, the segment of each row (-1 rows: its pad)."""
        self._host_ready()
        if self._segs is not None:
            got: dict[str, torch.Tensor] = {}
            for i, tens in enumerate(self._segs):
                mine = seg_cpu == i
                rows = torch.where(mine & (rows_cpu >= 0), rows_cpu, tens["p"].shape[0] - 1)
                for name, t in tens.items():
                    part = t.index_select(0, rows)
                    got[name] = part if name not in got else torch.where(
                        mine.view(-1, *([1] * (part.dim() - 1))), part, got[name])
            return self._decode_rows({n: t.to(self.device) for n, t in got.items()}, chunks)
        if self.device.type == "cpu":
            got = {n: t.index_select(0, rows_cpu) for n, t in self._host_tensors().items()}
            return self._decode_rows(got, chunks)
        return self._decode_rows(self._host_copy(rows_cpu), chunks)

    def _decode_rows(self, got: dict[str, torch.Tensor], chunks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, pos)`` device rows in full precision from gathered host rows (each run of ``L``
        rows is chunk ``chunks[i]``)."""
        if not self.bits:
            return got.get("k"), got["v"], got["p"]
        bh, chunk = chunks
        sz = self.ksz.view(-1, max(self.n, 1), 2, self.d)[bh, chunk.clamp(min=0)]      # (m // L, 2, d)
        k, v = _cf.dequantize_chunk_rows(got["k"], got["v"], got["s"], sz, self.bits, self.L)
        return k.to(self.dtype), v.to(self.dtype), got["p"]

    def _host_copy(self, rows_cpu: torch.Tensor) -> dict[str, torch.Tensor]:
        """CUDA: the host rows through double-buffered pinned staging, copied on a side stream."""
        m = rows_cpu.numel()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
            self._stage = [{}, {}]
            self._stage_events = [None, None]
        i = self._stage_i
        self._stage_i ^= 1
        ev = self._stage_events[i]
        if ev is not None:
            ev.synchronize()  # the copy that last read this staging buffer is done
        st = self._stage[i]
        host = self._host_tensors()
        if "k" not in st or st["k"].shape[0] < m:
            cap = max(m, 2 * st["k"].shape[0] if "k" in st else m)
            for name, t in host.items():
                st[name] = torch.empty(cap, *t.shape[1:], dtype=t.dtype, pin_memory=self.pin)
        staged = {name: st[name][:m] for name in host}
        for name, t in host.items():
            torch.index_select(t, 0, rows_cpu, out=staged[name])
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)  # destination memory may be reused from the main stream
        with torch.cuda.stream(self._stream):
            out = {name: t.to(self.device, non_blocking=True) for name, t in staged.items()}
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._stage_events[i] = ev
        main.wait_stream(self._stream)
        for t in out.values():
            t.record_stream(main)
        return out

    def _fetch_direct(self, chunk_idx, stats, compact: bool = False):
        b, hk, k = chunk_idx.shape
        bh = torch.arange(b * hk, device=chunk_idx.device).repeat_interleave(k)
        L, d = self.L, self.d
        if self._use_uva() and self.n:
            flat = chunk_idx.reshape(-1)
            valid = flat >= 0
            ov = torch.empty(b * hk * k, L, d, dtype=self.dtype, device=self.device)
            ok = torch.empty_like(ov) if self.keys else None
            op = torch.empty(b * hk * k, L, dtype=torch.int32, device=self.device)
            dst = torch.arange(b * hk * k, device=self.device)
            # every entry is written (invalid ones as padding: length 0)
            if self._uva_copy(bh, flat, torch.ones_like(valid), ok, ov, op, dst):
                if stats is not None:  # counted in place: a replayed CUDA graph keeps counting
                    if self._direct_counts is None:
                        self._direct_counts = torch.zeros(2, dtype=torch.int64, device=self.device)
                    stats.track(self._direct_counts, L * self._token_bytes(), cached=False)
                    self._direct_counts.add_(valid.sum().expand(2))
                return (ok.view(b, hk, k * L, d) if ok is not None else None), ov.view(b, hk, k * L, d), \
                    op.view(b, hk, k * L)
        rows = self._token_rows(bh, chunk_idx.reshape(-1)).cpu()
        seg = self._row_seg[bh.cpu()].repeat_interleave(L) if self._segs is not None else None
        width = k * L
        if compact and self.device.type == "cpu" and not self.bits:
            rows, seg, width = self._compact_rows(rows, seg, b * hk, width)
        dk, dv, dp = self._host_gather(rows, (bh, chunk_idx.reshape(-1)), seg)
        if stats is not None:
            nv = int((chunk_idx >= 0).sum())  # rows are on the host already: no extra sync
            stats.chunks += nv
            stats.copied_chunks += nv
            stats.copied_bytes += rows.numel() * self._token_bytes()
        d = self.d
        dk = None if dk is None else dk.view(b, hk, width, d)
        return dk, dv.view(b, hk, width, d), dp.view(b, hk, width)

    def _compact_rows(self, rows: torch.Tensor, seg: torch.Tensor | None, groups: int,
                      width: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """On the CPU (host rows are compute rows; eager shapes): ``rows (groups * width,)`` (and
        ``seg``, each row's host segment, alike) with each (batch, kv_head)'s chunks' token rows
        first, in order, and pad rows after them, cut to the longest group's tokens. A chunk takes
        ``L`` slots whatever its length, so a selection of sentence chunks is about half pad rows
        (2,432 slots for 1,140 tokens at 5k tokens and 25%): they were copied and then read by the
        attention for nothing. Returns ``(rows, seg, width)``."""
        pad = self.pad if self._segs is None else -1
        valid = (rows != pad).view(groups, width)
        w = max(1, int(valid.sum(1).max()))
        if w >= width:
            return rows, seg, width
        # valid rows first, in order: each goes to its rank among its group's valid rows (the others
        # to a dump column), no sort (a stable argsort of the mask cost 4.6 ms a decode step at 16k)
        dest = torch.where(valid, valid.cumsum(1) - 1, w)
        out = torch.full((groups, w + 1), pad, dtype=rows.dtype, device=rows.device)
        rows = out.scatter_(1, dest, rows.view(groups, width))[:, :w].reshape(-1)
        if seg is not None:   # one segment per group (its (batch, kv_head)'s): pad rows keep it
            seg = seg.view(groups, width)[:, :w].reshape(-1)
        return rows, seg, w

    def _host_quiesce(self) -> None:
        """Wait for the device before host tensors are replaced: UVA copy kernels read them directly,
        and a freed pinned block may be handed out again (and overwritten) before a queued kernel ran."""
        if self._uva and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _use_uva(self) -> bool:
        """Whether misses go through the UVA copy kernel (CUDA, pinned host store, Triton)."""
        if self._uva is None:
            self._uva = self.device.type == "cuda" and self.pin and uva_enabled()
        return self._uva

    def _uva_copy(self, bh: torch.Tensor, chunk: torch.Tensor, copy: torch.Tensor, ck, cv, cp, dst) -> bool:
        """Copy chunks ``chunk`` of rows ``bh`` (both ``(m,)``) where ``copy`` into the device rows
        ``dst`` of ``ck, cv (C, L, d)`` / ``cp (C, L)`` with the UVA kernel. False when the kernel
        cannot run here (then it is never tried again and the caller takes the host path)."""
        n = max(self.n, 1)
        safe = chunk.clamp(min=0)
        src = bh * self.T + self.starts.view(-1, n)[bh, safe]
        ln = torch.where(chunk >= 0, self.lens.view(-1, n)[bh, safe], 0)
        ln = torch.where(copy, ln, -1)
        if self.bits:  # (every entry is copied here: the direct fetch writes each one)
            return self._uva_dequant(src, ln, bh, chunk, ck, cv, cp, dst)
        return self._uva_kernel(src, ln, ck, cv, cp, dst, rows=bh)

    def _uva_dequant(self, src: torch.Tensor, ln: torch.Tensor, bh: torch.Tensor, chunk: torch.Tensor, ck, cv, cp,
                     dst: torch.Tensor, copy=None) -> bool:
        """A quantized store's chunks through the UVA kernel that dequantizes them on the way
        (:func:`kvsift.kernels.chunk_fetch.copy_chunks_dequant`): entry ``m`` (all ``(M,)``) reads host
        rows ``src[m] .. src[m] + ln[m] - 1`` (codes, value scales, positions; ``ln[m] = -1``: none,
        nothing written) and writes them, dequantized with the key scales of chunk ``(bh[m],
        chunk[m])``, into device row ``dst[m]`` of ``ck, cv (C, L, head_dim)`` / ``cp (C, L)``. Only
        the codes cross PCIe; no staging, no host sync (a CUDA graph can hold it). False when the
        kernel cannot run here (never tried again). ``copy``: the kernel (tests pass its reference)."""
        w, ng = self.d * self.bits // 8, self.d // self.vg
        krow = bh * max(self.n, 1) + chunk.clamp(min=0)
        ksz = self.ksz.view(-1, 2, self.d)
        copy = copy or _cf.copy_chunks_dequant
        if self.device.type == "cuda":
            self._after_writes()
        try:
            for i, tens in enumerate(self._segments()):  # one launch per host segment, its rows only
                ln_i = ln if self._segs is None else torch.where(self._rows_of_segment(i, bh), ln, -1)
                copy(tens["k"].view(-1, w), tens["v"].view(-1, w), tens["s"].view(-1, 2 * ng), tens["p"].view(-1),
                     src, ln_i, krow, ksz, ck, cv, cp, dst, self.bits)
        except RuntimeError:
            self._uva = False
            return False
        return True

    def _uva_kernel(self, src, ln, ck, cv, cp, dst, rows: torch.Tensor | None = None) -> bool:
        """:func:`kvsift.kernels.chunk_fetch.copy_chunks` from this store's host rows (``rows``: the
        (batch*kv_head) row of each entry, for a store of several host segments: one launch per
        segment); False (and never tried again) when Triton cannot read the pinned host memory here."""
        self._after_writes()
        try:
            for i, tens in enumerate(self._segments()):
                ln_i = ln if self._segs is None else torch.where(self._rows_of_segment(i, rows), ln, -1)
                _cf.copy_chunks(tens["k"].view(-1, self.d) if self.keys else None, tens["v"].view(-1, self.d),
                                tens["p"].view(-1), src, ln_i, ck, cv, cp, dst)
        except RuntimeError:
            self._uva = False
            return False
        return True

    def _token_bytes(self) -> int:
        if self.bits:  # codes, value scale and zero, position
            return int(coded_token_bytes(self.d, self.bits, self.vg)) + 4
        return (1 + self.keys) * self.d * torch.tensor([], dtype=self.dtype).element_size() + 4

    @property
    def cache_cold(self) -> bool:
        """Whether this store has a device chunk cache holding nothing yet for some batch row (not
        made: no decode fetch so far and none carried into it by a stack; or rows that a stack
        gave no cache beside rows whose caches it carried, :attr:`cold_rows`)."""
        return self.cache_chunks != 0 and (self._dev is None or bool(self._cold_rows))

    @property
    def cold_rows(self) -> list[int] | None:
        """The batch rows whose device cache holds nothing yet (None: every row), until the next
        cached fetch."""
        return None if self._dev is None else list(self._cold_rows)

    def cache_slots(self, k: int) -> int:
        """The device cache made (as a first fetch of ``k`` chunks per row would make it) and its
        chunk slots per (batch, kv_head)."""
        self._ensure_cache(k)
        return self._dev["owner"].shape[1] - 1

    def _ensure_cache(self, k: int):
        """Device cache of ``cache_chunks`` chunk slots per (batch, kv_head), at least ``k`` (one
        step's selection); ``cache_chunks < 0`` means twice the first selection (at least 16)."""
        if self._dev is not None and self._dev["owner"].shape[1] - 1 >= k:
            return
        self._dev = self._cache_tables(max(self.cache_chunks, k) if self.cache_chunks >= 0 else max(16, 2 * k))

    def _cache_tables(self, S: int) -> dict[str, torch.Tensor]:
        """Empty device chunk-cache tables of ``S`` slots per (batch, kv_head)."""
        BH, L, d = self.b * self.hk, self.L, self.d
        dev = self.device
        # column S (the last one) of every table is a scratch slot that absorbs masked writes
        return {
            "k": torch.zeros(BH, S + 1, L, d, dtype=self.dtype, device=dev),
            "v": torch.zeros(BH, S + 1, L, d, dtype=self.dtype, device=dev),
            "p": torch.full((BH, S + 1, L), -1, dtype=torch.int32, device=dev),
            "owner": torch.full((BH, S + 1), -1, dtype=torch.int64, device=dev),
            "last": torch.full((BH, S + 1), -1, dtype=torch.int64, device=dev),
            "slot_of": torch.full((BH, self.n + 1), -1, dtype=torch.int64, device=dev),
            "counts": torch.zeros(2, dtype=torch.int64, device=dev),  # (lookups, misses), in place
        }

    def _fetch_cached(self, chunk_idx, stats, slots: bool = False):
        """Device LRU cache: one bookkeeping step (:mod:`kvsift.kernels.chunk_cache`, one Triton
        launch on CUDA) then the copy of the misses (one UVA launch, or through the host)."""
        from kvsift.kernels.chunk_cache import lru_plan, lru_plan_ref
        from kvsift.kernels.dispatch import use_triton

        b, hk, k = chunk_idx.shape
        self._ensure_cache(k)
        c = self._dev
        BH, S = b * hk, c["owner"].shape[1] - 1
        L, d, n = self.L, self.d, max(self.n, 1)
        idx = chunk_idx.reshape(BH, k).contiguous()
        tab = torch.empty(BH, k * L, dtype=torch.int32, device=self.device) if slots else None
        uva = self._use_uva()
        plan = lru_plan if uva and use_triton(idx) else lru_plan_ref
        if stats is not None:  # before the update: the counts so far are the baseline
            stats.track(c["counts"], self.L * self._token_bytes())
        src, ln, dst, final = plan(idx, c["slot_of"], c["owner"], c["last"], self.starts.view(BH, n),
                                   self.lens.view(BH, n), self.T, c["counts"], L, tab)
        self._cold_rows = []
        rows_kv = (BH * (S + 1), L, d)
        if uva and self.bits:  # the misses' codes over PCIe, dequantized into their cache rows (hits: nothing)
            uva = self._uva_dequant(src, ln, torch.arange(BH, device=self.device).repeat_interleave(k),
                                    idx.reshape(-1), c["k"].view(rows_kv), c["v"].view(rows_kv),
                                    c["p"].view(BH * (S + 1), L), dst)
        elif uva:
            uva = self._uva_kernel(src, ln, c["k"].view(rows_kv), c["v"].view(rows_kv), c["p"].view(BH * (S + 1), L),
                                   dst, rows=torch.arange(BH, device=self.device).repeat_interleave(k))
        if not uva:
            mi = (ln >= 0).nonzero().squeeze(1)  # host path: one sync for the miss list
            if mi.numel():
                seg = self._row_seg[(mi // k).cpu()].repeat_interleave(L) if self._segs is not None else None
                dk, dv, dp = self._host_gather(self._host_rows(src[mi], ln[mi]).cpu(), (mi // k, idx.reshape(-1)[mi]),
                                               seg)
                m = mi.numel()
                c["k"].view(BH * (S + 1), L * d).index_copy_(0, dst[mi], dk.view(m, -1))
                c["v"].view(BH * (S + 1), L * d).index_copy_(0, dst[mi], dv.view(m, -1))
                c["p"].view(BH * (S + 1), L).index_copy_(0, dst[mi], dp.view(m, -1))
        if slots:  # read in place: slot t of cache slot s is row s*L + t of the (b, hk, (S+1)*L, d) view
            return (c["k"].view(b, hk, (S + 1) * L, d), c["v"].view(b, hk, (S + 1) * L, d),
                    c["p"].view(b, hk, (S + 1) * L), tab.view(b, hk, k * L))
        ok = c["k"].view(BH * (S + 1), L * d).index_select(0, dst)
        ov = c["v"].view(BH * (S + 1), L * d).index_select(0, dst)
        op = c["p"].view(BH * (S + 1), L).index_select(0, dst)
        return ok.view(b, hk, k * L, d), ov.view(b, hk, k * L, d), op.view(b, hk, k * L)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def kv_nbytes(self) -> tuple[int, int]:
        """``(device bytes, host bytes)`` really allocated by this store."""
        def nb(t):
            return 0 if t is None else t.numel() * t.element_size()

        device = nb(self.lens) + nb(self.starts) + nb(self.used) + nb(self.mean) + nb(self.kmin) + nb(self.kmax)
        device += nb(self.ksz)
        if self._dev is not None:
            device += sum(nb(t) for t in self._dev.values())
        # host rows shared with a context's store are counted here too, once for all the rows that
        # read them (as a context prefix read by reference is)
        host = sum(nb(t) for tens in self._segments() for t in tens.values())
        host += sum(nb(t) for st in self._stage for t in st.values())
        return device, host

    offloaded = True  # as a method's layer state: the layer's KV lives partly here

    def nbytes(self) -> tuple[int, int]:
        """``(device bytes, host bytes)`` (see :meth:`kv_nbytes`)."""
        return self.kv_nbytes()

    def clone(self) -> "ChunkStore":
        """A copy without the device cache (e.g. a reusable context answering a new question): the
        device tables copied, the host rows shared until the copy writes (:meth:`own_host`)."""
        self._host_ready()
        new = ChunkStore.__new__(ChunkStore)
        for name in ("b", "hk", "L", "d", "dtype", "device", "pin", "bounds", "cache_chunks", "n", "T", "max_tokens",
                     "capacity", "bits", "vg", "keys"):
            setattr(new, name, getattr(self, name))
        new.k, new.v, new.pos, new.vsz = self.k, self.v, self.pos, self.vsz
        new.shared, new._row_base, new._row_seg = True, self._row_base, self._row_seg
        new._seg_dev, new._segs = self._seg_dev, self._segs
        new.ksz = None if self.ksz is None else self.ksz.clone()
        new.lens, new.mean = self.lens.clone(), self.mean.clone()
        new.starts, new.used = self.starts.clone(), self.used.clone()
        new.kmin = None if self.kmin is None else self.kmin.clone()
        new.kmax = None if self.kmax is None else self.kmax.clone()
        new._dev, new._stage, new._stage_events, new._stage_i, new._stream = None, [], [], 0, None
        new._cold_rows = []
        new._uva, new._written, new._direct_counts = self._uva, None, None
        new._written_ordered, new._wstream = True, None
        return new

    # ---- persistence (kvsift.server.contexts: a reusable context on disk) -------------------------
    _META = ("b", "hk", "L", "d", "bounds", "cache_chunks", "n", "T", "max_tokens", "capacity", "bits", "vg", "keys")

    def kv_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json_extra)``: the host KV (all rows, as stored), the device summaries and
        tables; the device chunk cache is not saved (it refills on the first fetches)."""
        self.own_host()  # the layout on disk is the store's own: row r at host rows r*T ..
        self._host_ready()
        t = {"k": self.k, "v": self.v, "pos": self.pos, "starts": self.starts, "lens": self.lens,
             "used": self.used, "mean": self.mean}
        if self.bounds:
            t.update(kmin=self.kmin, kmax=self.kmax)
        if self.bits:
            t.update(vsz=self.vsz, ksz=self.ksz)
        extra = {name: getattr(self, name) for name in self._META}
        extra["dtype"] = str(self.dtype).removeprefix("torch.")
        return t, extra

    @classmethod
    def kv_from_state_dict(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], device) -> "ChunkStore":
        """Rebuild a store written by :meth:`kv_state_dict` on ``device`` (host KV pinned on CUDA)."""
        dtype = getattr(torch, extra["dtype"])
        bits = int(extra.get("bits", 0))
        new = cls(extra["b"], extra["hk"], extra["L"], extra["d"], dtype, device, bounds=extra["bounds"],
                  cache_chunks=extra["cache_chunks"], capacity=extra["capacity"], bits=bits,
                  vgroup=int(extra.get("vg", 0)), keys=bool(extra.get("keys", True)))
        for name in ("n", "T", "max_tokens"):
            setattr(new, name, int(extra[name]))
        rows = new.b * new.hk * new.T + 1
        width, kdt = (new.d * bits // 8, torch.uint8) if bits else (new.d, dtype)
        if tensors["k"].shape != ((rows if new.keys else 1), width) or tensors["v"].shape != (rows, width) \
                or tensors["pos"].shape != (rows,) or (bits and tensors["k"].dtype != torch.uint8):
            raise ValueError(f"host tensors {tuple(tensors['k'].shape)} do not match the store's layout "
                             f"({rows}, {width})")
        new.k, new.v, new.pos = (new._copy_host(tensors[x].to(dt)) for x, dt in
                                 (("k", kdt), ("v", kdt), ("pos", torch.int32)))
        if bits:
            vsz, ksz = tensors["vsz"], tensors["ksz"]
            if tuple(vsz.shape) != (rows, 2, new.d // new.vg) or tuple(ksz.shape) != (new.b, new.hk, new.n, 2, new.d):
                raise ValueError(f"quantized chunk store: scales {tuple(vsz.shape)}, {tuple(ksz.shape)} do not match")
            new.vsz = new._copy_host(vsz.to(SCALE_DTYPE))
            new.ksz = ksz.to(new.device, SCALE_DTYPE)
        dev = new.device
        new.starts, new.lens = tensors["starts"].to(dev, torch.int64), tensors["lens"].to(dev, torch.int32)
        new.used, new.mean = tensors["used"].to(dev, torch.int64), tensors["mean"].to(dev, dtype)
        if new.bounds:
            new.kmin, new.kmax = tensors["kmin"].to(dev, dtype), tensors["kmax"].to(dev, dtype)
        return new

    def repeat_batch(self, times: int) -> None:
        """Repeat a batch-1 store ``times`` times over the batch (a context answering a batch of
        questions): the device tables are repeated, the host rows are not copied (every new row reads
        its KV head's row of the one stored block; the store becomes ``shared``)."""
        if times == 1:
            return
        if self.b != 1:
            raise ValueError(f"only a batch-1 store can be repeated, this one has batch {self.b}")
        self._host_ready()
        if self._segs is not None:  # (a view over several segments: one block of its own first)
            self.own_host()
        hk, T = self.hk, self.T
        bh = torch.arange(times * hk, dtype=torch.int64)
        base = self._row_base if self._row_base is not None else torch.arange(hk, dtype=torch.int64) * T
        # row r reads row r % hk's block: address r*T + starts[r] = base[r % hk] + local
        self.lens = self.lens.repeat(times, 1, 1)
        self.starts = self.starts.repeat(times, 1, 1) + ((bh % hk - bh) * T).to(self.device).view(times, hk, 1)
        self.used = self.used.repeat(times)
        self.mean = self.mean.repeat(times, 1, 1, 1)
        if self.bounds:
            self.kmin, self.kmax = self.kmin.repeat(times, 1, 1, 1), self.kmax.repeat(times, 1, 1, 1)
        if self.bits:
            self.ksz = self.ksz.repeat(times, 1, 1, 1, 1)
        self.b = times
        self.shared, self._row_base = True, base.repeat(times)
        self._dev = None

    @classmethod
    def stack(cls, sources: list) -> "ChunkStore":
        """A store whose batch rows are ``sources`` (``(store, row)`` pairs, in order; ``store`` None:
        a sequence that stored nothing, its rows hold no chunks): the rows of a running batch that
        requests joined. The device tables are gathered (chunk slots padded to the most any row has,
        with length 0); the host rows are not copied: each row reads them where its store holds
        them (``shared``, over the sources' host segments, one UVA launch per segment)."""
        stores = [s for s, _ in sources if s is not None]
        if not stores:
            raise ValueError("stack needs at least one store")
        ref = stores[0]
        for s in stores[1:]:
            if (s.hk, s.L, s.d, s.dtype, s.bits, s.vg, s.keys, s.bounds) != \
                    (ref.hk, ref.L, ref.d, ref.dtype, ref.bits, ref.vg, ref.keys, ref.bounds):
                raise ValueError("stores of different layouts cannot be stacked")
        hk, d, dev = ref.hk, ref.d, ref.device
        b, n = len(sources), max(s.n for s in stores)
        new = cls(b, hk, ref.L, d, ref.dtype, dev, bounds=ref.bounds, cache_chunks=ref.cache_chunks, pin=ref.pin,
                  bits=ref.bits, vgroup=ref.vg if ref.bits else 0, keys=ref.keys)
        segs, seg_ids = [], {}
        base, seg = torch.zeros(b * hk, dtype=torch.int64), torch.zeros(b * hk, dtype=torch.int64)
        new._grow(n, 0)
        new.n = n
        used = torch.zeros(b * hk, dtype=torch.int64, device=dev)
        for i, (s, j) in enumerate(sources):
            if s is None or s.n == 0:
                continue
            s._host_ready()
            s_segs = s._segments()
            local = []
            for tens in s_segs:  # the same host tensors, one segment (a shared context, an earlier stack)
                key = tuple(t.data_ptr() for t in tens.values())
                if key not in seg_ids:
                    seg_ids[key] = len(segs)
                    segs.append(tens)
                local.append(seg_ids[key])
            rows = torch.arange(j * hk, (j + 1) * hk, dtype=torch.int64)
            rb = s._row_base[rows] if s._row_base is not None else rows * s.T
            rs = s._row_seg[rows] if s._row_seg is not None else torch.zeros(hk, dtype=torch.int64)
            base[i * hk:(i + 1) * hk] = rb
            seg[i * hk:(i + 1) * hk] = torch.tensor(local, dtype=torch.int64)[rs]
            m = s.n
            # new T is 0: a row's chunk starts are host addresses (r*T_s + starts_s)
            new.starts[i, :, :m] = s.starts[j, :, :m] + (rows * s.T).to(dev)[:, None]
            new.lens[i, :, :m] = s.lens[j, :, :m]
            new.mean[i, :, :m] = s.mean[j, :, :m]
            if ref.bounds:
                new.kmin[i, :, :m], new.kmax[i, :, :m] = s.kmin[j, :, :m], s.kmax[j, :, :m]
            if ref.bits:
                new.ksz[i, :, :m] = s.ksz[j, :, :m]
            used[i * hk:(i + 1) * hk] = s.used[j * hk:(j + 1) * hk]
        new.used, new.max_tokens = used, int(used.max()) if used.numel() else 0
        new._uva = ref._uva
        new._carry_caches(sources)
        if not segs:  # no row stored anything: an empty store of its own
            return new
        new.T = 0
        new._segs, new._row_base, new._row_seg = segs, base, seg
        new._seg_dev = seg.to(dev)
        new.k, new.v, new.pos = segs[0].get("k", new.k), segs[0]["v"], segs[0]["p"]
        new.vsz = segs[0].get("s")
        new.shared = True
        # rows that left still hold their segments' bytes: past twice what the rows use (and 64 MiB),
        # the rows are copied into one block of their own and the old segments go
        held = sum(t.numel() * t.element_size() for tens in segs for t in tens.values())
        if held > 2 * int(used.sum()) * new._token_bytes() + COMPACT_SLACK:
            new.own_host()
        return new

    def _carry_caches(self, sources: list) -> None:
        """Carry the device chunk caches of a stack's ``sources`` (``(store, row)`` pairs) into this
        store's, row by row: a chunk a row cached before the join stays cached (same chunk ids, each
        row's own LRU clock), so a join does not send every running row's selection over PCIe again
        on the next step. Slots are padded to the largest source cache (empty slots go first)."""
        held = [(i, s, j) for i, (s, j) in enumerate(sources) if s is not None and s._dev is not None]
        if not held or self.cache_chunks == 0:
            return
        got = {i for i, _, _ in held}
        self._cold_rows = [i for i in range(len(sources)) if i not in got]
        S = max(s._dev["owner"].shape[1] - 1 for _, s, _ in held)
        c = self._cache_tables(S)
        hk = self.hk
        for i, s, j in held:
            src, dst, So = s._dev, slice(i * hk, (i + 1) * hk), s._dev["owner"].shape[1] - 1
            rows = slice(j * hk, (j + 1) * hk)
            for name in ("k", "v", "p", "owner", "last"):
                c[name][dst, :So] = src[name][rows, :So]
            m = min(s.n, src["slot_of"].shape[1] - 1, self.n)
            c["slot_of"][dst, :m] = src["slot_of"][rows, :m]
        self._dev = c

    def _copy_host(self, t: torch.Tensor) -> torch.Tensor:
        out = self._host_empty(t.shape, t.dtype)
        out.copy_(t)
        return out
