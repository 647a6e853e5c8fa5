"""``streaming``: StreamingLLM (Xiao et al., 2023) - attention sinks plus a recent window.

Keys carry RoPE for their true positions (applied before caching) and new tokens keep counting
from the number of tokens seen, so positions stay correct after eviction.
"""

from dataclasses import dataclass

from kvsift.methods.base import EvictionMethod, register


@register("streaming")
@dataclass(frozen=True)
class StreamingLLM(EvictionMethod):
    """StreamingLLM: first `sinks` tokens + most recent tokens, rolling during decode.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head (sinks + recent window), also while decoding.
    sinks : int
        First tokens always kept (attention sinks).
    """

    sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, query, keys, values, positions, module, layer_idx):
        """Recency: the position itself; sinks (position < ``sinks``) always kept. ``(batch, kv_heads, n)``."""
        s = positions.float()
        return s.masked_fill((positions >= 0) & (positions < self.sinks), float("inf"))

    def static_ok(self) -> bool:
        return False  # the rolling window moves slots per step (host-side length)

    def evicts_while_decoding(self) -> bool:
        return True  # the rolling window evicts at every decode step

    def shares_prefix(self) -> bool:
        return True  # keeps sinks + window at the prefill's end

    def after_attend(self, run, layer, query, module, ctx):
        super().after_attend(run, layer, query, module, ctx)  # prefill end: keep sinks + window
        if ctx.decoding and layer.length > run.tokens:  # decode: O(1) slot reuse, no buffer copy
            layer.replace_oldest(run.tokens, protect_below=self.sinks)
