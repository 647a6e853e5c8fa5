"""``h2o``: H2O (Zhang et al., 2023, arXiv 2306.14048) - heavy hitters plus recent tokens.

A key's score is the attention it accumulated: the softmax weights it received from every prompt
query (every prefill chunk, causal by position), summed over the queries as in the paper (not
averaged over the queries that could see it, as kvpress's ObservedAttentionPress does: early
tokens, seen by more queries, are favoured, which is H2O's own bias) and averaged over the query
heads of each KV group. The newest ``recent`` tokens are always kept. During decode each new
query adds its attention and, while a layer holds more than its budget, the lowest heavy hitter
outside the recent window is evicted in place (the newest slot moves into its slot), so the cache
never grows past the budget; that per-step eviction runs in eager decode only (``static_ok``).

The engine's attention returns no weights, so the weights are recomputed here: on CUDA by a fused
Triton kernel that never materialises them (:mod:`kvsift.kernels.attention_received`), elsewhere in
fp32, query block by query block (one ``(batch, q_heads, block, n)`` fp32 tensor stays under
:data:`SCORE_BLOCK_BYTES`).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsift.budget import resolve_budget
from kvsift.kernels import dispatch as kernels
from kvsift.methods.base import SCORE_BLOCK_BYTES, EvictionMethod, LayerState, module_scale, register

def attention_received(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                       scale: float, sliding_window: int | None = None,
                       max_bytes: int = SCORE_BLOCK_BYTES) -> torch.Tensor:
    """Softmax attention each key receives, summed over the queries, averaged over the query heads
    of its KV group.

    query ``(batch, q_heads, q, dim)``; keys ``(batch, kv_heads, n, dim)``; key_pos
    ``(batch, kv_heads, n)`` and query_pos ``(batch, q)`` positions (``-1`` = padding: a padding
    key receives nothing, a padding query gives nothing). A key is visible iff
    ``0 <= key_pos <= query_pos`` (and ``key_pos > query_pos - sliding_window``). Queries run in
    blocks so that one ``(batch, q_heads, block, n)`` fp32 tensor stays under ``max_bytes``.
    Returns ``(batch, kv_heads, n)`` fp32. On CUDA a fused Triton kernel computes the same without
    materialising the weights (:mod:`kvsift.kernels.attention_received`; ``max_bytes`` is then unused).
    """
    return kernels.attention_received(query, keys, key_pos, query_pos, scale, sliding_window, reduce="sum",
                                      head_reduce="mean", max_bytes=max_bytes)


def recent_first(scores: torch.Tensor, positions: torch.Tensor, recent: int) -> torch.Tensor:
    """``scores (batch, kv_heads, n)`` with the ``recent`` newest positions of each row (by
    position: ``position > newest - recent``) above every other slot, newest highest, and padding
    slots (position -1) at ``-inf``. Returns a new ``(batch, kv_heads, n)`` fp32 tensor."""
    s = scores.float()
    pos = positions.long()
    if recent > 0:
        newest = pos.amax(dim=(1, 2), keepdim=True)                       # (b, 1, 1)
        age = newest - pos                                                # 0 = newest
        top = s.masked_fill(pos < 0, 0.0).amax(-1, keepdim=True) + 1.0
        s = torch.where((pos >= 0) & (age < recent), top + (recent - age).float(), s)
    return s.masked_fill(pos < 0, float("-inf"))


@dataclass
class H2OState(LayerState):
    """H2O's per-layer state. ``acc (batch, kv_heads, capacity)`` fp32: the attention each slot
    received so far (prompt queries, then decode queries); its first ``n`` entries are aligned
    with the layer's slots (``n == layer.length`` after each hook)."""

    acc: torch.Tensor
    n: int = 0

    def fit(self, n: int) -> None:
        """Make room for ``n`` slots; slots from ``self.n`` on are new (score 0)."""
        b, h, cap = self.acc.shape
        if cap < n:
            new = self.acc.new_zeros(b, h, max(n, cap * 3 // 2 + 16))
            new[..., : self.n] = self.acc[..., : self.n]
            self.acc = new
        else:
            self.acc[..., self.n : n] = 0
        self.n = n

    def follow(self, old_pos: torch.Tensor, new_pos: torch.Tensor) -> None:
        """The slots were reordered or dropped (prefill compression): move each score to the slot
        now holding its token, by position (old ``(batch, kv_heads, n_old)``, new
        ``(batch, kv_heads, n_new)``; holes and padding get 0)."""
        b, h, _ = old_pos.shape
        pad = int(max(int(old_pos.max()), int(new_pos.max()), 0)) + 1    # index of "no token"
        dense = self.acc.new_zeros(b, h, pad + 1)
        dense.scatter_(2, torch.where(old_pos >= 0, old_pos, pad).long(), self.acc[..., : old_pos.shape[2]])
        acc = dense.gather(2, torch.where(new_pos >= 0, new_pos, pad).long()).masked_fill(new_pos < 0, 0.0)
        self.acc, self.n = acc, new_pos.shape[2]

    def evict(self, victim: torch.Tensor) -> None:
        """The layer moved its newest slot into ``victim (batch, kv_heads, 1)``: so do the scores."""
        last = self.n - 1
        self.acc.scatter_(2, victim, self.acc[:, :, last : last + 1])
        self.n = last


@register("h2o")
@dataclass(frozen=True)
class H2O(EvictionMethod):
    """H2O: heavy hitters (accumulated attention) plus recent tokens, evicting while decoding.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head (heavy hitters + recent window), also while decoding.
    recent : int | float
        Newest tokens always kept: a fraction of the layer budget (float in [0, 1]; 0.5 as in the
        paper: half heavy hitters, half recent tokens) or a token count (int >= 0), capped at the budget.
    decode_evict : bool
        Keep accumulating each decode query's attention and evict the lowest heavy hitter whenever a
        layer holds more than its budget (eager decode). False: evict at prefill end only.
    """

    recent: int | float = 0.5
    decode_evict: bool = True
    slot_state: ClassVar[bool] = True   # accumulated attention per slot, kept across prefill chunks

    def __post_init__(self):
        super().__post_init__()
        r = self.recent
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ValueError(f"recent must be a fraction of the budget in [0, 1] or a token count, got {r!r}")
        if isinstance(r, float) and not 0.0 <= r <= 1.0:
            raise ValueError(f"recent as a fraction of the budget must be in [0, 1], got {r}")
        if isinstance(r, int) and r < 0:
            raise ValueError(f"recent must be >= 0 tokens, got {r}")
        if not isinstance(self.decode_evict, bool):
            raise ValueError(f"decode_evict must be a bool, got {self.decode_evict!r}")

    def recent_tokens(self, budget: int) -> int:
        """Tokens of the recent window for a layer budget of ``budget`` tokens."""
        r = round(self.recent * budget) if isinstance(self.recent, float) else self.recent
        return max(0, min(r, budget))

    def static_ok(self) -> bool:
        return not self.decode_evict  # decode eviction moves slots per step (host-side length)

    def shares_prefix(self) -> bool:
        return True   # its prefix: the KV and the attention every slot received, whatever the budget

    def prefix_state(self):
        return (self.name,)   # the accumulated attention (recent and decode_evict act at the end)

    # ---- scoring -------------------------------------------------------------------------------
    def score(self, query, keys, values, positions, module, layer_idx):
        """Heavy hitters of the given queries only (the last chunk's; ``prefill_scores`` uses
        every prompt query) plus the recent window for ``budget`` over ``n`` keys.
        ``(batch, kv_heads, n)``."""
        L = query.shape[2]
        acc = attention_received(query, keys, positions, positions[:, 0, -L:], module_scale(module, keys),
                                 getattr(module, "sliding_window", None))
        return recent_first(acc, positions, self.recent_tokens(resolve_budget(self.budget, keys.shape[2], clamp=True)))

    def observe(self, run, layer, query, module, ctx):
        """Add the chunk's attention (its queries at ``ctx.cache.step_positions``) to every slot's
        accumulated score; the chunk's own keys (the layer's newest slots) start at 0."""
        if ctx.rereading:
            return  # a reread pass's tokens are dropped afterwards: they are not prompt queries
        st = self._state(layer, grown_by=query.shape[2])
        st.acc[..., : st.n] += attention_received(query, layer.keys, layer.positions, ctx.cache.step_positions,
                                                  module_scale(module, layer.keys),
                                                  getattr(module, "sliding_window", None))

    def prefill_scores(self, run, layer, query, module, ctx):
        """Accumulated attention of every prompt query (``(batch, kv_heads, n)``), recent window first."""
        st = self.layer_state(layer)
        if st is None or st.n != layer.length:  # no observed chunks: the last chunk's queries
            return self.score(query, layer.keys, layer.values, layer.positions, module, layer.layer_idx)
        k = self.layer_budget(run, layer.layer_idx)
        return recent_first(st.acc[..., : st.n], layer.positions, self.recent_tokens(k))

    def _state(self, layer, grown_by: int) -> H2OState:
        """This layer's state with room for its slots; a state that does not match the layer's
        slots (``n`` plus the ``grown_by`` new ones; e.g. another stage reordered them) starts over."""
        st = self.layer_state(layer)
        if st is None or st.n != layer.length - grown_by:
            b, h = layer.k_buf.shape[:2]
            st = H2OState(acc=torch.zeros(b, h, 0, dtype=torch.float32, device=layer.k_buf.device))
            layer.state[self.name] = st
        st.fit(layer.length)
        return st

    # ---- selection -----------------------------------------------------------------------------
    def prefill_end(self, run, layer, query, module, ctx):
        st = self.layer_state(layer)
        before, old_pos = layer.k_buf, layer.positions
        super().prefill_end(run, layer, query, module, ctx)
        if st is None or not self.decode_evict:
            layer.state.pop(self.name, None)  # nothing to keep up at decode
            return
        if layer.k_buf is not before:  # compressed: scores follow the kept tokens
            st.follow(old_pos, layer.positions)
        if ctx.row is not None:
            self._to_batch_row(st, layer, ctx)

    def _to_batch_row(self, st: H2OState, layer, ctx) -> None:
        """Row-by-row prefill: copy this row's scores into row ``i`` of the batch cache's state (the
        row's kept slots are stacked first, shorter rows padded after them: ``SiftLayer.set_rows``)."""
        i, b = ctx.row
        states = ctx.row_states[layer.layer_idx]
        dst = states.get(self.name)
        n, h = st.n, st.acc.shape[1]
        if dst is None:
            dst = states[self.name] = H2OState(acc=st.acc.new_zeros(b, h, n))
        if dst.acc.shape[-1] < n:
            dst.acc = torch.cat([dst.acc, dst.acc.new_zeros(b, h, n - dst.acc.shape[-1])], dim=-1)
        dst.acc[i] = 0
        dst.acc[i, :, :n] = st.acc[0, :, :n]
        dst.n = max(dst.n, n)

    def evicts_while_decoding(self) -> bool:
        return self.decode_evict  # accumulates attention and evicts while decoding, unless told not to

    def restack_state(self, layer, sources) -> None:
        """Each row's accumulated scores follow its slots into the new batch (rows that joined at
        their budget hold ``layer.length`` slots each, stacked in order, no padding)."""
        accs = []
        for src, i in sources:
            st = self.layer_state(src)
            if st is None or st.n != src.length or src.length != layer.length:
                layer.state.pop(self.name, None)  # not the lockstep layout: scores start over
                return
            accs.append(st.acc[i:i + 1, :, : st.n])
        if accs:
            layer.state[self.name] = H2OState(acc=torch.cat(accs), n=layer.length)

    def after_attend(self, run, layer, query, module, ctx):
        super().after_attend(run, layer, query, module, ctx)  # prefill: observe, and compress at the end
        if not (ctx.decoding and self.decode_evict):
            return
        st = self._state(layer, grown_by=1)
        st.acc[..., : st.n] += attention_received(query, layer.keys, layer.positions, ctx.cache.step_positions,
                                                  module_scale(module, layer.keys),
                                                  getattr(module, "sliding_window", None))
        k = self.layer_budget(run, layer.layer_idx)
        if layer.length > k:
            s = recent_first(st.acc[..., : st.n], layer.positions, self.recent_tokens(k))
            victim = s.argmin(-1, keepdim=True)                           # (b, kv_heads, 1); padding first
            st.evict(victim)
            layer.replace_slot(victim)
