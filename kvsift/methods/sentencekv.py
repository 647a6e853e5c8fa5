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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsift.kernels.dispatch import chunk_scores, select_chunks
from kvsift.methods._offload import ChunkStore, FetchStats
from kvsift.methods.base import Budget, KVMethod, SlotSelection, register, validate_budget
from kvsift.segment import SegmentConfig, segment_tokens

STORE_KEY = "sentencekv"          # layer.state key of the ChunkStore
FP_KEY = "sentencekv_fp"          # layer.state key of the query fingerprint [sum, count]
SPLIT_KEY = "sentencekv_split"    # device slots placed before the fetched chunks (the sinks)
DEV_KEY = "sentencekv_device"     # prompt tokens kept on the device (fewest over kv heads)
SEL_KEY = "sentencekv_selection"  # (generation, step, keys, values, positions) of the last fetch (reselect_every > 1)
_END_PIECE = re.compile(r"([.!?。！？…][\"'”’)\]]*\s*$)|\n")


@register("sentencekv")
@dataclass
class SentenceKV(KVMethod):
    """SentenceKV: sentence chunks offloaded to host memory, top chunks fetched back at decode."""

    sinks: int = 4
    recent: int = 64
    min_chunk: int = 8
    max_chunk: int = 32
    splitter: str = "rules"
    fingerprint: str = "sentence"   # "sentence": mean query of the current sentence | "token": current query
    summary: str = "mean"           # "mean": mean keys | "quest": min/max bounds
    reduce: str = "mean"            # how the query heads of a GQA group combine their scores: mean | max
    decode_budget: Budget = None    # prompt tokens attended at decode (default: budget)
    cache_chunks: int | None = None  # device LRU chunk slots per (batch, kv_head); None: CPU 0, CUDA 2x selection
    reselect_every: int = 1         # decode steps a layer's chunk selection is kept (1: select every step)
    _fetch: FetchStats = field(default_factory=FetchStats, init=False, repr=False)
    _chunk_map: Any = field(default=None, init=False, repr=False)
    _end_table: Any = field(default=None, init=False, repr=False)
    _sel_tokens: int = field(default=0, init=False, repr=False)
    _steps: int = field(default=0, init=False, repr=False)
    _keep_memo: Any = field(default=None, init=False, repr=False)
    _gen: Any = field(default=None, init=False, repr=False)
    _captured: Any = field(default=None, init=False, repr=False)   # host counters before a graph capture
    _per_step: Any = field(default=None, init=False, repr=False)   # their increments over one recorded step

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

    # ---- lifecycle ---------------------------------------------------------------------------
    def setup(self, cache, prompt_len: int, num_layers: int) -> None:
        super().setup(cache, prompt_len, num_layers)
        if self.decode_budget is None:
            self._sel_tokens = self.tokens
        elif isinstance(self.decode_budget, float) and self.decode_budget <= 1.0:
            self._sel_tokens = max(1, math.ceil(self.decode_budget * prompt_len))
        else:
            self._sel_tokens = min(int(self.decode_budget), prompt_len)
        self._fetch = FetchStats()
        self._chunk_map = None
        self._steps = 0
        self._keep_memo = None
        self._per_step = None
        self._gen = object()  # tags this generation's held selections (a reused context may hold older ones)

    def _window(self) -> tuple[int, int]:
        """(sinks, recent) clipped so that they fit the decode budget."""
        sinks = min(self.sinks, self._sel_tokens)
        recent = min(self.recent, self._sel_tokens - sinks)
        return sinks, recent

    # ---- prefill: segment, summarise, offload ----------------------------------------------
    def _chunks_of_positions(self, ctx, batch: int, length: int, device) -> torch.Tensor:
        """``(batch, length)`` int64 chunk label of every logical position (labels increase with
        position). Prompt tokens get sentence-aligned chunks when the engine passed the prompt ids
        and tokenizer (``ctx.info["prompt_ids"]``, ``ctx.info["tokenizer"]``); positions before
        them (a reused context) and runs without ids get fixed chunks of ``max_chunk``."""
        ids = ctx.info.get("prompt_ids") if ctx is not None else None
        key = (batch, length, str(device))
        if self._chunk_map is not None and self._chunk_map[0] == key and self._chunk_map[2] is ids:
            return self._chunk_map[1]
        cfg = SegmentConfig(self.min_chunk, self.max_chunk, self.splitter)
        tok = ctx.info.get("tokenizer") if ctx is not None else None
        fixed = torch.arange(length) // self.max_chunk
        out = fixed.repeat(batch, 1)
        rows = list(ids) if ids is not None and len(ids) == batch else []
        longest = max((len(r) for r in rows), default=0)
        base = length - longest  # a reused context's tokens come first, then each row's prompt
        if rows and 0 < longest <= length:
            nfix = int(fixed[base - 1]) + 1 if base > 0 else 0
            for i, row in enumerate(rows):
                if not len(row):
                    continue
                spans = segment_tokens(row, tok, cfg)
                lens = torch.tensor([e - s for s, e in spans], dtype=torch.long)
                lab = torch.repeat_interleave(torch.arange(len(spans)), lens)
                out[i, base: base + len(row)] = lab + nfix
        out = out.to(device)
        self._chunk_map = (key, out, ids)
        return out

    def prefill_end(self, layer, query, module, ctx) -> None:
        if layer.k_buf is None or layer.length == 0:
            return
        # sequences prefilled one at a time (``ctx.info["row"] = (i, batch)``): this layer is row i's
        # and the method's state (one store for the batch) lives in the batch cache's layer
        row = ctx.info.get("row") if ctx is not None else None
        state = ctx.info["row_states"][layer.layer_idx] if row is not None else layer.state
        state.pop(FP_KEY, None)
        if self.fingerprint == "sentence" and ctx is not None:  # built here, not in decode time
            self._end_tokens(ctx.info.get("tokenizer"), layer.k_buf.device)
        keys, values, pos = layer.keys, layer.values, layer.positions        # (b, hk, n, d), (b, hk, n)
        b, hk, n, d = keys.shape
        sinks, recent = self._window()
        row_len = pos.amax(dim=(1, 2)).to(torch.int64) + 1                   # (b,) tokens seen per row
        pos64 = pos.to(torch.int64)
        offl = (pos64 >= sinks) & (pos64 < (row_len - recent)[:, None, None])
        if not bool(offl.any()):
            if row is not None:  # a short row keeps everything on the device; it still bounds the split
                self._set_split(state, pos64, pos64 >= 0, sinks, row)
            return
        store = state.get(STORE_KEY)
        if store is not None and store.b != b and row is None:
            store.repeat_batch(b)
        if store is None:
            cache_chunks = self.cache_chunks
            if cache_chunks is None:
                cache_chunks = -1 if keys.device.type == "cuda" else 0
            store = ChunkStore(row[1] if row else b, hk, self.max_chunk, d, keys.dtype, keys.device,
                               bounds=self.summary == "quest", cache_chunks=cache_chunks,
                               capacity=self.prompt_len if row else 0)  # rows: host store allocated once
            state[STORE_KEY] = store
        # chunk labels of the offloaded slots, renumbered 0.. per row
        length = int(row_len.max())
        lab_pos = self._chunks_of_positions(ctx, b, length, keys.device)    # (b, length)
        lab = lab_pos.gather(1, pos64.clamp(min=0).reshape(b, -1)).reshape(b, hk, n)
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
        layer.set_kv(new_k, new_v, kpos)
        self._set_split(state, kpos, keep, sinks, row)
        state["plan_prefill"] = True  # a later prefill (reused context) must see the host chunks

    @staticmethod
    def _set_split(state, kpos, keep, sinks, row) -> None:
        """Device slots holding sinks in every head (they go before the fetched chunks, in position
        order) and the fewest prompt tokens a head keeps on the device; over all rows."""
        split, dev = int(((kpos >= 0) & (kpos < sinks)).sum(-1).min()), int(keep.sum(-1).min())
        if row is not None:  # rows prefilled one at a time: the fewest over the rows so far
            split, dev = min(split, state.get(SPLIT_KEY, split)), min(dev, state.get(DEV_KEY, dev))
        state[SPLIT_KEY], state[DEV_KEY] = split, dev

    # ---- decode: score, select, fetch -----------------------------------------------------------
    def _end_tokens(self, tokenizer, device) -> torch.Tensor | None:
        """``(vocab,)`` bool on ``device``: tokens whose text ends a sentence."""
        if tokenizer is None:
            return None
        if self._end_table is None or self._end_table[0] is not tokenizer or self._end_table[1].device != device:
            self._end_table = (tokenizer, sentence_end_table(tokenizer).to(device))
        return self._end_table[1]

    def _fingerprint(self, layer, q: torch.Tensor, ctx) -> torch.Tensor:
        """``q (batch, q_heads, head_dim)`` -> the query that scores chunks, same shape."""
        if self.fingerprint == "token":
            return q
        st = layer.state.get(FP_KEY)
        qf = q.float()
        if st is None:
            st = [torch.zeros_like(qf), torch.zeros(q.shape[0], 1, 1, device=q.device)]
            layer.state[FP_KEY] = st
        ids = ctx.info.get("input_ids") if ctx is not None else None
        table = self._end_tokens(ctx.info.get("tokenizer"), q.device) if ids is not None else None
        if table is not None:
            memo = self._keep_memo  # the same for every layer of a step: computed once per step
            if memo is None or memo[0] is not ids or memo[1].device != q.device:
                last = ids[:, -1].to(q.device).clamp(0, table.numel() - 1)
                memo = (ids, (~table[last]).to(qf.dtype)[:, None, None])     # reset after a sentence end
                self._keep_memo = memo
            keep = memo[1]
            st[0].mul_(keep)
            st[1].mul_(keep)
        st[0].add_(qf)
        st[1].add_(1.0)
        return (st[0] / st[1]).to(q.dtype)

    def plan(self, layer, query, ctx):
        store: ChunkStore | None = layer.state.get(STORE_KEY)
        if store is None or store.n == 0:
            return None
        b, hk = store.b, store.hk
        # chunk tokens = budget - prompt tokens already on the device (after an eviction some heads
        # keep fewer sinks/recent tokens: the fewest is used, so every head gets its share)
        budget = self._sel_tokens - layer.state.get(DEV_KEY, sum(self._window()))
        if not ctx.decoding:  # prefill over a reused context: attend to everything (exact)
            budget = store.max_tokens
        else:
            fp = self._fingerprint(layer, query[:, :, -1], ctx)
            if layer.layer_idx == 0:
                self._steps += 1
        held = layer.state.get(SEL_KEY) if ctx.decoding and self.reselect_every > 1 else None
        if held is not None and held[0] is self._gen and self._steps - held[1] < self.reselect_every:
            if isinstance(held[2], SlotSelection):  # static decode: the held tables, read in place
                return held[2]
            return self._assemble(layer, *held[2:])  # keep this layer's last selection (no scoring, no fetch)
        if budget <= 0:
            idx = torch.full((b, hk, 0), -1, dtype=torch.int64, device=query.device)
        elif budget >= store.max_tokens:  # every chunk fits: no scoring needed (exact)
            idx = torch.arange(store.n, device=query.device).expand(b, hk, store.n)
        else:
            summ = store.summaries()
            parts = summ if isinstance(summ, tuple) else (summ,)
            scores = chunk_scores(fp.to(parts[0].dtype), summ, self.reduce)
            # width: the most chunks that can fit the budget (no per-step host sync to trim)
            kcap = max(1, store.max_chunks_within(budget))
            # ascending chunk ids (= position order), -1 at the end
            idx = select_chunks(scores, store.lens[:, :, : store.n], budget, max_chunks=kcap)
        if ctx.cache.static:  # static decode: the kernel reads the chunks in place (no gather, no concat)
            sel = SlotSelection(*store.fetch(idx, self._fetch, slots=True))
            return self._hold(layer, store, sel) if ctx.decoding and self.reselect_every > 1 else sel
        fk, fv, fp_ = store.fetch(idx, self._fetch if ctx.decoding else None)
        if ctx.decoding and self.reselect_every > 1:
            layer.state[SEL_KEY] = (self._gen, self._steps, fk, fv, fp_)
        return self._assemble(layer, fk, fv, fp_)

    def _hold(self, layer, store: ChunkStore, sel: SlotSelection) -> SlotSelection:
        """Keep a static selection for the next ``reselect_every - 1`` steps in buffers that outlive
        the step (a step that keeps it may be another CUDA graph): the device chunk cache is held by
        reference, everything else is copied into buffers made at the first selection (the warm-up
        step, never inside a recording) and refilled in place."""
        prev = layer.state.get(SEL_KEY)
        cache = store._dev
        parts = (sel.keys, sel.values, sel.positions, sel.slots)
        if prev is not None and prev[0] is self._gen and isinstance(prev[2], SlotSelection) \
                and prev[2].slots.shape == sel.slots.shape:
            buf = prev[2]
            for dst, src in zip((buf.keys, buf.values, buf.positions, buf.slots), parts):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        else:
            own = {t.untyped_storage().data_ptr() for t in cache.values()} if cache else set()
            buf = SlotSelection(*(t if i < 3 and t.untyped_storage().data_ptr() in own else t.clone()
                                  for i, t in enumerate(parts)))
        layer.state[SEL_KEY] = (self._gen, self._steps, buf)
        return buf

    def _assemble(self, layer, fk, fv, fp_):
        """Device tokens before the split (sinks), the fetched chunks, then the other device tokens
        (recent window, generated tokens): ``(keys, values, positions)`` in position order."""
        split = layer.state.get(SPLIT_KEY, 0)
        k, v, p = layer.keys, layer.values, layer.positions
        keys = torch.cat([k[:, :, :split], fk.to(k.dtype), k[:, :, split:]], dim=2)
        values = torch.cat([v[:, :, :split], fv.to(v.dtype), v[:, :, split:]], dim=2)
        positions = torch.cat([p[:, :, :split], fp_, p[:, :, split:]], dim=2)
        return keys, values, positions

    def row_prefill_ok(self) -> bool:
        return True  # one host store for the batch, each row written into it (ChunkStore.append row=)

    # ---- static decode (CUDA graphs) ---------------------------------------------------------
    def decode_variant(self):
        """``reselect_every > 1``: True when the next step selects chunks anew, False when it keeps
        the layers' last selections (held selections age by the host-side step counter)."""
        return self.reselect_every == 1 or self._steps % self.reselect_every == 0

    def _counters(self) -> tuple[int, int, int]:
        return self._fetch.calls, self._fetch.head_calls, self._steps

    def before_capture(self) -> None:
        self._captured = (self._counters(), self.decode_variant())

    def after_capture(self) -> None:
        """The recorded step did not run: restore the host counters, remember one step's increments
        (per kind of step)."""
        cap, self._captured = self._captured, None
        if cap is None:
            return
        before, kind = cap
        now = self._counters()
        if self._per_step is None:
            self._per_step = {}
        self._per_step[kind] = tuple(a - b for a, b in zip(now, before))
        self._fetch.calls, self._fetch.head_calls, self._steps = before

    def replayed(self, n: int = 1) -> None:
        for _ in range(n):
            inc = (self._per_step or {}).get(self.decode_variant())
            if inc:
                self._fetch.calls += inc[0]
                self._fetch.head_calls += inc[1]
                self._steps += inc[2]

    def stats(self) -> dict[str, Any]:
        f = self._fetch
        steps = self._steps
        out: dict[str, Any] = {}
        if f.calls == 0:
            return out
        out["chunks_selected_per_head"] = f.value("chunks") / max(1, f.head_calls)
        out["chunks_copied_per_step"] = f.value("copied_chunks") / max(1, steps)
        out["fetch_mib_per_step"] = f.value("copied_bytes") / max(1, steps) / 2**20
        out["fetch_ms_per_step"] = 1000.0 * f.fetch_s / max(1, steps)
        if f.value("cache_lookups"):
            out["device_cache_hit_rate"] = f.value("cache_hits") / f.value("cache_lookups")
        return out


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
