"""``quest``: Quest (Tang et al., 2024, arXiv 2406.10774) - query-aware page selection at decode.

Each row's tokens are cut into pages of ``page`` tokens, counted from its first one in slot order
(so padding before a prompt, or between a prompt and the decode slots of a batch it joined, moves
no page: the row reads the pages it reads alone). Each page keeps per-channel min and max of
its keys; at every decode step the query scores every complete page with the upper bound
``sum_d max(q_d * kmin_d, q_d * kmax_d)`` of ``q . k`` over the page (GQA groups reduced by
``reduce``), the best ``budget // page`` pages are attended together with the page being filled
(which holds the newest tokens), read in place through a slot table (no KV copies on CUDA): page
indices where a row's tokens fill slots 0 .., else the pages' slots through the row's rank-to-slot
table (:class:`QuestState`).

The full KV stays on the device: Quest saves reads, not memory. It composes after an eviction
(``snapkv+quest``: SnapKV keeps its budget at prefill, Quest selects among what is kept at
decode, with ``decode_budget`` tokens). Summaries are built at the first decode step from the
buffer and kept current as tokens are appended (``on_append``), on the device, under CUDA graphs.
With a budget of the whole prompt every page is attended and the output equals ``full``.

``bounds="int8"`` keeps the bounds as int8 codes with one power-of-two scale per channel (rounded
outward, so a page's score is still an upper bound; :func:`~kvsift.kernels.chunk_scores.int8_bounds`):
the score reads half the bytes, and the summaries take half the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsift.kernels.chunk_scores import int8_bounds, key_bounds
from kvsift.kernels.dispatch import chunk_scores, page_bounds_append
from kvsift.methods.base import DecodeSelect, LayerState, Selection, check_int_options, register, top_pages


@dataclass
class QuestState(LayerState):
    """Page summaries of one layer: ``kmin``/``kmax`` ``(batch, kv_heads, n_pages, head_dim)`` and
    ``filled (batch, kv_heads, n_pages)`` bool (the page holds at least one real token), for pages
    covering the whole buffer (room for decode tokens included).

    A page is ``page`` consecutive real tokens of a row, counted from its first one, as when the row
    runs alone. Where every row's real tokens fill slots ``0 ..`` (one prompt, or a batch of equal
    lengths) a token's rank among them is its slot, and pages are slot ranges (``slot_of`` None).
    Otherwise (left padding, rows of other lengths stacked into a running batch with padding
    between their prompt and the common decode slots) ``slot_of (batch, kv_heads, capacity)`` int64
    maps a rank to its slot (-1: none yet) and ``count (batch, kv_heads, 1)`` int64 counts each
    row's real tokens, so every row's pages are the ones it has alone.

    Int8 bounds (``bounds="int8"``): ``kmin``/``kmax`` int8 codes, ``kscale``/``kinv (batch,
    kv_heads, 1, head_dim)`` float32 the per-channel power-of-two scale and its inverse."""

    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    filled: torch.Tensor | None = None
    page_ids: torch.Tensor | None = None   # (n_pages,) int64: 0 .. n_pages-1
    slot_of: torch.Tensor | None = None
    count: torch.Tensor | None = None
    kscale: torch.Tensor | None = None
    kinv: torch.Tensor | None = None

    def repeat_batch(self, times: int) -> None:
        for name in ("kmin", "kmax", "filled", "slot_of", "count", "kscale", "kinv"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).repeat_interleave(times, 0))

    @property
    def pages(self) -> int:
        return 0 if self.kmin is None else self.kmin.shape[2]


def _bounds(keys: torch.Tensor, positions: torch.Tensor, page: int, pages: int):
    """``(kmin, kmax, filled)`` of ``pages`` pages over ``keys (batch, kv_heads, n, dim)`` (slots
    past ``n`` and padding, position -1, are left out)."""
    b, h, n, d = keys.shape
    width = pages * page
    valid = positions >= 0
    big = torch.finfo(keys.dtype).max
    lo = torch.full((b, h, width, d), big, dtype=keys.dtype, device=keys.device)
    hi = torch.full((b, h, width, d), -big, dtype=keys.dtype, device=keys.device)
    m = min(n, width)
    v = valid[:, :, :m, None]
    lo[:, :, :m] = torch.where(v, keys[:, :, :m], big)
    hi[:, :, :m] = torch.where(v, keys[:, :, :m], -big)
    filled = torch.zeros(b, h, width, dtype=torch.bool, device=keys.device)
    filled[:, :, :m] = valid[:, :, :m]
    return (lo.view(b, h, pages, page, d).amin(3), hi.view(b, h, pages, page, d).amax(3),
            filled.view(b, h, pages, page).any(3))


def _ranked(keys: torch.Tensor, positions: torch.Tensor, page: int, pages: int, capacity: int):
    """:func:`_bounds` over each row's real tokens in slot order (padding and holes skipped), plus
    ``slot_of (batch, kv_heads, capacity)`` (rank -> slot, -1 past the row's tokens) and ``count
    (batch, kv_heads, 1)``."""
    b, h, n, d = keys.shape
    valid = positions >= 0
    rank = valid.long().cumsum(-1) - 1                                       # (b, h, n)
    count = valid.sum(-1, keepdim=True)                                      # (b, h, 1)
    dump = pages * page                                                      # padding goes past the pages
    where = torch.where(valid, rank, dump)
    slot_of = torch.full((b, h, max(capacity, dump) + 1), -1, dtype=torch.long, device=keys.device)
    slot_of.scatter_(2, where, torch.arange(n, device=keys.device).expand(b, h, n))
    slot_of = slot_of[:, :, :capacity].contiguous()
    dense = torch.zeros(b, h, dump + 1, d, dtype=keys.dtype, device=keys.device)
    dense.scatter_(2, where[..., None].expand(b, h, n, d), keys)
    pos = torch.full((b, h, dump + 1), -1, dtype=positions.dtype, device=keys.device)
    pos.scatter_(2, where, torch.where(valid, positions, -1))
    pos[:, :, dump] = -1
    lo, hi, filled = _bounds(dense[:, :, :dump], pos[:, :, :dump], page, pages)
    return lo, hi, filled, slot_of, count


def refine_slots(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, cand: torch.Tensor, keep: int,
                 reduce: str = "max", page: int = 1, tail: torch.Tensor | None = None) -> torch.Tensor:
    """The best ``keep`` of the candidate slots ``cand (batch, kv_heads, n)`` (negative: none; with
    ``page > 1``, ``cand (batch, kv_heads, m)`` are page indices and the ``n = m * page`` candidates
    their pages' slots) by the exact ``q . k`` of ``q (batch, heads, head_dim)`` with ``keys (batch,
    kv_heads, cap, head_dim)`` (``key_pos (batch, kv_heads, cap)``: ``-1`` at empty slots, never
    picked), a GQA group's heads reduced by ``reduce`` (``"votes"``: TokenSelect's per-head softmax
    votes over the candidates, :mod:`kvsift.kernels.slot_scores`). Returns ``(batch, kv_heads,
    min(keep, n))`` int64 slots in the candidates' order, ``-1`` at the end where fewer are valid;
    with ``tail (batch, kv_heads, 1)`` a page index (the page being filled, always attended),
    ``page`` more columns: its slots (``-1`` past the buffer). Three launches on CUDA
    (``slot_scores``, two for ``"votes"``; ``topk_select``; ``pick_slots``), no host sync:
    Quest's ``refine`` stage."""
    from kvsift.kernels.dispatch import pick_slots, slot_scores, topk_select

    s = slot_scores(q.to(keys.dtype), keys, key_pos, cand, reduce, page)        # (b, h, n), -inf: none
    at = topk_select(s, min(s.shape[-1], keep), torch.int64)                  # ascending, -1 padded
    return pick_slots(at, cand, page, tail, keys.shape[2])


