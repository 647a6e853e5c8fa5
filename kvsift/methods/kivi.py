"""``kivi``: KIVI (Liu et al., 2024, arXiv 2402.02750) - 4- or 2-bit asymmetric KV quantization.

A storage codec rather than a selection: after the prefill (and after every other stage of a
composition evicted what it evicts, deferred compressions included), each layer's kept KV moves
into a :class:`~kvsift.cache.quant.QuantKV` (``layer.quantize``): keys per channel over groups of
``group`` tokens, values per token over groups of channels, codes packed in uint8, the newest 1 ..
``residual`` tokens in full precision. Decode tokens are appended in full precision and quantized a
whole window at a time. Attention reads the codes and dequantizes them as it goes
(``quant_decode_attention``: Triton on CUDA, block by block in PyTorch elsewhere), in every decode
mode. Alone (``kivi``) it keeps the whole context; composed (``snapkv+kivi``, ``quest+kivi``) it is
the last stage and stores what the others keep or select from (``sentencekv+kivi``: its host chunk
store is quantized too, see :meth:`KIVI.store_options`); a batch prefilled row by row
(``snapkv+kivi`` does: each row is evicted before the next) is quantized once stacked. Requests
join running batches (continuous batching): the rows' stores are joined into one
(:meth:`QuantKV.join <kvsift.cache.quant.QuantKV.join>`), each row keeping its own window and
quantizing it on its own schedule, so it decodes as alone. Lossy: not equal to ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsift.cache.quant import QuantKV, coded_token_bytes, default_group, kv_bytes_per_token, value_group
from kvsift.errors import MethodOptionError
from kvsift.methods.base import KVMethod, register


@register("kivi")
@dataclass(frozen=True)
class KIVI(KVMethod):
    """KIVI: 4/2-bit KV quantization (keys per channel, values per token, full-precision recent window).

    Parameters
    ----------
    budget : int | float | None
        Not used by kivi itself (every token the earlier stages keep is stored, quantized); composed,
        e.g. ``snapkv+kivi``, it is the eviction's budget.
    bits : int
        Bits per code: 4 or 2.
    group : int | None
        Tokens sharing a key scale and zero point per channel, and channels sharing a value scale
        (at most the head): a power of two in [8, 1024]. None: the smallest from 128 up that keeps
        the quantized bytes within 0.27x (int4) / 0.15x (int2) of bf16 for the model's head_dim
        (128 at head_dim 128, 256 at head_dim 64 with int4), or the largest power of two dividing
        ``residual`` when that is smaller.
    residual : int | None
        Newest tokens kept in full precision until the window fills (a multiple of ``group``, of 8
        without one; None: ``group``).
    """

    bits: int = 4
    group: int | None = None
    residual: int | None = None
    needs_budget = False
    codec = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("bits", "group", "residual"):
            v = getattr(self, name)
            if (v is not None or name == "bits") and (isinstance(v, bool) or not isinstance(v, int)):
                raise MethodOptionError(f"method 'kivi': {name} must be an int, got {v!r}", param=name)
        if self.bits not in (2, 4):
            raise MethodOptionError(f"method 'kivi': bits must be 4 or 2, got {self.bits!r}", param="bits")
        if self.residual is not None and (self.residual < 8 or self.residual % 8):
            raise MethodOptionError(f"method 'kivi': residual must be a positive multiple of 8 (and of group), "
                                    f"got {self.residual!r}", param="residual")
        if self.group is not None:
            try:
                QuantKV.check_options(self.bits, self.group, self.residual or self.group)
            except ValueError as e:
                param = str(e).split(" ", 1)[0]
                raise MethodOptionError(f"method 'kivi': {e}", param=param) from None

    def options_for(self, head_dim: int) -> tuple[int, int]:
        """``(group, residual)`` for a model of ``head_dim`` (the defaults resolved)."""
        group = self.group if self.group is not None else default_group(head_dim, self.bits)
        if self.group is None and self.residual is not None:
            group = min(group, self.residual & -self.residual)   # the largest power of two dividing it
        return group, self.residual if self.residual is not None else group

    def store_options(self, head_dim: int) -> dict:
        """How another stage's own KV store (sentencekv's host chunks) quantizes: ``bits`` and the
        value channel group (keys there are grouped by chunk)."""
        group, _ = self.options_for(head_dim)
        return {"bits": self.bits, "vgroup": value_group(group, head_dim)}

    def store_share(self, head_dim: int) -> float:
        """Host bytes of a token in another stage's store (:meth:`store_options`: packed codes and
        per-token value scales and zeros; the key scales, one per chunk, stay on the device) as a
        share of its bf16 KV."""
        return coded_token_bytes(head_dim, self.bits, self.store_options(head_dim)["vgroup"]) / (4 * head_dim)

    def device_share(self, head_dim: int) -> tuple[float, int]:
        """Quantized bytes of a token on the device (codes, value scales, key scales per group and
        its int32 position) over its 16-bit KV and position; the window of up to ``residual`` newest
        tokens stays at full precision."""
        group, residual = self.options_for(head_dim)
        return (kv_bytes_per_token(head_dim, self.bits, group) + 4) / (4 * head_dim + 4), residual

    def row_prefill_ok(self) -> bool:
        return True  # alone: each sequence quantized at the end of its prefill, before the next one

    def shares_prefix(self) -> bool:
        return True  # quantizes after the prefill

    def joins_rows(self) -> bool:
        """Rows of other lengths join a running batch and decode as alone: each keeps its own window
        and flushes it on its own schedule (:meth:`QuantKV.join <kvsift.cache.quant.QuantKV.join>`).
        Composed too (``snapkv+kivi``, ``quest+kivi``, ``sentencekv+kivi``: its quantized host
        stores are stacked by reference, ``ChunkStore.stack``)."""
        return True

    def finish_prefill(self, run, layers, ctx) -> None:
        """Quantize every layer holding KV (after the other stages' compression). A batch prefilled
        row by row: kivi alone quantizes each row at its end when the rows are as long (the batch then
        holds one row at full precision at a time, the engine stacks the quantized rows); otherwise,
        and in a composition, the stacked batch is quantized (:meth:`rows_stacked`)."""
        if ctx.row is None or (ctx.method is self and ctx.uniform_rows):
            self._quantize(layers)

    def rows_stacked(self, run, layers, ctx) -> None:
        self._quantize(layers)

    def _quantize(self, layers) -> None:
        for layer in layers:
            if layer.k_buf is not None and layer.ragged is None:
                group, residual = self.options_for(layer.k_buf.shape[-1])
                try:
                    layer.quantize(self.bits, group, residual)
                except ValueError as e:  # a head_dim the groups do not divide, a residual off the group
                    param = "residual" if str(e).startswith("residual") else "group"
                    raise MethodOptionError(f"method 'kivi': {e}", param=param) from None

    def stats(self, run):
        return {"kv_bits": self.bits}
