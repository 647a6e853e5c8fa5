"""``duo``: DuoAttention (Xiao et al., 2024, arXiv 2410.10819), training-free - retrieval heads keep
the whole context, streaming heads keep attention sinks plus a recent window.

The paper learns a gate per head on synthetic passkey data. Here the heads are told apart with no
training and no per-model files, ranked over **all layers and heads at once** (deferred
compression: the ranking needs every layer's score, so the cache is compressed after the whole
prefill), by one of two tests (``heads``):

* ``induction`` (default): after the prefill the model reads a probe, ``probe`` random tokens
  repeated twice, placed after the prompt (a reread pass, dropped afterwards). A head's score is
  the attention the second copy's queries give to the token that followed their token's first
  occurrence: the copy-from-context behaviour that retrieval heads have (RazorAttention's
  induction test). It costs a pass of ``2 * probe`` tokens and does not depend on the prompt.
* ``prompt``: the last ``window`` prompt queries attend to every key (one dense pass over the
  window, as SnapKV's vote), and a KV head's *long-range mass* is the attention they put on keys
  that are neither sinks nor within ``recent`` tokens of the end, averaged over the window and
  the query heads of the group.

Why induction by default: on the default model (Qwen2.5-Coder-0.5B, CPU, 2k-token mk_niah, 5
samples, 25% kept) it answered 4 of 5 where the prompt test answered none; at 8k on the GPU the
prompt test lost most needles at 10-25% (docs/eval.md).

How many heads are retrieval heads: with a ``budget`` (mean tokens kept per head over all layers
and heads), as many as fit it, ``r * n + (1 - r) * (sinks + recent) = budget``; without one,
``retrieval_ratio`` of them. A budget below ``sinks + recent`` makes every head a streaming head
keeping ``budget`` tokens (a quarter of them sinks at most). Streaming heads keep ``sinks +
recent`` tokens, so the device KV bytes shrink by the streaming fraction (stored compactly,
:class:`kvsift.cache.ragged.RaggedKV`). Generated tokens are kept for every head (at most
``max_tokens`` per head: streaming heads do not roll their window during decode, unlike the
paper's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvsift.methods.base import (SCORE_BLOCK_BYTES, EvictionMethod, Run, attention_blocks, keep_top, module_scale,
                                  register)
from kvsift.methods.snapkv import window_attention_scores

PROBE_SEED = 1234


def induction_scores(query: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, probe_start: int,
                     period: int, scale: float, q_start: int,
                     max_bytes: int = SCORE_BLOCK_BYTES) -> tuple[torch.Tensor, int]:
    """How much each KV head copies: ``(sum (batch, kv_heads), count)`` over this chunk's queries.

    The probe is ``period`` tokens repeated twice from slot ``probe_start``; ``query (batch,
    q_heads, L, dim)`` are the queries of slots ``q_start .. q_start + L - 1`` (a chunk of it). A
    query of the second copy, probe offset ``period + i``, sees the token ``R[i]``; an induction
    (retrieval) head attends to the key after its previous occurrence, offset ``i + 1``. The sum
    is that attention (softmax over every key the query sees), summed over the second copy's
    queries in the chunk and averaged over the query heads of each group; ``count`` those queries."""
    b, hk, _ = positions.shape
    off = torch.arange(query.shape[2], device=keys.device) + q_start - probe_start
    sel = (off >= period).nonzero().flatten()
    out = torch.zeros(b, hk, device=keys.device)
    if sel.numel() == 0:
        return out, 0
    qpos = positions[:, 0, q_start + sel]                                            # (b, T)
    target = probe_start + off[sel] - period + 1                                     # (T,)
    for s, attn in attention_blocks(query[:, :, sel], keys, positions, qpos, scale, max_bytes=max_bytes):
        t = target[s:s + attn.shape[3]]
        idx = t.view(1, 1, 1, -1, 1).expand(b, hk, attn.shape[2], t.numel(), 1)
        out += attn.gather(-1, idx).squeeze(-1).sum(dim=3).mean(dim=2)
    return out, int(sel.numel())


def long_range_mass(attn: torch.Tensor, positions: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """``(batch, kv_heads)``: attention mass ``attn (batch, kv_heads, n)`` (mean attention of the
    window's queries per key) on keys that are neither among the first ``sinks`` positions nor
    among the last ``recent`` positions of the row."""
    last = positions.amax(-1, keepdim=True)                                 # (b, h, 1)
    far = (positions >= sinks) & (positions <= last - recent)
    return (attn * far).sum(-1)


@dataclass
class DuoRun(Run):
    mass: dict = field(default_factory=dict)       # layer index -> (batch, kv_heads) retrieval score
    counts: dict = field(default_factory=dict)     # layer index -> probe queries summed in ``mass``
    probe_start: dict = field(default_factory=dict)  # layer index -> first slot of the probe
    retrieval: float = 0.0                          # fraction of heads kept whole (last prefill)


@register("duo")
@dataclass(frozen=True)
class DuoAttention(EvictionMethod):
    """DuoAttention, training-free: retrieval heads keep everything, streaming heads sinks + window.

    Parameters
    ----------
    budget : int | float | None
        Mean tokens kept per KV head over all layers and heads; sets how many heads are retrieval
        heads. None: ``retrieval_ratio`` of them.
    retrieval_ratio : float
        Fraction of KV heads kept whole when there is no budget.
    sinks : int
        First tokens a streaming head keeps.
    recent : int
        Last prompt tokens a streaming head keeps.
    window : int
        Last prompt queries whose attention tells retrieval from streaming heads (``heads="prompt"``).
    heads : str
        How retrieval heads are found: ``induction`` (after the prefill the model reads a probe of
        ``probe`` random tokens repeated twice, placed after the prompt and dropped afterwards;
        heads that attend to the token after the previous occurrence, as retrieval heads do, rank
        first: the induction test of RazorAttention, training-free and independent of the prompt)
        or ``prompt`` (long-range attention mass of the prompt's last queries).
    probe : int
        Length of the random block the induction probe repeats.
    """

    retrieval_ratio: float = 0.5
    sinks: int = 64
    recent: int = 256
    window: int = 32
    heads: str = "induction"
    probe: int = 64
    needs_budget: ClassVar[bool] = False
    deferred: ClassVar[bool] = True
    ragged: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.retrieval_ratio <= 1.0:
            raise ValueError(f"retrieval_ratio must be in [0, 1], got {self.retrieval_ratio}")
        if self.sinks < 0 or self.recent < 1:
            raise ValueError(f"sinks must be >= 0 and recent >= 1, got sinks={self.sinks}, recent={self.recent}")
        if not 1 <= self.window <= 4096:
            raise ValueError(f"window must be in [1, 4096], got {self.window}")
        if self.heads not in ("prompt", "induction"):
            raise ValueError(f"heads must be 'prompt' or 'induction', got {self.heads!r}")
        if not 4 <= self.probe <= 1024:
            raise ValueError(f"probe must be in [4, 1024], got {self.probe}")

    def start(self, prompt_len: int, num_layers: int) -> DuoRun:
        from kvsift.budget import resolve_budget

        tokens = resolve_budget(self.budget, prompt_len) if self.budget is not None else prompt_len
        return DuoRun(tokens, prompt_len, num_layers)

    def min_last_chunk(self) -> int:
        return self.window

    def shares_prefix(self) -> bool:
        return True  # head scores from the last window or from probe passes after the prefill

    def layer_budget(self, run, layer_idx: int) -> int:
        return run.prompt_len  # the budget is global: finish_prefill allocates it

    def streaming_window(self, run: DuoRun) -> tuple[int, int]:
        """``(sinks, recent)`` a streaming head keeps: the options, shrunk to the budget when it is
        smaller (then every head is a streaming head: StreamingLLM at that budget)."""
        total = self.sinks + self.recent
        if self.budget is None or run.tokens >= total:
            return self.sinks, self.recent
        sinks = min(self.sinks, run.tokens // 4)
        return sinks, max(1, run.tokens - sinks)

    def retrieval_fraction(self, run: DuoRun, n: int) -> float:
        """Fraction of heads kept whole for a prompt of ``n`` tokens."""
        if self.budget is None:
            return self.retrieval_ratio
        stream = min(sum(self.streaming_window(run)), n)
        if n <= stream:
            return 1.0
        return float(min(1.0, max(0.0, (run.tokens - stream) / (n - stream))))

    def reread_passes(self, run, prompt_ids, tokenizer) -> list[list[int]]:
        if self.heads != "induction":
            return []
        vocab = max(1000, max(prompt_ids) + 1)
        g = torch.Generator().manual_seed(PROBE_SEED)
        block = torch.randint(100, min(vocab, 30000), (self.probe,), generator=g).tolist()
        return [block + block]

    def observe(self, run, layer, query, module, ctx) -> None:
        if not (ctx.rereading and self.heads == "induction"):
            return
        i = layer.layer_idx
        scale = module_scale(module, layer.keys)
        q_start = layer.length - query.shape[2]              # the chunk's slots come last, in order
        start = run.probe_start.setdefault(i, q_start)       # the probe's first chunk starts it
        total, n = induction_scores(query, layer.keys, layer.positions, start, self.probe, scale, q_start)
        run.mass[i] = run.mass.get(i, 0) + total
        run.counts[i] = run.counts.get(i, 0) + n

    def prefill_end(self, run, layer, query, module, ctx) -> None:
        if self.heads != "prompt":
            return
        scale = module_scale(module, layer.keys)
        attn = window_attention_scores(query, layer.keys, layer.positions, self.window, scale)
        run.mass[layer.layer_idx] = long_range_mass(attn, layer.positions, *self.streaming_window(run))

    def finish_prefill(self, run: DuoRun, layers, ctx) -> None:
        self.prefill_done(run, ctx)
        idx = sorted(i for i in run.mass if layers[i].k_buf is not None)
        if not idx:
            return
        mass = torch.stack([run.mass.pop(i) / max(1, run.counts.pop(i, 1)) for i in idx], 1)   # (b, L, h)
        run.probe_start.clear()
        b, L, h = mass.shape
        n = max(int((layers[i].positions >= 0).sum(-1).max()) for i in idx)
        frac = self.retrieval_fraction(run, n)
        run.retrieval = frac
        k = round(frac * L * h)
        retrieval = torch.zeros(b, L * h, dtype=torch.bool, device=mass.device)
        if k > 0:
            retrieval.scatter_(1, mass.flatten(1).topk(k, dim=-1).indices, True)
        retrieval = retrieval.view(b, L, h)
        if bool(retrieval.all()):
            return  # every head keeps everything
        sinks, recent = self.streaming_window(run)
        for j, i in enumerate(idx):
            layer = layers[i]
            pos = layer.positions
            valid = pos >= 0
            last = pos.amax(-1, keepdim=True)
            local = valid & ((pos < sinks) | (pos > last - recent))
            keep = torch.where(retrieval[:, j, :, None], valid, local)          # (b, h, n)
            keep_top(layer, keep.float(), keep.sum(-1))

    def stats(self, run: DuoRun) -> dict:
        return {"retrieval_heads": round(run.retrieval, 4)}
