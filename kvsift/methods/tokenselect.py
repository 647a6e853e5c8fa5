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
long cache's votes is ``dispatch.topk_select``: ``torch.topk`` over the whole row past the Triton
selector's ``MAX_N`` (a blocked selection was measured slower on the H200, see
``kvsift/kernels/topk_select.py``).

Selection cache: consecutive queries are often alike. When the cosine similarity between this
step's and the previous step's query (mean over heads) is at least ``reuse_threshold``, the
previous selection is kept. The decision is made on the device (a select between the cached and
the new selection: graph-safe, no host sync), so it stabilises the selection but saves no
scoring work; ``reuse_rate`` in the stats says how often it held.

The full KV stays on the device: TokenSelect saves reads of values (and softmax work), not
memory. With a budget of the whole prompt every token is attended and the output equals ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvsift.kernels.dispatch import topk_select
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
    counts: Any = None   # (2,) int64 device: (selections made, selections reused)


def token_votes(q: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor | None, vote: str = "group") -> torch.Tensor:
    """Soft votes of the query heads for every token: ``q (batch, q_heads, dim)``, ``keys (batch,
    kv_heads, n, dim)``, ``candidates (batch, kv_heads, n)`` bool (None: all). Each query head's
    softmax over the candidate tokens (scaled ``q . k``) is summed over the heads of its GQA group
    (``vote="group"``) or over all heads (``"layer"``, the same votes for every KV head). Returns
    ``(batch, kv_heads, n)`` float32; ``-1`` for non-candidates."""
    b, hk, n, d = keys.shape
    g = q.shape[1] // hk
    logits = torch.matmul(q.reshape(b, hk, g, d), keys.transpose(-1, -2)).float().mul_(d ** -0.5)   # (b, hk, g, n)
    if candidates is not None:  # in place: the logits are this call's own (one pass and one buffer fewer)
        logits.masked_fill_(~candidates[:, :, None], float("-inf"))
    votes = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2)                          # (b, hk, n)
    if vote == "layer":
        votes = votes.sum(1, keepdim=True).expand(b, hk, n)
    if candidates is not None:
        votes = votes.masked_fill(~candidates, -1.0)
    return votes


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
        slot = torch.arange(n, device=q.device)
        st: TokenSelectState | None = layer.state.get(self.name)
        if st is not None and st.row_end is not None:
            # stacked rows: a row's newest tokens are the common decode slots, then its own last slots
            # before the padding that follows them (as alone, where they are contiguous)
            end, d0 = st.row_end[:, None], st.dec_start
            local = torch.where(local >= d0, local, end - (d0 - local))       # (b, local)
            n_dec = newest - d0 + 1
            lo = torch.where(n_dec >= self.local, newest - self.local + 1, st.row_end - (self.local - n_dec))
            cand = (pos >= 0) & (slot < lo[:, None, None])                    # the local window is attended anyway
        else:
            cand = (pos >= 0) & (slot < local[0])
        votes = token_votes(q, keys, cand, self.vote)                        # (b, hk, n), -1 = not a candidate
        k = min(run.sel_tokens, n)
        # (b, hk, k) ascending slots, -1 padded (the Triton selector up to MAX_N votes, torch.topk past it)
        sel = topk_select(votes.masked_fill(votes < 0, float("-inf")), k, torch.int64)
        if self.reuse_threshold is not None:
            sel = self._cache(run, layer, q, sel)
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

    def _cache(self, run: TokenSelectRun, layer, q: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """The previous selection while consecutive queries stay alike (decided on the device)."""
        st: TokenSelectState | None = layer.state.get(self.name)
        if run.counts is None:
            run.counts = torch.zeros(2, dtype=torch.int64, device=q.device)
        if st is None or st.last_sel is None or st.last_sel.shape != sel.shape:
            st = TokenSelectState(q.clone(), sel.clone())
            layer.state[self.name] = st
            run.counts[0].add_(1)
            return sel
        sim = torch.nn.functional.cosine_similarity(q.float(), st.last_q.float(), dim=-1).mean(-1)   # (b,)
        reuse = (sim >= self.reuse_threshold)[:, None, None]
        out = torch.where(reuse, st.last_sel, sel)
        st.last_sel.copy_(out)
        st.last_q.copy_(q)
        run.counts.add_(torch.stack([torch.ones_like(reuse.sum()), reuse.any().long()]))
        return out

    def stats(self, run) -> dict[str, Any]:
        if run.counts is None:
            return {}
        made, reused = (int(x) for x in run.counts.tolist())
        return {"reuse_rate": reused / max(1, made)}
