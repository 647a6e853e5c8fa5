"""``adakv``: Ada-KV (Feng et al., 2024, arXiv 2407.11550) - one budget per layer shared by its KV
heads, allocated by score.

A wrapper over any scorer: ``adakv(snapkv)``, ``adakv(h2o)``, ``adakv(pyramidkv)`` (pyramid layer
budgets, shared across heads), ``adakv(kvzip)``... (``adakv`` alone wraps ``snapkv``). The scorer's
scores of all heads of a layer compete for ``budget * kv_heads`` slots: heads whose attention is
concentrated keep few tokens, dispersed heads many. A safeguard keeps at least ``alpha * budget``
per head. Kept lengths then differ per head and the layer stores them compactly
(:class:`kvsift.cache.ragged.RaggedKV`): the device bytes are the tokens really kept, not the
longest head's count times the heads, and decode reads them in place through the sparse kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvsift.methods.base import ScorerWrapper, head_budgets, keep_top, register


@register("adakv")
@dataclass(frozen=True)
class AdaKV(ScorerWrapper):
    """AdaKV: a layer's budget shared by its KV heads, allocated by score; compact per-head KV.

    Parameters
    ----------
    budget : int | float
        Mean tokens kept per KV head of a layer (a layer keeps ``budget * kv_heads`` in all).
    scorer : str
        The wrapped scorer (an eviction method); ``adakv(<scorer>)`` in a spec sets it.
    alpha : float
        Safeguard: every head keeps at least ``alpha * budget`` of its best tokens (Ada-KV's
        ``alpha_safeguard``; 0 = pure allocation by score, 1 = uniform like the scorer alone).
    """

    alpha: float = 0.2
    ragged: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def shares_prefix(self) -> bool:
        return self.inner.shares_prefix()  # its own part is the selection at the prefill's end

    def prefix_state(self):
        return self.inner.prefix_state()

    def reread_state(self):
        return self.inner.reread_state()   # adakv(kvzip): the passes' scores, then its own allocation

    def compress(self, run, layer, scores) -> None:
        k = self.layer_budget(run, layer.layer_idx)
        if layer.length <= k:
            return
        s, counts = head_budgets(scores, layer.positions >= 0, k, self.alpha)
        keep_top(layer, s, counts)
