"""``decoding``: compression during long generations - re-apply a scorer every ``interval``
generated tokens so the cache stays at the budget (kvpress's ``DecodingPress`` idea).

``decoding(snapkv)`` compresses the prompt with SnapKV at prefill end (unless ``prefill=False``),
then, every ``interval`` decode steps, scores the layer's KV again with the wrapped scorer's
``score`` over the last ``query_window`` generated queries and keeps the top ``budget`` slots per
KV head: the cache never holds more than ``budget + interval`` tokens per head, however long the
answer. Every compression really frees bytes (the buffers are reallocated at the kept size plus the
decode reserve). Decode steps change shapes, so decode runs eagerly (no CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsift.methods.base import EvictionMethod, LayerState, ScorerWrapper, keep_top, register


@dataclass
class QueryWindow(LayerState):
    """The last queries of a layer, ``(batch, q_heads, <= query_window, head_dim)`` (post-RoPE)."""

    queries: torch.Tensor

    def push(self, query: torch.Tensor, keep: int) -> None:
        self.queries = torch.cat([self.queries, query], dim=2)[:, :, -keep:]


@register("decoding")
@dataclass(frozen=True)
class DecodingCompress(ScorerWrapper):
    """Decode-time compression: a scorer re-applied every `interval` generated tokens.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head after each compression (a ratio: of the prompt).
    scorer : str
        The wrapped scorer; ``decoding(<scorer>)`` in a spec sets it. It must score from queries
        alone (``score``): snapkv, pyramidkv, streaming, h2o, tova, expected_attention.
    interval : int
        Generated tokens between two compressions.
    query_window : int
        Last queries (prompt, then generated) the scorer sees at each compression.
    prefill : bool
        Also compress the prompt at prefill end (False: only during decode, as kvpress's
        DecodingPress; the first compression then comes after ``interval`` tokens).
    """

    interval: int = 64
    query_window: int = 32
    prefill: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if not 1 <= self.query_window <= 4096:
            raise ValueError(f"query_window must be in [1, 4096], got {self.query_window}")
        if type(self.inner).score is EvictionMethod.score or self.inner.deferred:
            raise ValueError(f"decoding(...) needs a scorer that scores from queries (score), got {self.inner.spec!r}")

    def static_ok(self) -> bool:
        return False  # compression steps reshape the cache

    def prefill_end(self, run, layer, query, module, ctx) -> None:
        win = query[:, :, -self.query_window:].clone()
        if ctx.row is None:
            layer.state[self.name] = QueryWindow(win)
        else:  # row-by-row prefill: row i of the batch cache's window (right-aligned, as in a batch)
            i, b = ctx.row
            states = ctx.row_states[layer.layer_idx]
            if self.name not in states:
                states[self.name] = QueryWindow(win.new_zeros(b, win.shape[1], self.query_window, win.shape[3]))
            states[self.name].queries[i, :, -win.shape[2]:] = win[0]
        if self.prefill:
            super().prefill_end(run, layer, query, module, ctx)

    def joins_rows(self) -> bool:
        return False  # re-applies its scorer while decoding

    def after_attend(self, run, layer, query, module, ctx) -> None:
        if not ctx.decoding:
            return super().after_attend(run, layer, query, module, ctx)
        win = layer.state[self.name]
        win.push(query, self.query_window)
        k = self.layer_budget(run, layer.layer_idx)
        if (ctx.step + 1) % self.interval == 0 and layer.length > k:
            scores = self.inner.score(win.queries, layer.keys, layer.values, layer.positions, module, layer.layer_idx)
            keep_top(layer, scores, k)