@register("quest")
@dataclass(frozen=True)
class Quest(DecodeSelect):
    """Quest: query-aware top-k pages by per-channel key min/max bounds, read in place at decode.

    Parameters
    ----------
    budget : int | float
        Tokens attended per layer and KV head at each decode step (``budget // page`` pages), on
        top of the page being filled.
    page : int
        Slots per page (16 in the paper).
    reduce : str
        How the query heads of a GQA group combine their page scores: ``max`` or ``mean``.
    decode_budget : int | float | None
        Tokens attended at decode when composed after an eviction (default: ``budget``).
    bounds : str
        How the page bounds are stored: ``float`` (the keys' dtype, as in the paper) or ``int8``
        (codes with one power-of-two scale per channel, rounded outward: half the bytes read by
        each step's scoring and half the summaries' memory, slightly looser bounds).
    dense_layers : int
        The first this many layers attend every token at decode (no summaries, no selection):
        the paper's evaluation leaves its first two layers dense, where attention is least
        sparse. 0 (the default): every layer selects.
    refine : int
        1 (the default): the paper's page selection. ``N > 1``: a second, exact stage (not in the
        paper): the best ``N * (budget // page)`` pages by their bounds are candidates, their
        tokens are ranked by the true ``q . k`` (GQA groups reduced by ``reduce``), and the best
        ``budget // page * page`` tokens are attended with the page being filled. It reads ``N``
        times the selected pages' keys once more per step to attend the tokens the bounds only
        point near (a page that holds one wanted token costs the budget one slot, not a page).
        Over a quantized layer (``quest+kivi``) the layer's keys are dequantized at every step.
    refine_rank : str
        How ``refine`` ranks the candidates' tokens: ``qk`` (the default: the exact ``q . k``, a
        GQA group's heads reduced by ``reduce``) or ``votes`` (TokenSelect's criterion over the
        candidates: each query head's softmax of its scaled scores, summed over the group, so a
        head with a sharp attention counts as much as one with large logits; two Triton kernels
        on CUDA, the scores' pass reading the candidates' keys in place).
    """

    page: int = 16
    reduce: str = "max"
    bounds: str = "float"
    dense_layers: int = 0
    refine: int = 1
    refine_rank: str = "qk"
    decode_only = True

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.page <= 256:
            raise ValueError(f"page must be in [1, 256], got {self.page}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")
        if self.bounds not in ("float", "int8"):
            raise ValueError(f"bounds must be 'float' or 'int8', got {self.bounds!r}")
        if self.refine_rank not in ("qk", "votes"):
            raise ValueError(f"refine_rank must be 'qk' or 'votes', got {self.refine_rank!r}")
        check_int_options(self, {"dense_layers": 0, "refine": 1}, "quest option ")

    def joins_rows(self) -> bool:
        """Rows stacked into a running batch select as alone: a row's pages are counted from its
        first real token whatever padding sits before or after its prompt (:class:`QuestState`),
        and the summaries are rebuilt from the new batch's buffer at its first step."""
        return True

    def join_token(self, run) -> int:
        return run.sel_tokens  # the batch run's tokens attended per step: joined rows must share it

    def pads_exactly(self) -> bool:
        """With token budgets (not ratios, which resolve against the batch's longest prompt) a
        padded row reads the pages it reads alone."""
        return all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                   for b in (self.budget, self.decode_budget)) and self.budget is not None

    def restack_state(self, layer, sources) -> None:
        layer.state.pop(self.name, None)   # rebuilt from the stacked buffer by the next plan

    def _summaries(self, layer) -> QuestState:
        """This layer's summaries, (re)built when the buffer outgrew them (first decode step, or a
        grown buffer: host-side shapes only, never inside a graph recording)."""
        st: QuestState | None = layer.state.get(self.name)
        pages = math.ceil(layer.slot_capacity / self.page)
        if st is None or st.pages < pages:
            keys, pos = layer.slot_keys()  # the used slots (dequantized when the layer is quantized)
            valid = pos >= 0               # (static decode: the whole buffer, unwritten slots -1)
            real = valid.sum(-1)
            m = int(real.max())            # host syncs, once per build
            if bool((real == m).all()) and bool(valid[..., :m].all()):   # every row fills slots 0 .. m-1
                lo, hi, filled = _bounds(keys, pos, self.page, pages)
                st = QuestState(lo, hi, filled, torch.arange(pages, device=lo.device))
            else:
                lo, hi, filled, slot_of, count = _ranked(keys, pos, self.page, pages, layer.slot_capacity)
                st = QuestState(lo, hi, filled, torch.arange(pages, device=lo.device), slot_of, count)
            if self.bounds == "int8":   # scales from the pages built now; later keys beyond them clamp
                st.kmin, st.kmax, st.kscale, st.kinv = int8_bounds(st.kmin, st.kmax, st.filled)
            layer.state[self.name] = st
        return st

    def on_append(self, run, layer, ctx) -> None:
        """Fold the key just written (decode: one per row, always a real token) into its page's
        bounds, on the device: a page's first token resets its bounds."""
        st: QuestState | None = layer.state.get(self.name)
        if st is None or st.pages * self.page < layer.slot_capacity:
            return  # built (from the buffer, these keys included) by the next plan; a dense layer has none
        s = layer.written_slots(1)                                           # (1,) device
        if st.slot_of is None and layer.quant is None:
            page_bounds_append(st.kmin, st.kmax, st.filled, layer.k_buf, s, self.page, st.kinv)   # one launch
            return
        k = layer.slot_keys(s)                                               # (b, h, 1, d), dequantized
        # the new token's rank in its row: its slot, or (pages by rank) the row's own count
        r = st.count if st.slot_of is not None else s.view(1, 1, 1).expand(k.shape[0], k.shape[1], 1)
        p = (r // self.page)[..., None].expand_as(k)
        first = (r % self.page == 0)[..., None]
        k_lo, k_hi = key_bounds(k, st.kmin.dtype, st.kinv)
        st.kmin.scatter_(2, p, torch.where(first, k_lo, torch.minimum(st.kmin.gather(2, p), k_lo)))
        st.kmax.scatter_(2, p, torch.where(first, k_hi, torch.maximum(st.kmax.gather(2, p), k_hi)))
        st.filled.scatter_(2, r // self.page, True)
        if st.slot_of is not None:
            st.slot_of.scatter_(2, r, s.view(1, 1, 1).expand_as(r))
            st.count.add_(1)

    def plan(self, run, layer, query, ctx):
        if not ctx.decoding or layer.layer_idx < self.dense_layers:
            return None
        st = self._summaries(layer)
        k = min(st.pages, run.sel_tokens // self.page)
        kc = min(st.pages, k * self.refine)                # candidate pages (k unless refined)
        q = query[:, :, -1]
        qs = q.to(st.kmin.dtype) if st.kscale is None else q
        if st.slot_of is None:
            # complete pages are candidates (and, with padding, pages holding a token): masked in the
            # score kernel's launch; the page being filled is always attended, written by the top-k's
            full = layer.written_slots(1) // self.page                       # (1,) complete pages
            scores = chunk_scores(qs, (st.kmin, st.kmax), self.reduce, st.kscale, limit=full.expand(q.shape[0]),
                                  valid=st.filled if ctx.has_padding else None)
            own = top_pages(scores, kc, tail_page=full)                      # (b, h, kc + 1): the tail last
            if self.refine == 1:
                return Selection(own=own, page=self.page)
            keys, pos = layer.slot_keys()                                    # the buffer (b, h, cap, d)
            return Selection(own=refine_slots(q, keys, pos, own[..., :kc], k * self.page, self._rank,
                                              self.page, own[..., kc:]))
        scores = chunk_scores(qs, (st.kmin, st.kmax), self.reduce, st.kscale)
        # the page holding a row's newest token is always attended; earlier (complete) pages
        # are candidates; pages map to slots through the row's own table
        tail = (st.count - 1) // self.page                              # (b, h, 1)
        scores = scores.masked_fill(st.page_ids >= tail, float("-inf"))
        pages = top_pages(scores, kc)
        pages = torch.cat([pages, tail], dim=-1)                       # (b, h, kc + 1)
        ranks = pages[..., None] * self.page + torch.arange(self.page, device=pages.device)
        ok = (pages[..., None] >= 0) & (ranks < st.count[..., None])
        b, h = ranks.shape[:2]
        slots = st.slot_of.gather(2, torch.where(ok, ranks, 0).view(b, h, -1)).view_as(ranks)
        slots = torch.where(ok, slots, -1).view(b, h, -1)
        return Selection(own=slots) if self.refine == 1 else self._refined(layer, q, slots, k)

    @property
    def _rank(self) -> str:
        """How ``refine`` ranks its candidates: ``reduce``'s exact ``q . k``, or ``"votes"``."""
        return self.reduce if self.refine_rank == "qk" else "votes"

    def _refined(self, layer, q: torch.Tensor, cand: torch.Tensor, k: int) -> Selection:
        """``refine``'s exact stage where pages map to slots through a row's table: of the candidate
        slots ``cand (batch, kv_heads, (kc + 1) * page)`` (the candidate pages' slots, then the page
        being filled; negative: none), the ``k * page`` with the highest ``q . k`` (query heads of a
        GQA group reduced by ``reduce``) and the page being filled. ``q (batch, heads, head_dim)``.
        Where pages are slot ranges, :meth:`plan` passes the candidate pages and the tail page to
        :func:`refine_slots` as they come from the top-k. No sort (the top-k keeps index order,
        which is the candidates' slot order) and no host sync: runs inside a CUDA graph."""
        keys, pos = layer.slot_keys()                      # (b, h, cap, d), (b, h, cap): the buffer
        body = cand.shape[-1] - self.page                  # the candidate pages' slots; then the tail page
        picked = refine_slots(q, keys, pos, cand[..., :body], k * self.page, self._rank)
        tail = cand[..., body:]
        # the tail page's slots past the last token hold position -1 (the engine masks them); past
        # the buffer there are none
        tail = torch.where((tail >= 0) & (tail < keys.shape[2]), tail, -1)
        return Selection(own=torch.cat([picked, tail], dim=-1))
