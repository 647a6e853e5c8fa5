"""``quest``: Quest (Tang et al., 2024, arXiv 2406.10774) - query-aware page selection at decode.

The layer's buffer is cut into pages of ``page`` slots. Each page keeps per-channel min and max of
its keys; at every decode step the query scores every complete page with the upper bound
``sum_d max(q_d * kmin_d, q_d * kmax_d)`` of ``q . k`` over the page (GQA groups reduced by
``reduce``), the best ``budget // page`` pages are attended together with the page being filled
(which holds the newest tokens), read in place through a slot table (no KV copies on CUDA).

The full KV stays on the device: Quest saves reads, not memory. It composes after an eviction
(``snapkv+quest``: SnapKV keeps its budget at prefill, Quest selects among what is kept at
decode, with ``decode_budget`` tokens). Summaries are built at the first decode step from the
buffer and kept current as tokens are appended (``on_append``), on the device, under CUDA graphs.
With a budget of the whole prompt every page is attended and the output equals ``full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsift.kernels.dispatch import chunk_scores, page_bounds_append
from kvsift.methods.base import DecodeSelect, LayerState, Selection, register, top_pages


@dataclass
class QuestState(LayerState):
    """Page summaries of one layer: ``kmin``/``kmax`` ``(batch, kv_heads, n_pages, head_dim)`` and
    ``filled (batch, kv_heads, n_pages)`` bool (the page holds at least one real token), for pages
    covering the whole buffer (room for decode tokens included)."""

    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    filled: torch.Tensor | None = None
    page_ids: torch.Tensor | None = None   # (n_pages,) int64: 0 .. n_pages-1

    def repeat_batch(self, times: int) -> None:
        for name in ("kmin", "kmax", "filled"):
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
    """

    page: int = 16
    reduce: str = "max"
    decode_only = True

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.page <= 256:
            raise ValueError(f"page must be in [1, 256], got {self.page}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {self.reduce!r}")

    def _summaries(self, layer) -> QuestState:
        """This layer's summaries, (re)built when the buffer outgrew them (first decode step, or a
        grown buffer: host-side shapes only, never inside a graph recording)."""
        st: QuestState | None = layer.state.get(self.name)
        pages = math.ceil(layer.slot_capacity / self.page)
        if st is None or st.pages < pages:
            keys, pos = layer.slot_keys()  # the used slots (dequantized when the layer is quantized)
            lo, hi, filled = _bounds(keys, pos, self.page, pages)
            st = QuestState(lo, hi, filled, torch.arange(pages, device=lo.device))
            layer.state[self.name] = st
        return st

    def on_append(self, run, layer, ctx) -> None:
        """Fold the key just written (decode: one per row, always a real token) into its page's
        bounds, on the device: a page's first token resets its bounds."""
        st: QuestState | None = layer.state.get(self.name)
        if st is None or st.pages * self.page < layer.slot_capacity:
            return  # built (from the buffer, these keys included) by the next plan
        s = layer.written_slots(1)                                           # (1,) device
        if layer.quant is None:
            page_bounds_append(st.kmin, st.kmax, st.filled, layer.k_buf, s, self.page)   # one launch
            return
        k = layer.slot_keys(s)                                               # (b, h, 1, d), dequantized
        p = s // self.page
        first = (s % self.page == 0).view(1, 1, 1, 1)
        st.kmin.index_copy_(2, p, torch.where(first, k, torch.minimum(st.kmin.index_select(2, p), k)))
        st.kmax.index_copy_(2, p, torch.where(first, k, torch.maximum(st.kmax.index_select(2, p), k)))
        st.filled.index_fill_(2, p, True)

    def plan(self, run, layer, query, ctx):
        if not ctx.decoding:
            return None
        st = self._summaries(layer)
        # complete pages are candidates; the page being filled is always attended
        full = layer.written_slots(1) // self.page                           # (1,) complete pages
        scores = chunk_scores(query[:, :, -1].to(st.kmin.dtype), (st.kmin, st.kmax), self.reduce)
        scores = scores.masked_fill(st.page_ids >= full, float("-inf"))
        if ctx.has_padding:  # pages of padding only are never candidates
            scores = scores.masked_fill(~st.filled, float("-inf"))
        k = min(st.pages, run.sel_tokens // self.page)
        return Selection(own=top_pages(scores, k, tail_page=full), page=self.page)
