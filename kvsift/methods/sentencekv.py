"""``sentencekv``: semantic chunk cache with real CPU offload (after SentenceKV, arXiv 2504.00970).

Prefill (``prefill_end``, per layer, right after the layer attended over the whole prompt):

1. the prompt is cut into sentence-aligned chunks (:mod:`kvsift.segment`: sentences, newlines and
   chat markers, ``min_chunk..max_chunk`` tokens; fixed-size chunks without a tokenizer);
2. for every KV head each chunk gets a semantic vector, the mean of its post-RoPE keys (optionally
   also Quest min/max bounds), kept on the compute device;
3. the chunks' full KV moves to host memory (pinned on CUDA); only the ``sinks`` first tokens and
   the ``recent`` last prompt tokens stay in the device buffer (generated tokens are appended there).

Decode (``plan``, once per layer per step): a query fingerprint (the mean of the queries of the
sentence being generated, reset after a sentence-ending token; or the current query) scores the
chunks per KV head (GQA groups reduced), the best chunks that fit the token budget are fetched back
(device LRU cache of chunks, async copies on CUDA) and the token attends over sinks + selected
chunks + recent window + generated tokens, masked by positions.

On CUDA the whole decode step stays on the device: chunk scores (Triton), the budgeted selection,
the LRU bookkeeping of the device chunk cache and the copy of the misses (a Triton kernel reading
the pinned host store through unified addressing, :mod:`kvsift.kernels.chunk_fetch`) run without
a host sync. ``reselect_every=N`` keeps a layer's selection for ``N`` decode steps (scoring and
fetching skipped in between; the fingerprint still follows every token).

Budget: ``budget`` (or ``decode_budget`` when set, e.g. under ``snapkv+sentencekv``) is the number
of prompt tokens attended per layer and KV head at each step: sinks + recent + selected chunks.
With a budget of the whole prompt every chunk is selected and the output equals ``full``.

Prompts longer than device memory (``prefill_offload=True``, after InfLLM's block retrieval): the
offload happens after every prefill chunk, not only at the end. Once a chunk has attended, the
whole sentence chunks before the recent window move to the host store, so a layer's device buffer
holds sinks + recent + one prefill chunk whatever the prompt's length. Each later prefill chunk
attends to those, to itself (causally) and to stored chunks: the ones its queries select (their
mean scores the chunk summaries per KV head, ``prefill_budget`` tokens), or every stored chunk
when ``prefill_budget`` is None (exact: the prefill equals ``full``'s, at the price of fetching the
whole store back per chunk, one layer at a time).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsift.cache.host import host_pool
from kvsift.kernels.dispatch import chunk_scores, select_chunks
from kvsift.methods._offload import ChunkStore, FetchStats
from kvsift.methods.base import (Budget, EvictionMethod, KVMethod, LayerState, Run, Selection, SlotSource, codec_stage,
                                 decode_tokens, register, resolve_budget, validate_budget)
from kvsift.segment import SegmentConfig, segment_tokens

_END_PIECE = re.compile(r"([.!?。！？…][\"'”’)\]]*\s*$)|\n")


@dataclass
class SentenceKVState(LayerState):
    """One layer's sentencekv state: the host chunk store, the query fingerprint (running sum and
    count of the current sentence's queries) and the fewest prompt tokens a head keeps on the
    device (``dev_tokens``); ``held``:
    the last selection, kept for ``reselect_every`` steps (not persisted, not cloned)."""

    store: ChunkStore | None = None
    fp_sum: torch.Tensor | None = None      # (batch, q_heads, head_dim) fp32
    fp_count: torch.Tensor | None = None    # (batch, 1, 1) fp32
    dev_tokens: int | None = None
    held: Any = None

    @property
    def offloaded(self) -> bool:
        return self.store is not None and self.store.n > 0

    def clone(self) -> "SentenceKVState":
        new = super().clone()
        new.held = None
        return new


@dataclass
class SentenceKVRun(Run):
    """One generation's sentencekv state: tokens attended per step, fetch counters, memos."""

    sel_tokens: int = 0
    prefill_tokens: int | None = None   # stored tokens a prefill chunk attends to (prefill_offload)
    fetch: FetchStats = field(default_factory=FetchStats)
    steps: Any = None          # (1,) int64 device counter of decode steps (a replayed graph counts)
    chunk_map: Any = None
    segments: Any = None       # (prompt ids, tokenizer, future of each row's chunk spans): segmented beside the prefill
    host_reserved: bool = False  # the host store's page-locked blocks were asked for (_reserve_host)
    keep_memo: Any = None
    dense_plan: Any = None     # (key, plan or None): the final dense offload's per-prompt plan (_dense_plan)


