"""``kivi``: KIVI (Liu et al., 2024, arXiv 2402.02750) - 4- or 2-bit asymmetric KV quantization.

A storage codec rather than a selection: after the prefill (and after every other stage of a
composition evicted what it evicts, deferred compressions included), each layer's kept KV moves
into a :class:`~kvsift.cache.quant.QuantKV` (``layer.quantize``): keys per channel over groups of
``group`` tokens, values per token over groups of channels, codes packed in uint8, the newest 1 ..
``residual`` tokens in full precision. Decode tokens are appended in full precision and quantized a
whole window at a time. Attention reads the codes and dequantizes them as it goes
(``quant_decode_attention``: Triton on CUDA, block by block in PyTorch elsewhere), in every decode
mode. Alone (``kivi``) it keeps the whole context; composed (``snapkv+kivi``, ``quest+kivi``) it is
the last stage and stores what the others keep or select from. Lossy: not equal to ``full``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsift.cache.quant import QuantKV
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
    group : int
        Tokens sharing a key scale and zero point per channel, and channels sharing a value scale
        (at most the head): a power of two; 128 keeps int4 at 0.27x and int2 at 0.15x the bf16 bytes
        with head_dim 128.
    residual : int
        Newest tokens kept in full precision until the window fills (a multiple of ``group``).
    """

    bits: int = 4
    group: int = 128
    residual: int = 128
    needs_budget = False
    codec = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("bits", "group", "residual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise MethodOptionError(f"method 'kivi': {name} must be an int, got {v!r}", param=name)
        try:
            QuantKV.check_options(self.bits, self.group, self.residual)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise MethodOptionError(f"method 'kivi': {e}", param=param) from None

    def finish_prefill(self, run, layers, ctx) -> None:
        """Quantize every layer holding KV (after the other stages' compression)."""
        if ctx.row is not None:
            raise RuntimeError("kivi quantizes the batch cache after its prefill: use prefill_mode='batch' "
                               "(prefilling row by row is not supported)")
        for layer in layers:
            if layer.k_buf is not None and layer.ragged is None:
                try:
                    layer.quantize(self.bits, self.group, self.residual)
                except ValueError as e:  # a head_dim the groups do not divide
                    raise MethodOptionError(f"method 'kivi': {e}", param="group") from None

    def stats(self, run):
        return {"kv_bits": self.bits}
