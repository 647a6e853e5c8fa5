"""``tokenselect``: TokenSelect (Wu et al., 2024, arXiv 2411.02886) - token-level selection by
per-head soft voting, with a selection cache.

At every decode step each query head scores every cached token (``q . k``), turns its scores into
a softmax over the tokens (so no single head with large logits dominates), and the heads vote: the
probabilities are summed over the heads (``vote="group"``, the default: one selection per KV head,
voted by the query heads of its GQA group; ``"layer"``: one selection shared by every KV head of
the layer, as in the paper, which sums votes by slot and so assumes every head holds the same
tokens: not after a head-wise eviction such as SnapKV). The ``budget``
tokens with the most votes are attended, plus the ``local`` most recently written slots (the
current token and its neighbours), read in place through a slot table. The top ``budget`` of a
long cache's votes is ``dispatch.topk_select``: past the Triton selector's ``MAX_N``, its blocked
form (the best of each block, then of their candidates; measured 2x faster than ``torch.topk`` and
a sort at 128k on the H200, see ``kvsift/kernels/topk_select.py``).

The votes are :func:`kvsift.kernels.dispatch.token_votes` (two Triton kernels on CUDA: the keys
are read once, the scores written and read once in float32).

Selection cache: consecutive queries are often alike. When the cosine similarity between this
step's and the previous step's query (mean over heads) is at least ``reuse_threshold``, the
previous selection is kept. The decision is one launch on the device
(:func:`kvsift.kernels.dispatch.query_reuse`, which also keeps the query and the counters) and a
per-row flag for the vote and top-k kernels: their programs for a reused row return at once (on
long rows the top-k is the blocked Triton selection, whose two launches both skip), and the top-k
writes the other rows' new selections in place into the kept one (graph-safe, no host sync, no
copy). So a reused step reads no keys for scoring; ``reuse_rate`` in the stats is the fraction of
(row, layer, step) selections reused. On the CPU the reference
computes every row and keeps the reused rows' old selection, with the same result.

The full KV stays on the device: TokenSelect saves reads of values (and softmax work), not
memory. With a budget of the whole prompt every token is attended and the output equals ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvsift.kernels.dispatch import query_reuse, token_votes, topk_select
from kvsift.methods.base import DecodeSelect, LayerState, SelectRun, Selection, register


@dataclass
class TokenSelectState(LayerState):
    """Selection cache of one layer: the last query ``(batch, q_heads, head_dim)`` and selection
    ``(batch, kv_heads, k)`` (not persisted: a new generation starts without it)."""

    last_q: torch.Tensor | None = None
    last_sel: torch.Tensor | None = None
    # rows stacked into a running batch (joins): each row's own slots end at row_end (batch,) int64,
    # the rows' common decode slots start at dec_start; the local window is each row's newest tokens
    row_end: torch.Tensor | None = None
    dec_start: int | None = None

    def kv_state_dict(self):
        return {}, {}


@dataclass
class TokenSelectRun(SelectRun):
    counts: Any = None   # (2,) int64 device: row selections (made, reused), over layers and steps


@register("tokenselect")
@dataclass(frozen=True)
class TokenSelect(DecodeSelect):
    """TokenSelect: per-token selection by per-head soft voting of q.k, with a selection cache.

    Parameters
    ----------
    budget : int | float
        Tokens attended per layer (and KV head) at each decode step, on top of ``local``.
    local : int
        Most recently written slots always attended (the current token included).
    vote : str
        ``group``: each KV head is selected by the query heads of its GQA group; ``layer``: all
        query heads vote for one selection shared by the layer's KV heads (the paper; only when
        every head holds the same tokens).
    reuse_threshold : float | None
        Keep the previous selection while the cosine similarity of consecutive queries is at least
        this (e.g. 0.9); ``None`` selects anew every step.
    decode_budget : int | float | None
        Tokens attended at decode when composed after an eviction (default: ``budget``).
    """

    local: int = 16
    vote: str = "group"
    reuse_threshold: float | None = None
    decode_only = True

    def __post_init__(self):
        super().__post_init__()
        if self.local < 1:
            raise ValueError(f"local must be >= 1 (the current token), got {self.local}")
        if self.vote not in ("layer", "group"):
            raise ValueError(f"vote must be 'layer' or 'group', got {self.vote!r}")
        if self.reuse_threshold is not None and not -1.0 <= self.reuse_threshold <= 1.0:
            raise ValueError(f"reuse_threshold must be in [-1, 1] (a cosine similarity), got {self.reuse_threshold}")

    def start(self, prompt_len, num_layers) -> TokenSelectRun:
        r = super().start(prompt_len, num_layers)
        return TokenSelectRun(r.tokens, r.prompt_len, r.num_layers, r.sel_tokens)

    def quantized_ok(self) -> bool:
        return False  # its plan reads the layer's key buffer

    def plan(self, run, layer, query, ctx):
        if not ctx.decoding:
            return None
        n = layer.k_buf.shape[2] if ctx.cache.static else layer.length
        keys, pos = layer.k_buf[:, :, :n], layer.pos_buf[:, :, :n]
        b, hk = keys.shape[:2]
        q = query[:, :, -1]                                                  # (b, hq, d)
        newest = layer.written_slots(1)                                      # (1,)
        local = torch.arange(self.local, device=q.device) - (self.local - 1) + newest   # (local,)
        st: TokenSelectState | None = layer.state.get(self.name)
        if st is not None and st.row_end is not None:
            # stacked rows: a row's newest tokens are the common decode slots, then its own last slots
            # before the padding that follows them (as alone, where they are contiguous)
            end, d0 = st.row_end[:, None], st.dec_start
            local = torch.where(local >= d0, local, end - (d0 - local))       # (b, local)
            n_dec = newest - d0 + 1
            lo = torch.where(n_dec >= self.local, newest - self.local + 1, st.row_end - (self.local - n_dec))
            limit = lo                                                        # the local window is attended anyway
        else:
            limit = local[:1].expand(b)
        k = min(run.sel_tokens, n)
        sel = (self._vote_select(q, keys, pos, limit, k) if self.reuse_threshold is None
               else self._select_cached(run, layer, q, keys, pos, limit, k))
        local = local.clamp(min=-1)
        own = torch.cat([sel, (local[:, None] if local.dim() == 2 else local).expand(b, hk, self.local)], dim=-1)
        return Selection(own=own)

    def joins_rows(self) -> bool:
        """Rows stacked into a running batch select exactly as alone: the votes do not depend on
        where a row's tokens sit, and the local window follows each row's own newest tokens
        (:meth:`restack_state`). Not with the selection cache (its last selection names old slots)."""
        return self.reuse_threshold is None

    def join_token(self, run) -> int:
        return run.sel_tokens  # the batch run's tokens attended per step: joined rows must share it

    def restack_state(self, layer, sources) -> None:
        """After ``SiftLayer.set_rows``: each row's real slots come first (its prompt and the tokens
        it decoded so far), padding follows up to the layer's length, where the common decode slots
        begin."""
        if layer.pos_buf is None:
            return
        end = (layer.positions >= 0).any(1).sum(-1).to(torch.int64)          # (b,)
        layer.state[self.name] = TokenSelectState(row_end=end, dec_start=layer.length)

    def _select_cached(self, run: TokenSelectRun, layer, q: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor,
                       limit: torch.Tensor, k: int) -> torch.Tensor:
        """The selection with the cache: rows whose query is like the last step's (their flag,
        ``dispatch.query_reuse``, decided on the device: graph-safe, no host sync) keep their last
        selection. The vote and top-k kernels return at once for those rows, and the top-k writes
        the others' new selections in place into the kept one (``out=``), so a reused row costs
        no pass over the keys and no copy. ``(b, hk, k)`` int64; the layer's first step (or a new
        shape) selects every row and starts the cache."""
        if run.counts is None:
            run.counts = torch.zeros(2, dtype=torch.int64, device=q.device)
        st: TokenSelectState | None = layer.state.get(self.name)
        if (st is None or st.last_sel is None or tuple(st.last_sel.shape) != (q.shape[0], keys.shape[1], k)
                or st.last_q.shape != q.shape or st.last_q.dtype != q.dtype):
            sel = self._vote_select(q, keys, pos, limit, k)
            layer.state[self.name] = TokenSelectState(q.clone(), sel.clone())
            run.counts[0] += q.shape[0]
            return sel
        reuse = query_reuse(q, st.last_q, self.reuse_threshold, run.counts)     # (b,); last_q := q
        return self._vote_select(q, keys, pos, limit, k, reuse, st.last_sel)

    def _vote_select(self, q: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, limit: torch.Tensor, k: int,
                     skip: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``k`` best-voted slots ``(b, hk, k)`` int64, ascending, -1 padded: the votes ``(b, hk,
        n)`` (-inf: not a candidate), then the top-k (the Triton selector up to ``MAX_N`` votes, its
        blocked form past it). ``skip (b,)``: rows both kernels leave as they are in ``out``."""
        votes = token_votes(q, keys, pos, limit, self.vote, float("-inf"), skip)
        return topk_select(votes, k, torch.int64, skip, out=out)

    def stats(self, run) -> dict[str, Any]:
        if run.counts is None:
            return {}
        made, reused = (int(x) for x in run.counts.tolist())
        return {"reuse_rate": reused / max(1, made)}
