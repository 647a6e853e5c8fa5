"""``decoding``: compression during long generations - re-apply a scorer every ``interval``
generated tokens so the cache stays at the budget (kvpress's ``DecodingPress`` idea).

``decoding(snapkv)`` compresses the prompt with SnapKV at prefill end (unless ``prefill=False``),
then, every ``interval`` decode steps, scores the layer's KV again with the wrapped scorer's
``score`` over the last ``query_window`` generated queries and keeps the top ``budget`` slots per
KV head: the cache never holds more than ``budget + interval`` tokens per head, however long the
answer. Every compression really frees bytes (the buffers are reallocated at the kept size plus the
decode reserve). Decode steps change shapes, so decode runs eagerly (no CUDA graph).

Requests join a running batch (continuous batching) and compress as they would alone: each row
counts its own decode steps (a row that joined later compresses at its own ``interval``), and a
batch that rows joined scores each row over its own tokens in their order, its holes (the padding
that stacking puts between a row's prompt and the common decode slots) moved ahead of them
(:meth:`DecodingCompress._compress_rows`), so the window's queries, the pooling and the kept
window see each row's layout alone. Rows joining must hold a whole query window (prompts of at
least ``query_window`` tokens) and share the resolved budgets (:meth:`DecodingCompress.join_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsift.methods.base import EvictionMethod, LayerState, ScorerWrapper, keep_top, register


@dataclass
class QueryWindow(LayerState):
    """The last queries of a layer, ``(batch, q_heads, <= query_window, head_dim)`` (post-RoPE).

    ``decoded``: decode steps so far while every row is at the batch's step; ``steps``: each row's
    own, once rows joined a running batch (None before), whose rows sit with padding between their
    own tokens and the common decode slots (compressions then score each row's tokens in order)."""

    queries: torch.Tensor
    decoded: int = 0
    steps: tuple[int, ...] | None = None

    def push(self, query: torch.Tensor, keep: int) -> None:
        self.queries = torch.cat([self.queries, query], dim=2)[:, :, -keep:]

    def repeat_batch(self, times: int) -> None:
        super().repeat_batch(times)
        if self.steps is not None:
            self.steps = tuple(s for s in self.steps for _ in range(times))


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

    def min_last_chunk(self) -> int:
        # the prefill's last chunk holds a whole query window (when the prompt does)
        return max(self.inner.min_last_chunk(), self.query_window)

    def joins_rows(self) -> bool:
        """Rows stacked into a running batch compress as alone: each counts its own steps and is
        scored over its own tokens in order (:meth:`restack_state`, :meth:`_compress_rows`)."""
        return True

    def join_token(self, run):
        """The resolved budget of every layer (rows of one batch compress to the same sizes), for
        prompts that fill the query window; a shorter prompt's window is shorter than the others',
        so its request joins none (a token of its own)."""
        if run.prompt_len < self.query_window:
            return ("short window", id(run))
        return tuple(self.layer_budget(run, i) for i in range(run.num_layers))

    def preemptible(self) -> bool:
        return False  # the query windows are per-row state that a swap to the host does not carry

    def restack_state(self, layer, sources) -> None:
        """The new batch's rows are ``sources``' rows in order: their query windows (each whole, see
        :meth:`join_token`) and decode steps so far (a row that just joined: 0)."""
        wins = [(src.state.get(self.name), row) for src, row in sources]
        if any(w is None for w, _ in wins):
            raise RuntimeError("decoding(...): a row joined without its query window")
        if len({w.queries.shape[2] for w, _ in wins}) != 1:
            raise RuntimeError("decoding(...): rows with query windows of different lengths cannot be stacked")
        steps = tuple(w.steps[r] if w.steps is not None else w.decoded for w, r in wins)
        layer.state[self.name] = QueryWindow(torch.cat([w.queries[r:r + 1] for w, r in wins]), steps=steps)

    def shares_prefix(self) -> bool:
        return self.inner.shares_prefix()   # keeps the prompt's last queries at its end

    def prefix_state(self):
        return self.inner.prefix_state()

    def after_attend(self, run, layer, query, module, ctx) -> None:
        if not ctx.decoding:
            return super().after_attend(run, layer, query, module, ctx)
        win = layer.state[self.name]
        win.push(query, self.query_window)
        k = self.layer_budget(run, layer.layer_idx)
        if win.steps is None:   # every row at the batch's step
            win.decoded = ctx.step + 1
            if (ctx.step + 1) % self.interval == 0 and layer.length > k:
                scores = self.inner.score(win.queries, layer.keys, layer.values, layer.positions, module,
                                          layer.layer_idx)
                keep_top(layer, scores, k)
            return
        due = [(s + 1) % self.interval == 0 for s in win.steps]
        win.steps = tuple(s + 1 for s in win.steps)
        if any(due):
            self._compress_rows(layer, win, torch.tensor(due, device=layer.positions.device), k, module)

    def _compress_rows(self, layer, win: QueryWindow, due: torch.Tensor, k: int, module) -> None:
        """Compress the rows ``due (batch,)`` bool holding more than ``k`` tokens on a head to their
        best ``k`` per KV head; the other rows keep every token. Each row is scored over its own
        tokens in slot order, right-aligned (its holes first), as :meth:`after_attend` scores a row
        alone (whose newest tokens are the layer's last slots); kept slots stay in their order."""
        pos = layer.positions                                                 # (b, h, n)
        b, h, n = pos.shape
        valid = pos >= 0
        counts = valid.sum(-1)                                                # (b, h)
        cut = due & (counts.amax(-1) > k)                                     # (b,) rows that compress
        if not bool(cut.any()):
            return
        ar = torch.arange(n, device=pos.device)
        order = torch.argsort(torch.where(valid, ar + n, ar), dim=-1)         # holes first, then tokens in order
        gi = order[..., None].expand(b, h, n, layer.keys.shape[-1])
        cpos = pos.gather(2, order)
        scores = self.inner.score(win.queries, layer.keys.gather(2, gi), layer.values.gather(2, gi), cpos, module,
                                  layer.layer_idx).float()
        scores = torch.empty_like(scores).scatter_(2, order, scores)          # back in slot order
        # the shared selection: a row that compresses keeps its best k per head, the others every token
        keep_top(layer, torch.where(cut[:, None, None], scores, float("inf")),
                 torch.where(cut[:, None], counts.clamp(max=k), counts))
