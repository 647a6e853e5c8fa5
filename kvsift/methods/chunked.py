"""``chunked``: keep-as-you-go prefill - the wrapped scorer compresses after every prefill chunk, so
the device never holds a long prompt's whole KV, only what is kept plus one chunk.

``chunked(snapkv)`` prefills chunk by chunk as usual; after each chunk but the last has attended,
every layer scores its KV with the scorer's ``score`` over that chunk's last ``window`` queries and
keeps the top ``hold * budget`` slots per KV head (buffers reallocated at the kept size: the bytes
are freed). The next chunk attends to what was kept. At the last chunk - the one holding the
question in a prompt that ends with one - the scorer compresses to ``budget`` exactly as it does
without the wrapper (its own observation window, the question's queries). The engine sizes the
prefill buffers for ``hold * budget`` plus one chunk instead of the whole prompt
(:meth:`ChunkedPrefill.prefill_hold`), so the prompt's length is bounded by host and weight memory,
not by its KV.

The price: a chunk is scored before the question is seen, by the text around it, so a token that
only the question makes important can be dropped on the way (kvpress compresses only after the
whole prefill, and needs the whole KV on the device first). ``hold > 1`` keeps more between chunks
to hedge. At a budget of the whole prompt nothing is evicted and the tokens are those of ``full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsift.errors import MethodOptionError
from kvsift.methods.base import EvictionMethod, ScorerWrapper, keep_top, register


@register("chunked")
@dataclass(frozen=True)
class ChunkedPrefill(ScorerWrapper):
    """Keep-as-you-go prefill: the scorer compresses after every prefill chunk, not only at the end.

    Parameters
    ----------
    budget : int | float
        Tokens kept per layer and KV head at prefill end (a ratio: of the prompt).
    scorer : str
        The wrapped scorer; ``chunked(<scorer>)`` in a spec sets it. It must score from queries
        (``score``) and keep no per-slot state across chunks: snapkv, pyramidkv, streaming, tova,
        expected_attention (not h2o, whose accumulated attention is per slot).
    hold : float
        Tokens kept between chunks, as a multiple of the layer's budget (>= 1): more keeps more
        of what a question at the end may need, at ``hold`` times the device KV during prefill.
    window : int
        Last queries of a chunk that score the layer's KV at that chunk's end.
    """

    hold: float = 1.0
    window: int = 32

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.hold, bool) or not isinstance(self.hold, (int, float)) or not 1.0 <= self.hold <= 64.0:
            raise MethodOptionError(f"method 'chunked': hold must be a number in [1, 64], got {self.hold!r}",
                                    param="hold")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= 4096:
            raise MethodOptionError(f"method 'chunked': window must be an int in [1, 4096], got {self.window!r}",
                                    param="window")
        inner = self.inner
        if type(inner).score is EvictionMethod.score or inner.deferred or inner.slot_state:
            raise MethodOptionError(f"chunked(...) needs a scorer that scores from queries and keeps no per-slot "
                                    f"state across chunks (snapkv, pyramidkv, streaming, tova, expected_attention), "
                                    f"got {inner.spec!r}", param="scorer")

    def static_ok(self) -> bool:
        return self.inner.static_ok()

    def row_prefill_ok(self) -> bool:
        return self.inner.row_prefill_ok()

    def joins_rows(self) -> bool:
        return self.inner.joins_rows()  # its own work ends with the prefill; the scorer's may not (tova)

    def evicts_while_decoding(self) -> bool:
        # the scorer's decode-time eviction runs as it does alone (tova, streaming): rows at their
        # budget evict in lockstep and join at it, and a row holds one token over it at most
        return self.inner.evicts_while_decoding()

    def _hold(self, run, layer_idx: int) -> int:
        return max(1, math.ceil(self.hold * self.layer_budget(run, layer_idx)))

    def prefill_hold(self, run) -> int:
        return max(self._hold(run, i) for i in range(run.num_layers))

    def after_attend(self, run, layer, query, module, ctx) -> None:
        # the scorer's own steps, as without the wrapper: observe, its compression at the last chunk,
        # its decode-time eviction (tova)
        self.inner.after_attend(run.inner, layer, query, module, ctx)
        if ctx.decoding or ctx.prefill_end or ctx.rereading or layer.k_buf is None:
            return
        k = self._hold(run, layer.layer_idx)
        if layer.length > k:
            w = query[:, :, -self.window:]
            keep_top(layer, self.inner.score(w, layer.keys, layer.values, layer.positions, module, layer.layer_idx), k)

    def decode_variant(self, run, step):
        return self.inner.decode_variant(run.inner, step)

