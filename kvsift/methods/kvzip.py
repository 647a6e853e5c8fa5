"""``kvzip``: KVzip (Kim et al., 2025, arXiv 2505.23416) - query-agnostic eviction by context
reconstruction.

After the prompt's prefill the model re-reads it: the engine feeds reread passes (``reread_passes``),
each a reconstruction instruction ("Repeat the previous context exactly.", closed as a user turn
by the tokenizer's chat template when the prompt was built with it) followed by one ``chunk`` of
the context's own tokens, at the positions after the prompt, attending to the whole cache; their
KV is dropped afterwards. Each prompt KV pair is scored by the largest attention it receives from
any reconstruction query (every pass, every query of the pass - the instruction included - and
every query head of its KV group). The softmax runs, as in the paper and kvpress, over the sinks,
the chunk the pass reconstructs and the pass's own tokens (``softmax="local"``; ``"full"``: over
every key the query sees). The compression is deferred until all passes ran (``finish_prefill``):
with ``allocation="global"`` (the paper's non-uniform budgets) the best ``budget * layers *
kv_heads`` scores of any layer and head are kept, per-head lengths stored compactly; with
``"head"`` the top ``budget`` slots per (batch, kv_head). The first ``sinks`` tokens always stay.

A pass over a chunk of ``c`` tokens costs about ``c`` prefill tokens attending to the ``n`` prompt
keys, so the passes together cost about one more prefill (``stats``: ``reread_passes``,
``reread_tokens``, ``reread_s``). Scoring and selection are apart: ``observe`` accumulates the
scores into ``layer.state["kvzip"]`` while ``ctx.rereading``, ``deferred_scores`` hands them out
(and drops the state), ``compress`` selects, so a wrapper allocating budgets itself can use it as a
scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvsift.budget import resolve_budget
from kvsift.kernels import dispatch as kernels
from kvsift.methods.base import (SCORE_BLOCK_BYTES, EvictionMethod, LayerState, Run, group_queries, head_budgets,
                                  keep_top, module_scale, register)

FIRST_INSTRUCTION = "\n\nRepeat the previous context exactly."
NEXT_INSTRUCTION = "\n\nRepeat the previous context exactly, continuing from:"


@dataclass
class KVzipState(LayerState):
    """Per-layer reconstruction scores of the prompt's slots: ``scores (batch, kv_heads, n)`` fp32,
    the max attention each slot got from a reconstruction query so far (slot ``i`` of the prompt)."""

    scores: torch.Tensor
    passes: int = 0        # reread passes seen so far (the one in flight included)


@dataclass
class KVzipRun(Run):
    """A generation's counters: reread passes, their tokens and their time (every sequence), and
    per sequence (in the order the engine asked for their passes, which is the batch's row order)
    the ``(first prompt slot, length)`` the passes reconstruct."""

    passes: int = 0
    reread_tokens: int = 0
    reread_s: float = 0.0
    spans: list = field(default_factory=list)


def reconstruction_scores(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                          n_ctx: int, scale: float, sliding_window: int | None = None,
                          softcap: float | None = None, local: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Max attention of a pass's queries to the first ``n_ctx`` slots.

    query ``(batch, q_heads, q, dim)`` (post-RoPE, the pass's tokens in flight); keys
    ``(batch, kv_heads, n, dim)`` and their positions ``(batch, kv_heads, n)``: the prompt's ``n_ctx``
    slots first (every one before every query, so only padding and a sliding window hide them),
    then the pass's tokens so far; query_pos ``(batch, q)``. The softmax runs over every key a query
    sees (``0 <= key_pos <= query_pos``, inside the sliding window if any, soft-capped logits if the
    model caps them), as the model's own attention does. Returns ``(batch, kv_heads, n_ctx)`` fp32:
    the max over queries and the query heads of each KV group. Query rows go in blocks of at most
    :data:`SCORE_BLOCK_BYTES` of logits. ``local = (sinks, start, end)``: of the prompt's slots only
    the first ``sinks`` and ``start .. end - 1`` (the chunk the pass reconstructs) enter the
    softmax, as in the KVzip paper's chunked scoring; only those slots and the pass's own are then
    read (the others get no weight: their scores stay 0), so a pass costs its chunk, not the prompt.
    Without a soft cap this is :func:`kvsift.kernels.dispatch.attention_received` (``reduce="max"``,
    ``head_reduce="max"``, ``n_out=n_ctx``: a fused Triton kernel on CUDA); soft-capped logits (Gemma 2)
    take the PyTorch loop below."""
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    out = torch.zeros(b, hk, n_ctx, dtype=torch.float32, device=keys.device)
    cols = None
    if local is not None:  # the softmax's prompt slots: the sinks, then the chunk (ascending, no repeat)
        sinks = min(local[0], n_ctx)
        lo = max(local[1], sinks)
        cols = torch.cat([torch.arange(sinks), torch.arange(lo, max(lo, min(local[2], n_ctx)))]).to(keys.device)
        keys = torch.cat([keys.index_select(2, cols), keys[:, :, n_ctx:]], dim=2)
        key_pos = torch.cat([key_pos.index_select(2, cols), key_pos[:, :, n_ctx:]], dim=2)
        n_ctx, n = cols.numel(), keys.shape[2]
    if softcap is None:   # the max over queries and heads in one call (a fused kernel on CUDA)
        got = kernels.attention_received(query, keys, key_pos, query_pos, scale, sliding_window, reduce="max",
                                         head_reduce="max", n_out=n_ctx)
        if cols is None:
            return got
        out[:, :, cols] = got
        return out
    kt = keys.float().transpose(-1, -2)                                          # (b, hk, d, n)
    head_pos, tail_pos = key_pos[:, :, None, :n_ctx], key_pos[:, :, None, n_ctx:]
    head_pad = head_pos < 0                                                      # (b, hk, 1, n_ctx)
    got = out if cols is None else torch.zeros(b, hk, n_ctx, dtype=torch.float32, device=keys.device)
    step = max(1, SCORE_BLOCK_BYTES // (4 * b * hq * max(n, 1)))
    for s in range(0, L, step):
        q = group_queries(query[:, :, s:s + step], hk).float()                  # (b, hk, g, l, d)
        l = q.shape[3]
        w = torch.matmul(q.reshape(b, hk, g * l, d), kt).mul_(scale)            # row = group * l + query
        if softcap is not None:
            w.div_(softcap).tanh_().mul_(softcap)
        qp = query_pos[:, None, s:s + step].expand(b, g, l).reshape(b, 1, g * l, 1)
        # the pass's own keys: causal; the prompt's: padding (broadcast over the rows) and the window
        w[..., n_ctx:].masked_fill_((tail_pos > qp) | (tail_pos < 0), float("-inf"))
        w[..., :n_ctx].masked_fill_(head_pad, float("-inf"))
        if sliding_window is not None:
            w.masked_fill_(key_pos[:, :, None, :] <= qp - sliding_window, float("-inf"))
        torch.maximum(got, torch.softmax(w, dim=-1)[..., :n_ctx].amax(dim=2), out=got)
    if cols is not None:
        out[:, :, cols] = got
    return out


def chat_parts(tokenizer) -> tuple[list[int], list[int]] | None:
    """Token ids of the chat template around one user message: ``(prefix, suffix)`` (the suffix
    closes the user turn and opens the assistant's), or None without a usable template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00KVZIP\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # a template that wants more than one user message: use the plain form
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    pre, _, post = text.partition(marker)
    return _encode(tokenizer, pre), _encode(tokenizer, post)


def target_span(prompt_ids: list[int], tokenizer) -> tuple[int, list[int], list[int]]:
    """What the passes reconstruct: ``(offset, target ids, suffix ids)``. With a chat prompt
    (it starts with the template's user-turn prefix) the prefix and a trailing assistant opener
    are left out and the suffix closes the user turn; otherwise a newline does."""
    target, suffix, offset = list(prompt_ids), [], 0
    if tokenizer is not None:
        suffix = _encode(tokenizer, "\n")
        parts = chat_parts(tokenizer)
        if parts is not None and parts[0] and target[:len(parts[0])] == parts[0]:
            pre, suffix = parts
            rest = target[len(pre):]
            if suffix and rest[-len(suffix):] == suffix:
                rest = rest[:-len(suffix)]
            if rest:
                target, offset = rest, len(pre)
    return offset, target, suffix


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


@register("kvzip")
@dataclass(frozen=True)
class KVzip(EvictionMethod):
    """KVzip: query-agnostic eviction by context reconstruction (reread passes, max attention).

    Parameters
    ----------
    budget : int | float
        Tokens kept per KV head after the prefill (the sinks included): on average over all layers
        and heads with ``allocation="global"``, in every head with ``"head"``.
    chunk : int
        Context tokens reconstructed per reread pass (each pass is the instruction plus one chunk;
        its attention runs over the whole prompt: a pass costs O(chunk * prompt)).
    sinks : int
        First prompt tokens always kept (attention sinks).
    overlap : int
        Last tokens of the previous chunk quoted in the instruction of the next pass (where to
        continue from); 0: none.
    softmax : str
        ``local``: a pass's softmax runs over the sinks, the chunk it reconstructs and its own
        tokens (the KVzip paper's chunked scoring, as kvpress); ``full``: over every key it sees.
    allocation : str
        ``global``: the budget is the mean over all layers and KV heads, and the best scores of
        any layer and head are kept (KVzip's non-uniform budgets; kvpress's default): kept
        lengths differ per head, stored compactly; ``head``: ``budget`` tokens per KV head.
    """

    chunk: int = 2048
    sinks: int = 4
    overlap: int = 8
    softmax: str = "local"
    allocation: str = "global"
    deferred = True
    ragged: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        for name, lo in (("chunk", 16), ("sinks", 0), ("overlap", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.chunk > 1 << 20:
            raise ValueError(f"chunk must be <= {1 << 20}, got {self.chunk}")
        if self.overlap >= self.chunk:
            raise ValueError(f"overlap must be smaller than chunk ({self.chunk}), got {self.overlap}")
        if self.softmax not in ("local", "full"):
            raise ValueError(f"softmax must be 'local' or 'full', got {self.softmax!r}")
        if self.allocation not in ("global", "head"):
            raise ValueError(f"allocation must be 'global' or 'head', got {self.allocation!r}")

    def start(self, prompt_len: int, num_layers: int) -> KVzipRun:
        return KVzipRun(resolve_budget(self.budget, prompt_len), prompt_len, num_layers)

    def shares_prefix(self) -> bool:
        return True  # scores in its reread passes, after the prefill

    def reread_state(self):
        # the passes leave only each layer's KVzipState (max attention per slot), whatever the
        # budget or allocation: with a prefix store, later budgets reuse it instead of rereading
        return ("kvzip", self.chunk, self.overlap, self.softmax, self.sinks)

    # ---- the reread passes ---------------------------------------------------------------------
    def reread_passes(self, run, prompt_ids, tokenizer):
        """The reconstruction passes of one prompt (counted in ``run``). When the prompt starts
        with the chat template's user-turn prefix, that prefix (and a trailing assistant opener) is
        not repeated and the instruction is closed as a user turn; else a newline closes it."""
        first = _encode(tokenizer, FIRST_INSTRUCTION) if tokenizer is not None else []
        nxt = _encode(tokenizer, NEXT_INSTRUCTION) if tokenizer is not None else []
        offset, target, suffix = target_span(prompt_ids, tokenizer)
        run.spans.append((offset, len(target)))
        chunks = [target[i:i + self.chunk] for i in range(0, len(target), self.chunk)]
        passes = []
        for i, c in enumerate(chunks):
            head = first if i == 0 else nxt + (chunks[i - 1][-self.overlap:] if self.overlap else [])
            passes.append(head + suffix + c)
        run.passes += len(passes)
        run.reread_tokens += sum(len(p) for p in passes)
        return passes

    # ---- scoring ---------------------------------------------------------------------------------
    def observe(self, run, layer, query, module, ctx) -> None:
        """While a reread pass runs: fold its queries' attention into the prompt slots' scores."""
        if not ctx.rereading:
            return
        st = layer.state.get(self.name)
        q_start = layer.length - query.shape[2]
        if st is None:  # the first chunk of the first pass: the prompt's slots are all before it
            st = layer.state[self.name] = KVzipState(
                torch.zeros(layer.k_buf.shape[0], layer.k_buf.shape[1], q_start, dtype=torch.float32,
                            device=layer.k_buf.device))
        n_ctx = st.scores.shape[-1]
        if q_start == n_ctx:  # a pass starts
            st.passes += 1
        local = None
        if self.softmax == "local":  # the chunk this pass reconstructs
            offset, span = run.spans[ctx.row[0] if ctx.row is not None else 0]
            s0 = offset + (st.passes - 1) * self.chunk
            local = (self.sinks, s0, min(offset + span, s0 + self.chunk))
        scale = module_scale(module, layer.keys)
        s = reconstruction_scores(query, layer.keys, layer.positions, ctx.cache.step_positions, n_ctx,
                                  scale, getattr(module, "sliding_window", None),
                                  getattr(module, "attn_logit_softcapping", None), local)
        torch.maximum(st.scores, s, out=st.scores)

    def deferred_scores(self, run, layer) -> torch.Tensor:
        """The prompt slots' reconstruction scores ``(batch, kv_heads, n)``, sinks scored above any
        attention weight; the layer's state is dropped (one call per layer, after the passes)."""
        st = layer.state.pop(self.name, None)
        if st is None:
            raise RuntimeError(f"kvzip: no reconstruction scores in layer {layer.layer_idx} "
                               f"(its reread passes did not run)")
        s = st.scores
        if s.shape[-1] != layer.length:
            raise RuntimeError(f"kvzip: {s.shape[-1]} scores for {layer.length} slots in layer {layer.layer_idx}")
        if self.sinks:
            pos = layer.positions
            s = torch.where((pos >= 0) & (pos < self.sinks), 2.0 - pos.float() / self.sinks, s)
        return s

    def finish_prefill(self, run, layers, ctx) -> None:
        """``allocation="head"``: the inherited per-head compression. ``global``: every layer's
        scores at once, the best ``budget * layers * kv_heads`` (per row) of any layer and head."""
        if self.allocation == "head":
            return super().finish_prefill(run, layers, ctx)
        self.prefill_done(run, ctx)
        live = [ly for ly in layers if ly.k_buf is not None]
        if not live:
            return
        scores = torch.stack([self.deferred_scores(run, ly) for ly in live], 1)      # (b, L, h, n)
        valid = torch.stack([ly.positions >= 0 for ly in live], 1)
        b, L, h, n = scores.shape
        if run.tokens >= n:
            return
        scores, counts = head_budgets(scores.view(b, L * h, n), valid.view(b, L * h, n), run.tokens)
        scores, counts = scores.view(b, L, h, n), counts.view(b, L, h)
        for j, ly in enumerate(live):
            keep_top(ly, scores[:, j], counts[:, j])

    def prefill_done(self, run, ctx) -> None:
        """Count the passes' time (then ``finish_prefill`` takes every layer's scores, dropping the
        state, and keeps the top ``budget`` slots per head)."""
        run.reread_s += ctx.reread_s

    def stats(self, run) -> dict[str, Any]:
        return {"reread_passes": run.passes, "reread_tokens": run.reread_tokens, "reread_s": run.reread_s}