@register("sentencekv")
@dataclass(frozen=True)
class SentenceKV(KVMethod):
    """SentenceKV: sentence chunks offloaded to host memory, top chunks fetched back at decode.

    Parameters
    ----------
    budget : int | float
        Prompt tokens attended per layer and KV head at each decode step (sinks + recent + chunks).
    sinks : int
        First prompt tokens kept on the device.
    recent : int
        Last prompt tokens kept on the device.
    min_chunk : int
        Shortest chunk in tokens (shorter sentences are merged).
    max_chunk : int
        Longest chunk in tokens (longer sentences are split).
    splitter : str
        Sentence splitter: ``rules`` (built in), ``pysbd``, or ``fixed`` (chunks of ``max_chunk``).
    fingerprint : str
        Query that scores chunks: ``sentence`` (mean query of the sentence being generated) or
        ``token`` (the current query).
    summary : str
        Chunk summary: ``mean`` (mean key) or ``quest`` (per-channel min/max bounds).
    reduce : str
        How the query heads of a GQA group combine their chunk scores: ``mean`` or ``max``.
    decode_budget : int | float | None
        Prompt tokens attended at decode when composed after an eviction (default: ``budget``).
    cache_chunks : int | None
        Device LRU chunk slots per (batch, kv_head); None: 0 on the CPU, twice the first
        selection on CUDA.
    reselect_every : int
        Decode steps a layer's chunk selection is kept (1: select every step).
    warm_cache : bool
        At the first decode step over a store whose device chunk cache is still empty, fill the
        whole cache (``cache_chunks`` slots) with the chunks that step's query scores best, not
        only the step's selection: the next steps' selections, which drift from the first, then
        mostly hit, so the fetches move from the first inter-token gaps into the time to first
        token. No effect without a device cache (``cache_chunks`` 0, the CPU default).
    prefill_offload : bool
        Offload during the prefill, after every chunk (for prompts whose KV does not fit the GPU):
        the device holds sinks + recent + one prefill chunk per layer instead of the whole prompt.
    prefill_budget : int | float | None
        Under ``prefill_offload``: stored prompt tokens each prefill chunk attends to per layer and
        KV head, the chunks its mean query scores best (a ratio: of the prompt). None: every stored
        chunk (exact, slower: the store is read back once per prefill chunk).
    prefill_window : int | None
        Under ``prefill_budget``: the mean of the chunk's last ``prefill_window`` queries scores the
        stored chunks (SnapKV's observation window: a question at the prompt's end picks what it
        needs) instead of the mean of all the chunk's queries (None).
    prefill_block : int | None
        Under ``prefill_budget``: the chunk's queries in blocks of this many, each block selecting
        and attending to its own stored chunks (InfLLM's retrieval per block of queries; one fetch
        per block) instead of one selection for the whole chunk (None). With ``prefill_window``
        each block is scored by its last ``prefill_window`` queries.
    """

    sinks: int = 4
    recent: int = 64
    min_chunk: int = 8
    max_chunk: int = 32
    splitter: str = "rules"
    fingerprint: str = "sentence"
    summary: str = "mean"
    reduce: str = "mean"
    decode_budget: Budget = None
    cache_chunks: int | None = None
    reselect_every: int = 1
    warm_cache: bool = False
    prefill_offload: bool = False
    prefill_budget: Budget = None
    prefill_window: int | None = None
    prefill_block: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("sinks", "recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        SegmentConfig(self.min_chunk, self.max_chunk, self.splitter)  # validates the chunking options
        if self.fingerprint not in ("sentence", "token"):
            raise ValueError(f"fingerprint must be 'sentence' or 'token', got {self.fingerprint!r}")
        if self.summary not in ("mean", "quest"):
            raise ValueError(f"summary must be 'mean' or 'quest', got {self.summary!r}")
        if self.reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {self.reduce!r}")
        validate_budget(self.decode_budget)
        if self.cache_chunks is not None and self.cache_chunks < 0:
            raise ValueError(f"cache_chunks must be >= 0, got {self.cache_chunks}")
        if isinstance(self.reselect_every, bool) or not isinstance(self.reselect_every, int) or self.reselect_every < 1:
            raise ValueError(f"reselect_every must be an int >= 1, got {self.reselect_every!r}")
        if not isinstance(self.warm_cache, bool):
            raise ValueError(f"warm_cache must be true or false, got {self.warm_cache!r}")
        if not isinstance(self.prefill_offload, bool):
            raise ValueError(f"prefill_offload must be true or false, got {self.prefill_offload!r}")
        validate_budget(self.prefill_budget, "prefill_budget")
        if self.prefill_budget is not None and not self.prefill_offload:
            raise ValueError("prefill_budget needs prefill_offload=true (without it the prefill attends to the "
                             "whole prompt on the device)")
        for name in ("prefill_window", "prefill_block"):   # query rows under prefill_budget
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
            if self.prefill_budget is None:
                raise ValueError(f"{name} needs prefill_budget (without it every stored chunk is attended)")

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, prompt_len: int, num_layers: int) -> SentenceKVRun:
        base = super().start(prompt_len, num_layers)
        pre = None if self.prefill_budget is None else resolve_budget(self.prefill_budget, prompt_len, clamp=True,
                                                                     what="prefill_budget")
        return SentenceKVRun(base.tokens, prompt_len, num_layers,
                             sel_tokens=decode_tokens(self.decode_budget, base.tokens, prompt_len), prefill_tokens=pre)

    def _window(self, run: SentenceKVRun) -> tuple[int, int]:
        """(sinks, recent) clipped so that they fit the decode budget."""
        sinks = min(self.sinks, run.sel_tokens)
        recent = min(self.recent, run.sel_tokens - sinks)
        return sinks, recent

    def _state(self, states: dict) -> SentenceKVState:
        st = states.get(self.name)
        if st is None:
            st = states[self.name] = SentenceKVState()
        return st

    # ---- prefill: segment, summarise, offload ----------------------------------------------
    def _chunks_of_positions(self, run: SentenceKVRun, ctx, batch: int, length: int, device) -> torch.Tensor:
        """``(batch, length)`` int64 chunk label of every logical position (labels increase with
        position). Prompt tokens get sentence-aligned chunks when the engine passed the prompt ids
        and tokenizer (``ctx.prompt_ids``, ``ctx.tokenizer``); positions before
        them (a reused context) and runs without ids get fixed chunks of ``max_chunk``."""
        return self._chunk_map(run, ctx, batch, length, device)[0]

    def _chunk_map(self, run: SentenceKVRun, ctx, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_chunks_of_positions` on ``device`` and on the host (computed once per prompt)."""
        ids = ctx.prompt_ids if ctx is not None else None
        key = (batch, length, str(device))
        if run.chunk_map is not None and run.chunk_map[0] == key and run.chunk_map[2] is ids:
            return run.chunk_map[1], run.chunk_map[3]
        cfg = SegmentConfig(self.min_chunk, self.max_chunk, self.splitter)
        tok = ctx.tokenizer if ctx is not None else None
        fixed = torch.arange(length) // self.max_chunk
        out = fixed.repeat(batch, 1)
        rows = list(ids) if ids is not None and len(ids) == batch else []
        longest = max((len(r) for r in rows), default=0)
        base = length - longest  # a reused context's tokens come first, then each row's prompt
        if rows and 0 < longest <= length:
            nfix = int(fixed[base - 1]) + 1 if base > 0 else 0
            seg = run.segments  # segmented beside the prefill (_segment_ahead), or now
            spans_of = (seg[2].result() if seg is not None and seg[0] is ids and seg[1] is tok
                        else [segment_tokens(r, tok, cfg) if len(r) else [] for r in rows])
            for i, row in enumerate(rows):
                if not len(row):
                    continue
                spans = spans_of[i]
                lens = torch.tensor([e - s for s, e in spans], dtype=torch.long)
                lab = torch.repeat_interleave(torch.arange(len(spans)), lens)
                out[i, base: base + len(row)] = lab + nfix
        run.chunk_map = (key, out.to(device), ids, out)
        return run.chunk_map[1], out

    def prefill_end(self, run, layer, query, module, ctx) -> None:
        if layer.k_buf is None or layer.length == 0:
            return
        # sequences prefilled one at a time (``ctx.row = (i, batch)``): this layer is row i's and the
        # method's state (one store for the batch) lives in the batch cache's layer
        row = ctx.row if ctx is not None else None
        state = self._state(ctx.row_states[layer.layer_idx] if row is not None else layer.state)
        state.fp_sum = state.fp_count = None
        if self.fingerprint == "sentence" and ctx is not None:  # built here, not in decode time
            _end_tokens(ctx.tokenizer, layer.k_buf.device)
        self._offload(run, layer, state, ctx, row, final=True)

    def _segment_ahead(self, run, ctx) -> None:
        """At a prompt's first prefill layer: segment its rows on a worker thread, so the spans are
        ready when the last chunk needs them instead of being computed then, serially (about a
        second per 128k tokens with a tokenizer)."""
        ids = ctx.prompt_ids
        if ids is None or (run.segments is not None and run.segments[0] is ids) or run.chunk_map is not None:
            return
        cfg = SegmentConfig(self.min_chunk, self.max_chunk, self.splitter)
        tok = ctx.tokenizer
        run.segments = (ids, tok, _segmenter().submit(lambda: [segment_tokens(r, tok, cfg) if len(r) else []
                                                                for r in ids]))

    def _reserve_host(self, run, layer, ctx) -> None:
        """At a prompt's first prefill layer on CUDA: ask the host pool to lock every layer's host
        store now, on its worker thread, while the device computes the prefill (locking memory
        faults in, zeroes and pins every page), so the offload finds the blocks ready.
        Off by default: on the H200 (2026-12-02, 128k tokens, 32 layers) locking beside the
        prefill did not shorten it (23.7 s with, 21.9 s without; 17.7 s once the pool holds the
        blocks), since registering host memory stalls the device's work anyway.
        ``KVSIFT_HOST_RESERVE=1`` turns it on."""
        run.host_reserved = True
        if layer.k_buf is None or not layer.k_buf.is_cuda:
            return
        if os.environ.get("KVSIFT_HOST_RESERVE", "").strip().lower() not in {"1", "on", "true", "yes"}:
            return
        shapes = self._host_reservation(run, layer, ctx)
        if shapes:
            host_pool().reserve(shapes)

    def _host_reservation(self, run, layer, ctx) -> list | None:
        """``(shape, dtype)`` of every layer's host tensors for this prompt: the whole prompt past
        the sinks and the recent window, the most a (batch, kv_head) row offloads (what the
        offload then allocates when the device holds the whole prompt). None where that is not
        what it will allocate: a question over a context's store (it offloads nothing), or an
        eviction stage before this one (fewer tokens)."""
        state = self._state(ctx.row_states[layer.layer_idx] if ctx.row is not None else layer.state)
        if state.store is not None:
            return None
        stages = list(getattr(ctx.method, "stages", ()))
        before = stages[: next((i for i, s in enumerate(stages) if s is self), 0)]
        if any(isinstance(s, EvictionMethod) for s in before):
            return None
        sinks, recent = self._window(run)
        tokens = run.prompt_len - sinks - recent
        if tokens <= 0:
            return None
        b, hk, _, d = layer.k_buf.shape
        if ctx.row is not None:
            b = ctx.row[1]
        codec = codec_stage(ctx.method)
        return ChunkStore.host_shapes(b, hk, tokens, d, layer.k_buf.dtype,
                                      **(codec.store_options(d) if codec is not None else {})) * run.num_layers

    def after_attend(self, run, layer, query, module, ctx) -> None:
        if ctx is not None and not ctx.decoding and not ctx.rereading:
            if ctx.row is None:
                self._segment_ahead(run, ctx)
            if not run.host_reserved:
                self._reserve_host(run, layer, ctx)
        super().after_attend(run, layer, query, module, ctx)  # prefill_end after the last chunk
        if (self.prefill_offload and ctx is not None and not (ctx.decoding or ctx.prefill_end or ctx.rereading)
                and ctx.row is None and layer.k_buf is not None and layer.length > 0):
            self._offload(run, layer, self._state(layer.state), ctx, None, final=False)

    def _new_store(self, run, ctx, keys: torch.Tensor, batch: int, capacity: int) -> ChunkStore:
        cache_chunks = self.cache_chunks
        if cache_chunks is None:
            cache_chunks = -1 if keys.device.type == "cuda" else 0
        codec = codec_stage(ctx.method) if ctx is not None else None   # sentencekv+kivi: quantized host KV
        d = keys.shape[-1]
        return ChunkStore(batch, keys.shape[1], self.max_chunk, d, keys.dtype, keys.device,
                          bounds=self.summary == "quest", cache_chunks=cache_chunks, capacity=capacity,
                          **(codec.store_options(d) if codec is not None else {}))

    def _offload(self, run, layer, state: SentenceKVState, ctx, row, final: bool) -> None:
        """Move the layer's prompt KV between the sinks and the recent window to the host store, as
        chunks (their summaries stay on the device); the device keeps the rest, sorted by position.
        ``final=False`` (a prefill chunk under ``prefill_offload``): only whole chunks that end before
        the recent window move, so no chunk is split between two writes."""
        if final and row is None and state.store is None and self._offload_dense(run, layer, state, ctx):
            return
        keys, values, pos = layer.keys, layer.values, layer.positions        # (b, hk, n, d), (b, hk, n)
        b, hk, n, d = keys.shape
        sinks, recent = self._window(run)
        pos64 = pos.to(torch.int64)
        row_len = pos64.amax(dim=(1, 2)) + 1                                 # (b,) tokens seen per row
        store = state.store
        if final and row is None and store is not None and store.shared:
            # a question over a reused context whose chunks are read by reference: its own tokens
            # stay on the device (offloading them would copy the context's host rows for it)
            self._set_device_tokens(state, pos64 >= 0, None)
            return
        offl = (pos64 >= sinks) & (pos64 < (row_len - recent)[:, None, None])
        # chunk labels of every logical position up to the prompt's end (computed once per prompt)
        length = int(row_len.max()) if final else max(int(row_len.max()), run.prompt_len)
        lab_pos = self._chunks_of_positions(run, ctx, b, length, keys.device)    # (b, length)
        lab = lab_pos.gather(1, pos64.clamp(min=0).reshape(b, -1)).reshape(b, hk, n)
        if not final:  # whole chunks only: those labelled before the chunk at the window's first position
            edge = lab_pos.gather(1, (row_len - recent).clamp(0, length - 1)[:, None])    # (b, 1)
            offl &= lab < edge[:, :, None]
        if not bool(offl.any()):
            if final and row is not None:  # a short row keeps everything on the device; it still bounds the split
                self._set_device_tokens(state, pos64 >= 0, row)
            return
        if store is not None and store.b != b and row is None:
            store.repeat_batch(b)
        if store is None:
            store = state.store = self._new_store(run, ctx, keys, row[1] if row else b,
                                                  # host store allocated once: rows, or a prompt offloaded as it is prefilled
                                                  capacity=max(1, run.prompt_len - sinks - recent) if row or not final
                                                  else 0)
        # chunk labels of the offloaded slots, renumbered 0.. per row
        big = torch.iinfo(torch.int64).max
        first = torch.where(offl, lab, big).amin(dim=(1, 2))                 # (b,)
        lab = torch.where(offl, lab - first[:, None, None], -1)
        n_new = int(lab.max()) + 1
        # order slots by position, rank tokens inside their chunk
        order = torch.where(offl, pos64, big).argsort(dim=-1)
        lab_s, offl_s = lab.gather(-1, order), offl.gather(-1, order)
        counts = torch.zeros(b, hk, n_new + 1, dtype=torch.int64, device=keys.device)
        counts.scatter_add_(-1, torch.where(offl_s, lab_s, n_new), torch.ones_like(lab_s))
        starts = counts.cumsum(-1) - counts
        rank = offl_s.cumsum(-1) - 1 - starts.gather(-1, lab_s.clamp(min=0))
        nz = offl_s.nonzero(as_tuple=True)                                   # (bi, hi, si)
        src = order[nz]                                                      # slot index in the layer
        r0 = row[0] if row else 0
        store.append(keys[nz[0], nz[1], src], values[nz[0], nz[1], src], pos[nz[0], nz[1], src],
                     (nz[0] + r0) * hk + nz[1], lab_s[nz], rank[nz], n_new, row=row[0] if row else None)
        # the device keeps sinks + recent (+ room for generated tokens), sorted by position
        keep = (pos64 >= 0) & ~offl
        m = int(keep.sum(-1).max())
        korder = torch.where(keep, pos64, big).argsort(dim=-1)[..., :m]
        kvalid = keep.gather(-1, korder)
        gi = korder[..., None].expand(b, hk, m, d)
        kpos = torch.where(kvalid, pos.gather(-1, korder), -1)
        new_k, new_v = keys.gather(2, gi), values.gather(2, gi)
        # mid-prefill the buffers keep room for the next prefill chunk, so it is written in place
        layer.set_kv(new_k, new_v, kpos, reserve=None if final else max(layer.cache.capacity_hint - m, 0))
        if final:
            self._set_device_tokens(state, keep, row)

    def _offload_dense(self, run, layer, state: SentenceKVState, ctx) -> bool:
        """:meth:`_offload` at the end of a batch prefill whose layer holds the prompts as the
        engine wrote them (every head: row ``i`` left-padded by ``L - len_i`` slots, then positions
        ``0..len_i-1``): the same store and device KV, with the offloaded tokens, their chunks and
        ranks and the kept slots taken as slices and host-side arithmetic on the prompt lengths and
        the chunk map instead of device sorts and about ten host syncs. False (nothing done) for
        any other layout.

        The plan is the same for every layer of the prompt: it is made once (:meth:`_dense_plan`)
        and reused. The layout is checked with one device sync on the first layer; where every
        stage before this one only changes how the prefill attends (``attention_only``), every
        layer holds what the engine wrote, so later layers are not checked again (a sync there
        would wait behind the earlier layers' offload copies on the copy engine: about 10 ms per
        layer at 128k on the H200, ``bench/results/profile_prefill_tail_h200.json``)."""
        keys, values, pos = layer.keys, layer.values, layer.positions        # (b, hk, n, d), (b, hk, n)
        b, hk, n, d = keys.shape
        ids = ctx.prompt_ids if ctx is not None else None
        if ids is None or len(ids) != b or not ids or max(len(r) for r in ids) != n:
            return False
        key = (b, hk, n, str(keys.device), pos.dtype)
        memo = run.dense_plan
        if memo is None or memo[0] != key or memo[1] is not ids:
            memo = run.dense_plan = [key, ids, self._dense_plan(run, ctx, ids, b, hk, n, keys.device, pos.dtype), None]
        plan, trusted = memo[2], memo[3]
        if trusted is False:
            return False
        if trusted is None:
            ok = bool(torch.equal(pos, plan["want"][:, None, :].expand(b, hk, n)))   # one device sync
            stages = getattr(ctx.method, "stages", None)
            before = None if stages is None else next((stages[:i] for i, st in enumerate(stages) if st is self), None)
            if stages is None or (before is not None and all(st.attention_only for st in before)):
                memo[3] = ok        # every layer holds the engine's layout, or none does
            if not ok:
                return False
        if plan["empty"]:
            return True   # nothing to offload (as the general path: the device keeps everything)
        sel, total = plan["sel"], plan["total"]

        def gathered(t: torch.Tensor) -> torch.Tensor:   # (b, hk, n, ...) -> (tokens, ...): one copy
            out = t.new_empty((total, *t.shape[3:]))
            at = 0
            for i, s, e in sel:
                out[at: at + hk * (e - s)].view(hk, e - s, *t.shape[3:]).copy_(t[i, :, s:e])
                at += hk * (e - s)
            return out

        k_off, v_off, p_off = gathered(keys), gathered(values), gathered(pos)
        store = state.store = self._new_store(run, ctx, keys, b, capacity=0)
        store.append(k_off, v_off, p_off, plan["bh"], plan["chunk"], plan["rank"], plan["n_new"], counts=plan["counts"],
                     counts_dev=plan["counts_dev"])
        # the device keeps sinks + recent, in position order; shorter rows padded with masked slots
        korder, kvalid, m = plan["korder"], plan["kvalid"], plan["m"]
        gi = korder[..., None].expand(b, hk, m, d)
        kpos = torch.where(kvalid, pos.gather(-1, korder), -1)
        layer.set_kv(keys.gather(2, gi), values.gather(2, gi), kpos, reserve=None, holes=plan["min_kept"] < m)
        self._set_device_tokens(state, plan["min_kept"], None)
        return True

    def _dense_plan(self, run, ctx, ids, b: int, hk: int, n: int, dev, pos_dtype) -> dict:
        """What :meth:`_offload_dense` needs of a batch of prompts, the same for every layer: the
        engine's positions ``want (batch, n)``, the offloaded spans, their tokens' rows, chunks and
        ranks (on ``dev``), the chunk sizes (host, and a copy on ``dev``), the kept slots and their
        count. Every upload is here, once per prompt: an upload from pageable host memory waits for
        the device's queue, and per layer that wait was most of the 0.5 s between ``sentencekv``'s
        prefill at 128k and ``full``'s (``bench/results/profile_prefill_tail_plan_h200.txt``)."""
        lens = [len(r) for r in ids]
        pads = [n - ln for ln in lens]
        ar = torch.arange(n)
        want = torch.stack([torch.where(ar >= p, ar - p, -1) for p in pads]).to(dev, pos_dtype)
        sinks, recent = self._window(run)
        spans = [(sinks, max(sinks, ln - recent)) for ln in lens]            # offloaded positions per row
        plan: dict = {"want": want, "empty": all(hi == lo for lo, hi in spans)}
        if plan["empty"]:
            return plan
        _, lab_host = self._chunk_map(run, ctx, b, n, dev)
        chunks, ranks, n_new = [], [], 0
        for (lo, hi), lab in zip(spans, lab_host):
            c = lab[lo:hi] - (lab[lo] if hi > lo else 0)                    # chunk labels renumbered 0.. per row
            cnt = torch.bincount(c, minlength=1)
            ranks.append(torch.arange(hi - lo) - (cnt.cumsum(0) - cnt)[c])
            chunks.append(c)
            n_new = max(n_new, int(c[-1]) + 1 if hi > lo else 0)
        counts = torch.stack([torch.bincount(c, minlength=n_new) for c in chunks])   # (b, n_new)
        # the offloaded tokens in (row, head, position) order, as the general path's nonzero
        sel = [(i, p + lo, p + hi) for i, ((lo, hi), p) in enumerate(zip(spans, pads)) if hi > lo]
        # per-token rows, chunks and ranks built on the device from one row's worth of each (a
        # pageable upload of every token's would cost about as much as the syncs saved)
        kept = [list(range(p, p + lo)) + list(range(p + hi, p + ln)) if hi > lo else list(range(p, p + ln))
                for (lo, hi), p, ln in zip(spans, pads, lens)]
        m = max(len(k) for k in kept)
        korder = torch.tensor([k + [k[0] if k else 0] * (m - len(k)) for k in kept], dtype=torch.int64)
        kvalid = torch.tensor([[True] * len(k) + [False] * (m - len(k)) for k in kept], dtype=torch.bool)
        counts = counts.repeat_interleave(hk, dim=0)                                   # (b * hk, n_new)
        plan.update(
            sel=sel, total=hk * sum(e - s for _, s, e in sel), n_new=n_new,
            counts=counts, counts_dev=counts.to(dev),   # uploaded once: a pageable upload per layer syncs
            bh=torch.cat([torch.arange(i * hk, (i + 1) * hk, device=dev).repeat_interleave(e - s) for i, s, e in sel]),
            chunk=torch.cat([chunks[i].to(dev, torch.int32).repeat(hk) for i, _, _ in sel]),
            rank=torch.cat([ranks[i].to(dev, torch.int32).repeat(hk) for i, _, _ in sel]),
            korder=korder.to(dev)[:, None].expand(b, hk, m), kvalid=kvalid.to(dev)[:, None].expand(b, hk, m),
            m=m, min_kept=min(len(k) for k in kept))
        return plan

    @staticmethod
    def _set_device_tokens(state: SentenceKVState, keep, row) -> None:
        """The fewest prompt tokens a head keeps on the device, over all rows (``keep``: the kept
        slots, ``(batch, kv_heads, n)`` bool, or that count already)."""
        dev = keep if isinstance(keep, int) else int(keep.sum(-1).min())
        if row is not None and state.dev_tokens is not None:  # rows one at a time: the fewest so far
            dev = min(dev, state.dev_tokens)
        state.dev_tokens = dev

    # ---- decode: score, select, fetch -----------------------------------------------------------
    def _fingerprint(self, run: SentenceKVRun, state: SentenceKVState, q: torch.Tensor, ctx) -> torch.Tensor:
        """``q (batch, q_heads, head_dim)`` -> the query that scores chunks, same shape."""
        if self.fingerprint == "token":
            return q
        qf = q.float()
        if state.fp_sum is None:
            state.fp_sum = torch.zeros_like(qf)
            state.fp_count = torch.zeros(q.shape[0], 1, 1, device=q.device)
        ids = ctx.input_ids if ctx is not None else None
        table = _end_tokens(ctx.tokenizer, q.device) if ids is not None else None
        if table is not None:
            memo = run.keep_memo  # the same for every layer of a step: computed once per step
            if memo is None or memo[0] is not ids or memo[1].device != q.device:
                last = ids[:, -1].to(q.device).clamp(0, table.numel() - 1)
                memo = (ids, (~table[last]).to(qf.dtype)[:, None, None])     # reset after a sentence end
                run.keep_memo = memo
            state.fp_sum.mul_(memo[1])
            state.fp_count.mul_(memo[1])
        state.fp_sum.add_(qf)
        state.fp_count.add_(1.0)
        return (state.fp_sum / state.fp_count).to(q.dtype)

    def plan(self, run, layer, query, ctx):
        if ctx.decoding and layer.layer_idx == 0:  # decode steps, counted on the device
            if run.steps is None:
                run.steps = torch.zeros(1, dtype=torch.int64, device=query.device)
            run.steps.add_(1)
        state: SentenceKVState | None = layer.state.get(self.name)
        store = state.store if state is not None else None
        if store is None or store.n == 0:
            return None
        b, hk = store.b, store.hk
        # chunk tokens = budget - prompt tokens already on the device (after an eviction some heads
        # keep fewer sinks/recent tokens: the fewest is used, so every head gets its share)
        dev_tokens = state.dev_tokens if state.dev_tokens is not None else sum(self._window(run))
        budget = run.sel_tokens - dev_tokens
        hold = ctx.decoding and self.reselect_every > 1
        if not ctx.decoding:
            # a prefill chunk over stored chunks (a reused context, or this prompt's earlier chunks
            # under prefill_offload): every stored chunk (exact), or those the chunk's queries select
            budget = store.max_tokens if run.prefill_tokens is None else run.prefill_tokens
            if budget < store.max_tokens:
                w, qpos, L = self.prefill_window, ctx.cache.step_positions, query.shape[2]
                step = self.prefill_block or L
                blocks = []
                for s in range(0, L, step):   # one selection per block of queries (the whole chunk: one)
                    q, p = query[:, :, s:s + step], (qpos[:, s:s + step] if qpos is not None else None)
                    fp = _mean_query(q[:, :, -w:] if w else q, p[:, -w:] if w and p is not None else p)
                    idx = self._select_chunks(store, fp, budget)
                    blocks.append((s, store.source(idx, None, cached=False)))
                return Selection(extra=blocks[0][1]) if len(blocks) == 1 else Selection(blocks=blocks)
        else:
            fp = self._fingerprint(run, state, query[:, :, -1], ctx)
            if hold and not self.decode_variant(run, ctx.step) and state.held is not None:
                return Selection(extra=state.held)  # this layer's last selection: no scoring, no fetch
        if budget <= 0:
            idx = torch.full((b, hk, 0), -1, dtype=torch.int64, device=query.device)
        elif budget >= store.max_tokens:  # every chunk fits: no scoring needed (exact)
            idx = torch.arange(store.n, device=query.device).expand(b, hk, store.n)
        else:
            if ctx.decoding and self.warm_cache and store.cache_cold:   # a host-side test: the first
                self._warm(store, fp, budget, run)                      # step, never a recording
            idx = self._select_chunks(store, fp, budget)
        # read in place: the device chunk cache (or the fetched copies) plus a slot table; a prefill
        # chunk's fetch is a one-off copy (its many chunks neither fill nor size the decode cache)
        src = store.source(idx, run.fetch if ctx.decoding else None, cached=ctx.decoding)
        return Selection(extra=self._hold(state, store, src) if hold else src)

    def _select_chunks(self, store: ChunkStore, fp: torch.Tensor, budget: int,
                       max_chunks: int | None = None) -> torch.Tensor:
        """The stored chunks ``fp (batch, q_heads, head_dim)`` scores best whose tokens fit
        ``budget`` per (batch, kv_head): ``(batch, kv_heads, k)`` ascending chunk ids (= position
        order), -1 at the end (``k``: the most chunks that can fit, no host sync to trim; at most
        ``max_chunks``)."""
        summ = store.summaries()
        parts = summ if isinstance(summ, tuple) else (summ,)
        scores = chunk_scores(fp.to(parts[0].dtype), summ, self.reduce)
        kcap = max(1, store.max_chunks_within(budget))
        if max_chunks is not None:
            kcap = min(kcap, max_chunks)
        return select_chunks(scores, store.lens[:, :, : store.n], budget, max_chunks=kcap)

    def _warm(self, store: ChunkStore, fp: torch.Tensor, budget: int, run: SentenceKVRun) -> None:
        """``warm_cache``: fill the empty device chunk cache (sized, as without this, by one
        step's selection of ``budget`` tokens) with the chunks ``fp`` scores best, as many as its
        slots hold; the step's own selection, made next, is then all hits. After a stack that
        carried running rows' caches, only the rows that came in empty are filled (the others'
        entries are -1: nothing fetched, nothing evicted). Counted in ``run.fetch``."""
        k = max(1, store.max_chunks_within(budget))
        cold = store.cold_rows   # None: every row (read before the cache is made)
        slots = store.cache_slots(k)
        if slots > k:
            wide = self._select_chunks(store, fp, budget * slots // k, max_chunks=slots)
            if cold is not None:   # a stack's new rows beside rows whose caches it carried: theirs only
                wide[[i for i in range(store.b) if i not in cold]] = -1
            store.fetch(wide, run.fetch, slots=True)

    @staticmethod
    def _hold(state: SentenceKVState, store: ChunkStore, src: SlotSource) -> SlotSource:
        """Keep a selection for the next ``reselect_every - 1`` steps in buffers that outlive the step
        (a step that keeps it may run from another CUDA graph): the device chunk cache is held by
        reference, everything else is copied into buffers made at the first selection (the warm-up
        step, never inside a recording) and refilled in place."""
        prev = state.held
        parts = (src.keys, src.values, src.positions, src.slots)
        if (prev is not None and prev.slots.shape == src.slots.shape and prev.keys.shape == src.keys.shape
                and prev.dense == src.dense):
            for dst, part in zip((prev.keys, prev.values, prev.positions, prev.slots), parts):
                if dst.data_ptr() != part.data_ptr():
                    dst.copy_(part)
            return prev
        cache = store._dev
        own = {t.untyped_storage().data_ptr() for t in cache.values()} if cache else set()
        state.held = SlotSource(*(t if i < 3 and t.untyped_storage().data_ptr() in own else t.clone()
                                  for i, t in enumerate(parts)), dense=src.dense)
        return state.held

    def chunk_invariant(self) -> bool:
        return not self.prefill_offload   # offloading as it goes cuts chunks at prefill-chunk ends

    def shares_prefix(self) -> bool:
        return not self.prefill_offload   # segments and offloads at the prefill's end

    def joins_rows(self) -> bool:
        """A joining request is prefilled alone into its own store; the running batch's rows are then
        stacked with it (:meth:`restack_state`: its host rows read where they are, nothing copied).
        Not with ``reselect_every > 1`` (held selections are per batch step)."""
        return self.reselect_every == 1

    def join_token(self, run) -> int:
        return run.sel_tokens  # the decode budget is the batch run's: joined rows must share it

    def restack_state(self, layer, sources) -> None:
        """The running batch's rows changed: one store over the sources' rows (``ChunkStore.stack``),
        their query fingerprints gathered; the fewest device prompt tokens of the rows that store
        chunks (equal for prompts longer than the window: sinks + recent)."""
        states = [(src.state.get(self.name), row) for src, row in sources]
        if all(st is None for st, _ in states):
            return
        new = SentenceKVState()
        stores = [(st.store if st is not None else None, row) for st, row in states]
        if any(s is not None for s, _ in stores):
            new.store = ChunkStore.stack(stores)
        fps = [(st.fp_sum[row], st.fp_count[row]) if st is not None and st.fp_sum is not None else None
               for st, row in states]
        ref = next((f for f in fps if f is not None), None)
        if ref is not None:
            new.fp_sum = torch.stack([f[0] if f is not None else torch.zeros_like(ref[0]) for f in fps])
            new.fp_count = torch.stack([f[1] if f is not None else torch.zeros_like(ref[1]) for f in fps])
        dev = [st.dev_tokens for st, _ in states if st is not None and st.store is not None and st.dev_tokens is not None]
        new.dev_tokens = min(dev) if dev else None
        layer.state[self.name] = new

    def row_prefill_ok(self) -> bool:
        # one host store for the batch, each row written into it once (ChunkStore.append row=); a
        # prompt offloaded as it is prefilled keeps the device small already
        return not self.prefill_offload

    def prefill_hold(self, run) -> int | None:
        """Under ``prefill_offload``: sinks + recent + the chunk that straddles the window's start."""
        if not self.prefill_offload:
            return None
        sinks, recent = self._window(run)
        return sinks + recent + self.max_chunk

    def offloads_to_host(self) -> bool:
        return True  # the prompt's chunks live in the host store

    def decode_variant(self, run, step):
        """``reselect_every > 1``: True when step ``step`` selects chunks anew, False when it keeps
        the layers' last selections."""
        return self.reselect_every == 1 or step % self.reselect_every == 0

    def stats(self, run) -> dict[str, Any]:
        f = run.fetch
        calls = f.value("calls")
        if calls == 0:
            return {}
        steps = max(1, int(run.steps.item()) if run.steps is not None else 0)
        out: dict[str, Any] = {}
        out["chunks_selected_per_head"] = f.value("chunks") / max(1, f.value("head_calls"))
        out["chunks_copied_per_step"] = f.value("copied_chunks") / steps
        out["fetch_mib_per_step"] = f.value("copied_bytes") / steps / 2**20
        out["fetch_ms_per_step"] = 1000.0 * f.fetch_s / steps
        if f.value("cache_lookups"):
            out["device_cache_hit_rate"] = f.value("cache_hits") / f.value("cache_lookups")
        return out


_SEGMENTER = None


def _segmenter():
    """One worker thread that segments prompts beside their prefill (made on first use)."""
    global _SEGMENTER
    if _SEGMENTER is None:
        from concurrent.futures import ThreadPoolExecutor

        _SEGMENTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvsift-segment")
    return _SEGMENTER


def _mean_query(query: torch.Tensor, query_pos: torch.Tensor | None) -> torch.Tensor:
    """``query (batch, q_heads, L, head_dim)`` of a prefill chunk -> its mean over the chunk's real
    tokens (``query_pos (batch, L)``, -1 = padding), ``(batch, q_heads, head_dim)``: what scores the
    stored chunks for it (InfLLM's chunk-level retrieval)."""
    q = query.float()
    if query_pos is None:
        return q.mean(2).to(query.dtype)
    w = (query_pos >= 0).to(q.dtype)[:, None, :, None]                     # (b, 1, L, 1)
    return ((q * w).sum(2) / w.sum(2).clamp(min=1.0)).to(query.dtype)


_DEVICE_END_TABLES: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}


def _end_tokens(tokenizer, device) -> torch.Tensor | None:
    """``(vocab,)`` bool on ``device``: tokens whose text ends a sentence (cached per tokenizer)."""
    if tokenizer is None:
        return None
    key = (id(tokenizer), str(device))
    hit = _DEVICE_END_TABLES.get(key)
    if hit is None or hit[0] is not tokenizer:
        hit = (tokenizer, sentence_end_table(tokenizer).to(device))
        _DEVICE_END_TABLES[key] = hit
    return hit[1]


_END_TABLES: dict[int, tuple[Any, torch.Tensor]] = {}


def sentence_end_table(tokenizer) -> torch.Tensor:
    """``(vocab,)`` bool: tokens whose text ends a sentence (``.!?`` and CJK stops, optionally
    followed by closing quotes/space, or a newline). Built once per tokenizer (~0.2 s for 50k tokens)."""
    hit = _END_TABLES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    from kvsift.segment.pieces import _byte_decoder, _is_byte_level

    ids = list(range(len(tokenizer)))
    if _is_byte_level(tokenizer):
        bdec = _byte_decoder()
        pieces = [bytes(bdec.get(c, 32) for c in (t or "")).decode("utf-8", "ignore")
                  for t in tokenizer.convert_ids_to_tokens(ids)]
    else:
        pieces = tokenizer.batch_decode([[i] for i in ids])
    table = torch.tensor([bool(_END_PIECE.search(p)) for p in pieces], dtype=torch.bool)
    _END_TABLES[id(tokenizer)] = (tokenizer, table)
    return table
