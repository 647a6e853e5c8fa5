"""``tova``: TOVA (Oren et al., 2024, arXiv 2401.06104) - the current query's attention decides.

Token Omission Via Attention: a key's score is the softmax attention of the last query (the last
prompt token at prefill end, the new token at each decode step) to it. TOVA uses one policy per
layer: the weights are averaged over all query heads of the layer, so every KV head keeps the same
tokens (``per_head=True`` instead averages over the query heads of each KV group, GQA-aware, and
lets heads keep different tokens). While decoding, each step that leaves a layer over its budget
evicts the one token with the lowest attention of the new query (possibly the new token itself),
in place: the newest slot moves into its slot (eager decode only, see ``static_ok``). TOVA has no
recent window and no sinks: what the current query ignores goes.
"""

from dataclasses import dataclass

import torch

from kvsift.methods.base import EvictionMethod, module_scale, register
from kvsift.methods.h2o import attention_received


def last_query_attention(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                         scale: float, sliding_window: int | None = None, per_head: bool = False) -> torch.Tensor:
    """Attention of the last query to each key: query ``(batch, q_heads, q, dim)`` (only
    ``query[:, :, -1]`` is used) at ``query_pos (batch, q)``; keys ``(batch, kv_heads, n, dim)`` at
    ``key_pos (batch, kv_heads, n)``. Averaged over every query head of the layer (the same score
    for every KV head: slot ``j`` must hold the same token in every head, as it does after TOVA's
    own selection), or with ``per_head`` over the query heads of each KV group. Padding keys get
    ``-inf``. Returns ``(batch, kv_heads, n)`` fp32."""
    a = attention_received(query[:, :, -1:], keys, key_pos, query_pos[:, -1:], scale, sliding_window)
    if not per_head:
        a = a.mean(1, keepdim=True).expand_as(a)
    return a.masked_fill(key_pos < 0, float("-inf"))


@register("tova")
@dataclass(frozen=True)
class TOVA(EvictionMethod):
    """TOVA: keep the keys the current query attends to most; one eviction per decode step.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head, also while decoding.
    per_head : bool
        Score per KV head (attention averaged over the query heads of its group) instead of one
        score per layer averaged over all query heads (TOVA's policy).
    decode_evict : bool
        At each decode step over the budget, evict the token the new query attends to least
        (eager decode). False: evict at prefill end only.
    """

    per_head: bool = False
    decode_evict: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("per_head", "decode_evict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def shares_prefix(self) -> bool:
        return True   # scores with the prompt's last query, then evicts while decoding

    def static_ok(self) -> bool:
        return not self.decode_evict  # decode eviction moves slots per step (host-side length)

    def score(self, query, keys, values, positions, module, layer_idx):
        """Attention of the last query (its key is the layer's last slot). ``(batch, kv_heads, n)``."""
        return last_query_attention(query, keys, positions, positions[:, 0, -1:], module_scale(module, keys),
                                    getattr(module, "sliding_window", None), self.per_head)

    def evicts_while_decoding(self) -> bool:
        return self.decode_evict  # evicts one token per decode step, unless told not to

    def after_attend(self, run, layer, query, module, ctx):
        super().after_attend(run, layer, query, module, ctx)  # prefill end: keep the top tokens
        if ctx.decoding and self.decode_evict and layer.length > self.layer_budget(run, layer.layer_idx):
            s = last_query_attention(query, layer.keys, layer.positions, ctx.cache.step_positions,
                                     module_scale(module, layer.keys), getattr(module, "sliding_window", None),
                                     self.per_head)
            layer.replace_slot(s.argmin(-1, keepdim=True))  # (b, kv_heads, 1); padding first
