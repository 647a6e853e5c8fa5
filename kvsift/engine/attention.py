"""kvsift's attention function, registered with transformers' ``AttentionInterface`` as ``"kvsift"``.

Transformers models call it with post-RoPE ``query (batch, q_heads, q, head_dim)`` and the
``(keys, values)`` our cache returned. It takes the mask from the cache's slot positions (so
evicted, reordered or offloaded KV need no transformers mask), lets the method plan a decode
selection or compute a fresh prefill chunk's attention itself (``prefill_attention``: minference),
and calls the method hooks after the layer attended. Outside a kvsift forward (no active
:class:`ForwardContext`) it falls back to plain SDPA, so the model keeps working for others.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvsift.cache import SiftCache, SiftLayer
    from kvsift.methods.base import KVMethod, Run, Selection

ATTN_NAME = "kvsift"


@dataclass
class ForwardContext:
    """What one forward pass needs to know: the cache, the method and its run, the phase, and what
    methods may read about the tokens (typed fields, no free-form bag)."""

    cache: "SiftCache"
    method: "KVMethod"
    run: "Run"
    prefill_end: bool = False   # the last prefill chunk: methods compress after attending
    rereading: bool = False     # a reread pass (``method.reread_passes``): its KV is dropped afterwards
    reread_s: float = 0.0       # seconds this sequence's reread passes took (set before ``finish_prefill``)
    decoding: bool = False      # one new token per sequence
    has_padding: bool = False   # some slot or query position is -1
    step: int = 0               # decode step index (host-side: the engine plans steps)
    prompt_ids: list | None = None          # each row's prompt token ids (sentencekv segments them)
    tokenizer: Any = None
    input_ids: torch.Tensor | None = None   # (batch, q) token ids of the forward pass in flight
    next_pos: torch.Tensor | None = None    # (batch,) position of each row's next token after prefill
    row: tuple[int, int] | None = None      # prefill one sequence at a time: (row index, batch size)
    row_states: list | None = None          # ...then the batch cache's per-layer state dicts
    uniform_rows: bool = False              # ...and every row of the batch is as long (a codec may store each alone)
    rope: Any = None                        # rope(positions (batch, n), layer_idx) -> (cos, sin)
                                            # (batch, n, head_dim) fp32, see rope_function; None: no RoPE
    model_name: str | None = None           # ModelInfo.name of the model in use (per-model method data)


_CTX: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("kvsift_ctx", default=None)


def current_context() -> ForwardContext | None:
    return _CTX.get()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext):
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor | None,
           query_pos: torch.Tensor | None, scale: float, sliding_window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """Masked attention by positions, GQA without repeating KV.

    query ``(batch, q_heads, q, dim)``; keys/values ``(batch, kv_heads, n, dim)``; key_pos
    ``(batch, kv_heads, n)`` and query_pos ``(batch, q)`` integer positions (-1 = padding). A key
    is visible iff ``0 <= key_pos <= query_pos`` (and ``key_pos > query_pos - sliding_window``).
    ``key_pos=None`` means every key is visible (decode over a clean cache). Returns
    ``(batch, q_heads, q, dim)``.
    """
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    if key_pos is None and softcap is None and query.is_cuda:
        # unmasked decode on CUDA: SDPA's own GQA path stays at the HBM roofline, while folding the
        # group into the query length measured 8x slower at batch 1 (bench/gpu_kernels_notes.md)
        return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
    qf = query.reshape(b, hk, g * L, d)  # q head i uses kv head i // g
    mask = None
    if key_pos is not None:
        kp = key_pos[:, :, None, :]
        qp = query_pos[:, None, :, None]
        mask = (kp <= qp) & ((kp >= 0) | (qp < 0))  # padded queries see padded keys: no NaN
        if sliding_window is not None:
            mask &= kp > qp - sliding_window
        mask = mask[:, :, None].expand(b, hk, g, L, n).reshape(b, hk, g * L, n)
    if softcap is None:
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=scale)
    else:
        w = torch.matmul(qf, keys.transpose(-1, -2)) * scale
        w = torch.tanh(w / softcap) * softcap
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(w.float(), dim=-1).to(values.dtype), values)
    return out.reshape(b, hq, L, d)


def selected_attention(query: torch.Tensor, layer: "SiftLayer", sel: "Selection | None", query_pos: torch.Tensor,
                       scale: float, static: bool, sliding_window: int | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """One decode token per sequence over a :class:`~kvsift.methods.base.Selection` of the layer:
    the one function every decode mode and every method goes through.

    query ``(batch, q_heads, 1, dim)``; the layer's ``k_buf/v_buf (batch, kv_heads, capacity, dim)``
    and ``pos_buf (batch, kv_heads, capacity)``; ``static``: the whole buffer is in use (fixed
    shapes, device-side writes) rather than its first ``layer.length`` slots. The selection's own
    slots (or every slot) are read in place by the sparse decode kernel (Triton on CUDA, the
    PyTorch reference elsewhere), which itself skips slots whose position is -1, in the future or
    outside the sliding window; KV from elsewhere (``sel.extra``) is one more call, merged by
    log-sum-exp; a layer of compact per-head KV (``layer.ragged``, which holds the new tokens too)
    is one call, each head read up to its count; a quantized layer (``layer.quant``) is one call of
    ``quant_decode_attention`` over the selection's own slots (or every slot), which dequantizes
    what it reads (Triton on CUDA, the PyTorch reference block by block elsewhere).
    No host sync, no shape change. Returns ``(batch, q_heads, dim)``."""
    from kvsift.kernels.dispatch import merge_attention, quant_decode_attention, ragged_splits, sparse_decode_attention

    n = layer.k_buf.shape[2] if static else layer.length
    k_buf, v_buf, pos = layer.k_buf[:, :, :n], layer.v_buf[:, :, :n], layer.pos_buf[:, :, :n]
    qp = query_pos[:, -1]                                                  # (b,)
    own = sel.own if sel is not None else None
    page = sel.page if sel is not None else 1
    extras = [sel.extra] if sel is not None and sel.extra is not None else []
    z = layer.quant
    if softcap is not None:  # no kernel for soft-capped logits: masked attention over copies
        if layer.prefix is not None:
            extras.append(layer.prefix_source())
        if layer.ragged is not None:
            extras.append(layer.ragged.source())
        if z is not None:  # own slots name the quantized store's slots: dequantize them
            k_buf, v_buf, pos = z.dense(z.used(static))
        return _softcap_selected(query, k_buf, v_buf, pos, sel.own_slots() if sel is not None else None, extras, qp,
                                 scale, sliding_window, softcap)
    # the kernel masks by position itself (empty, padding, future, out-of-window slots, and slots
    # past the buffer): no index table is built or masked per layer. One call per KV set, merged
    # by log-sum-exp when there are several
    q = query[:, :, -1]
    calls = []                                                            # (keys, values, slots, kwargs)
    if n > 0 or (layer.ragged is None and z is None):
        calls.append((k_buf, v_buf, own, dict(key_pos=pos, query_pos=qp, window=sliding_window, page=page)))
    if layer.prefix is not None:  # a shared context: every slot, read in place (batch stride 0)
        pk, pv, pp = layer.prefix
        calls.append((pk, pv, None, dict(key_pos=pp, query_pos=qp, window=sliding_window)))
    for x in extras:
        calls.append((x.keys.to(q.dtype), x.values.to(q.dtype), x.read_slots,
                      dict(key_pos=x.positions, query_pos=qp, window=sliding_window)))
    if layer.ragged is not None:  # compact per-head KV (new tokens included): each head up to its count
        r = layer.ragged
        x = r.source()
        calls.append((x.keys, x.values, x.slots, dict(
            key_pos=x.positions, query_pos=qp, window=sliding_window, slot_count=r.counts,
            num_splits=ragged_splits(q, x.slots.shape[1], x.slots.shape[2], r.fill))))
    if z is not None:  # quantized KV (new tokens included), read through the own slots or whole
        own = sel.own_slots() if sel is not None else None                # slots (a page selection expanded)
        if not calls:
            return quant_decode_attention(q, query_pos=qp, slot_idx=own, scale=scale, group=z.group,
                                          window=sliding_window, **z.kernel_args(static))
        parts = [quant_decode_attention(q, query_pos=qp, slot_idx=own, scale=scale, group=z.group,
                                        window=sliding_window, return_lse=True, **z.kernel_args(static))]
        return merge_attention(parts + [sparse_decode_attention(q, k, v, slots, scale, return_lse=True, **kw)
                                        for k, v, slots, kw in calls])
    if len(calls) == 1:
        k, v, slots, kw = calls[0]
        return sparse_decode_attention(q, k, v, slots, scale, **kw)
    return merge_attention([sparse_decode_attention(q, k, v, slots, scale, return_lse=True, **kw)
                            for k, v, slots, kw in calls])


def _softcap_selected(query, k_buf, v_buf, pos, own, extras, qp, scale, window, softcap) -> torch.Tensor:
    """Soft-capped logits (no kernel): gather the selection and run masked attention."""
    keys, values, kpos = _union(k_buf, v_buf, pos, own, extras)
    return attend(query, keys, values, kpos, qp[:, None], scale, window, softcap)[:, :, 0]


def kvsift_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """The function transformers calls; returns ``(batch, q, q_heads, dim)`` and no weights."""
    ctx = _CTX.get()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx is None:  # not inside a kvsift forward: plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    layer = ctx.cache.layers[module.layer_idx]
    qpos = ctx.cache.step_positions
    method, run = ctx.method, ctx.run
    L = query.shape[2]
    if ctx.decoding:
        method.on_append(run, layer, ctx)
        sel = method.plan(run, layer, query, ctx)
        if sel is not None or ctx.cache.static or layer.ragged is not None or layer.quant is not None \
                or layer.prefix is not None:
            out = selected_attention(query, layer, sel, qpos, scale, ctx.cache.static, sliding_window, softcap)
            method.after_attend(run, layer, query, module, ctx)
            return out[:, None], None
        # eager, every used slot: masked attention over the buffer's views (no mask when every
        # cached key precedes the new token)
        plain = not ctx.has_padding and not layer.holes and sliding_window is None
        out = attend(query, key, value, None if plain else layer.positions, qpos, scale, sliding_window, softcap)
        method.after_attend(run, layer, query, module, ctx)
        return out.transpose(1, 2).contiguous(), None
    # prefill. Layers whose KV partly lives outside the device buffer (sentencekv's or shadowkv's host
    # store, a reused context) attend to the method's selection of it too. The three parts are named
    # ranges for the profiler (bench/profile_prefill.py); a prefill chunk's layer is heavy enough
    # that they cost nothing measurable
    with _span("kvsift.prefill.plan"):
        sel = method.plan(run, layer, query, ctx) if layer.offloaded else None
    if layer.offloaded and (sel is None or (sel.extra is None and not sel.blocks)):
        raise RuntimeError("this cache holds KV offloaded to the host by sentencekv or shadowkv (e.g. a reused "
                           "context): generate with a method spec that includes the method that offloaded it")
    extras = [sel.extra] if sel is not None and sel.extra is not None else []
    if layer.ragged is not None:
        extras.append(layer.ragged.source())
    if layer.prefix is not None:  # a shared context read by reference (gathered for the chunk)
        extras.append(layer.prefix_source())
    if layer.quant is not None:  # quantized KV (this chunk's tokens included)
        if sel is not None and sel.own is not None:
            raise RuntimeError("a prefill selection of own slots over quantized KV is not supported")
        if (not extras and sliding_window is None and softcap is None and chunk_in_window(layer.quant, L)
                and (not query.is_cuda or L <= QUANT_PREFILL_TOKENS)):
            # read in place: the earlier slots through the quantized attention, the chunk's own
            # tokens (full precision) causally, merged (no dequantized copy of the layer)
            with _span("kvsift.prefill.attend"):
                out = quant_prefill_attention(query, layer.quant, qpos, scale)
            with _span("kvsift.prefill.after_attend"):
                method.after_attend(run, layer, query, module, ctx)
            return out.transpose(1, 2).contiguous(), None
        extras.append(layer.quant.source())   # else a dequantized copy
    with _span("kvsift.prefill.attend"):
        out = _prefill_attend(method, run, layer, query, key, value, sel, extras, qpos, scale, module, ctx,
                              sliding_window, softcap, L)
    with _span("kvsift.prefill.after_attend"):
        method.after_attend(run, layer, query, module, ctx)
    return out.transpose(1, 2).contiguous(), None


def _span(name: str):
    """A named range for torch's profiler."""
    return torch.profiler.record_function(name)


def _prefill_attend(method, run, layer, query, key, value, sel, extras, qpos, scale, module, ctx, sliding_window,
                    softcap, L):
    """One prefill chunk's attention, ``(batch, q_heads, L, dim)``."""
    if sel is not None and sel.blocks:  # each block of query rows over its own retrieved KV
        own = sel.own_slots()
        ends = [s for s, _ in sel.blocks[1:]] + [L]
        outs = []
        for (s, src), e in zip(sel.blocks, ends):
            keys, values, kpos = _union(layer.keys, layer.values, layer.positions, own, [src] + extras)
            outs.append(_attend_blocks(query[:, :, s:e], keys, values, kpos, qpos[:, s:e], scale, sliding_window,
                                       softcap))
        return torch.cat(outs, 2)
    gathered = sel is not None or bool(extras)  # attend to copies of a selection, masked by position
    if gathered:
        own = sel.own_slots() if sel is not None else None
        keys, values, kpos = _union(layer.keys, layer.values, layer.positions, own, extras)
    else:
        keys, values, kpos = key, value, layer.positions
    simple = not gathered and not ctx.has_padding and not layer.holes and sliding_window is None and softcap is None
    # the method's own attention for the chunk (minference's sparse patterns), else dense below
    out = method.prefill_attention(run, layer, query, keys, values, scale, module, ctx) if simple else None
    if out is None and simple:
        # the chunk's tokens are the last L slots, in order, after every earlier kept token
        out = causal_chunk_attention(query, keys, values, scale)
    elif out is None:
        out = _attend_blocks(query, keys, values, kpos, qpos, scale, sliding_window, softcap)
    return out


# ---- dense attention of one prefill chunk ------------------------------------------------------------
CUDNN_MIN_PAIRS = 1 << 24
"""Query x key pairs (per head) from which a chunk's dense attention may go through cuDNN (CUDA)."""
CUDNN_MIN_QUERIES = 512
"""...and queries: for fewer, cuDNN was slower than flash (H200: 1.60 against 0.94 ms for 128
queries over 128k keys, ``bench/prefill_attention.py``)."""
CUDNN_ALIGN = 256
"""cuDNN plans a kernel for each new shape on its first call (40-110 ms measured on the H200,
``bench/prefill_attention.py``'s first-call column), then reuses it. Calls are kept to few shapes
so the plans are paid once per process: the queries are padded to a multiple of this, and only
chunks whose earlier keys are a multiple of it go through cuDNN (a prompt's chunks after its
first are; a question over a stored context of another length goes through flash)."""
_CUDNN_STATE = {"ok": None}   # None: not tried yet; False: a call failed here (never tried again)


def causal_chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Dense attention of a prefill chunk whose ``L`` queries are the last ``L`` of the ``n`` keys
    (a causal mask aligned to the bottom right). query ``(batch, q_heads, L, dim)``, keys/values
    ``(batch, kv_heads, n, dim)`` (GQA: q head ``h`` reads kv head ``h // (q_heads // kv_heads)``);
    returns ``(batch, q_heads, L, dim)``.

    On CUDA a large chunk (:data:`CUDNN_MIN_PAIRS`, :data:`CUDNN_MIN_QUERIES`, its earlier keys a
    multiple of :data:`CUDNN_ALIGN`) goes through cuDNN's fused attention: 1.8x the flash kernel's
    throughput at 128k on an H200 (``bench/prefill_attention.py``: 624 against 341 TFLOP/s).
    cuDNN takes only an unmasked or a square causal call, so a later chunk is two calls, its past
    keys unmasked and its own keys causal, merged by their log-sum-exps
    (:func:`split_chunk_attention`). Otherwise, with ``KVSIFT_PREFILL_CUDNN=0``, or once a cuDNN
    call failed here: one SDPA call with a bottom-right causal bias, which the flash kernel takes
    without materialising the ``(heads, L, n)`` mask (4 GiB at 128k for a 1,024-token chunk); on
    the CPU SDPA takes one ``(L, n)`` mask."""
    L, n = query.shape[2], keys.shape[2]
    if (query.is_cuda and L >= CUDNN_MIN_QUERIES and L * n >= CUDNN_MIN_PAIRS and (n - L) % CUDNN_ALIGN == 0
            and _cudnn_usable(query)):
        try:
            return split_chunk_attention(query, keys, values, scale, _cudnn_half, CUDNN_ALIGN)
        except RuntimeError as e:   # e.g. a cuDNN build without this fused attention: flash from now on
            import warnings

            _CUDNN_STATE["ok"] = False
            warnings.warn(f"kvsift: cuDNN prefill attention failed, using flash attention ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})", RuntimeWarning, stacklevel=2)
    if L == n:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(L, n), scale=scale,
                                          enable_gqa=True)


def prefill_attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which kernel a large dense prefill chunk of this device, dtype and head size goes through
    here: ``"cudnn"`` or ``"flash"`` (on CUDA; smaller chunks and questions over a stored context
    always take flash), ``"sdpa"`` elsewhere. Recorded with eval results."""
    if torch.device(device).type != "cuda":
        return "sdpa"
    probe = torch.empty(0, 0, 0, head_dim, dtype=dtype, device=device)
    return "cudnn" if _cudnn_usable(probe) else "flash"


def _cudnn_usable(query: torch.Tensor) -> bool:
    if _CUDNN_STATE["ok"] is False or os.environ.get("KVSIFT_PREFILL_CUDNN", "").strip().lower() in {"0", "off",
                                                                                                    "false", "no"}:
        return False
    if _CUDNN_STATE["ok"] is None:
        _CUDNN_STATE["ok"] = bool(torch.backends.cudnn.is_available()
                                  and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
                                  and torch.cuda.get_device_capability(query.device) >= (8, 0))
    return (_CUDNN_STATE["ok"] and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 128)


def _cudnn_half(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool, scale: float,
                lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cuDNN's fused attention (GQA without repeating KV), unmasked or square causal: ``(out (batch,
    q_heads, L, dim), its natural-log log-sum-exp (batch, q_heads, L) float32, or None)``."""
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(query, keys, values, None, lse, 0.0, causal, False,
                                                           scale=scale)
    return r[0], (r[1].reshape(query.shape[:3]).float() if lse else None)


def split_chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                          half, align: int = 1) -> torch.Tensor:
    """A chunk's bottom-right causal attention (shapes as :func:`causal_chunk_attention`) through
    ``half(query, keys, values, causal, scale, lse=True) -> (out, lse or None)``, a kernel that
    takes only unmasked or square causal calls: the ``n - L`` past keys unmasked, the chunk's own
    ``L`` keys square causal, the two outputs merged by their log-sum-exps (each weighted by its
    share of the softmax mass) in float32; a first chunk (``n == L``) is one causal call. The
    queries and the chunk's own keys are padded at the end to a multiple of ``align`` (exact: a
    real query's causal mask hides the padded keys after it; the padded rows are dropped)."""
    L, n = query.shape[2], keys.shape[2]
    pad = -L % align
    q, own_k, own_v = query, keys[:, :, n - L:], values[:, :, n - L:]
    if pad:
        q = F.pad(query, (0, 0, 0, pad))
        own_k, own_v = F.pad(own_k, (0, 0, 0, pad)), F.pad(own_v, (0, 0, 0, pad))
    if n == L:
        return half(q, own_k, own_v, True, scale, lse=False)[0][:, :, :L]
    o1, l1 = half(q, keys[:, :, :n - L], values[:, :, :n - L], False, scale)
    o2, l2 = half(q, own_k, own_v, True, scale)
    o1, l1, o2, l2 = o1[:, :, :L], l1[:, :, :L], o2[:, :, :L], l2[:, :, :L]
    lse = torch.logaddexp(l1, l2)
    out = o1.float().mul_((l1 - lse).exp_().unsqueeze(-1))
    out.addcmul_(o2.float(), (l2 - lse).exp_().unsqueeze(-1))
    return out.to(query.dtype)


MASK_ELEMENTS = 1 << 28  # the largest (batch, q_heads, queries, keys) mask one masked call builds
QUANT_PREFILL_ROWS = 64  # query rows (query heads x tokens) per KV head in one quantized-attention launch (CUDA)
# a longer chunk over quantized KV (on CUDA) goes through a dequantized copy: in place, each launch of
# QUANT_PREFILL_ROWS rows reads the whole layer again (a question's tokens are a few launches)
QUANT_PREFILL_TOKENS = 512


def chunk_in_window(quant, L: int) -> bool:
    """Whether a prefill chunk of ``L`` tokens just appended to ``quant`` lies in its full-precision
    window (the last ``L`` used slots), as appends keep it."""
    return L <= quant.length - quant.qtok


def quant_prefill_attention(query: torch.Tensor, quant, query_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """A prefill chunk's attention over a quantized layer, without a dequantized copy of it.

    query ``(batch, q_heads, L, dim)``, the chunk's ``L`` tokens being the last used slots of
    ``quant`` (:class:`~kvsift.cache.quant.QuantKV`, in its full-precision window:
    :func:`chunk_in_window`) at positions ``query_pos (batch, L)`` (-1: padding). Every slot at a
    position before a row's first chunk token is visible to all of that row's queries: those are read
    by the quantized decode attention (:func:`kvsift.kernels.dispatch.quant_decode_attention`, the
    chunk's tokens folded into its query heads, dequantized in registers on CUDA, block by block
    elsewhere); the chunk's own tokens attend to each other causally (:func:`attend_lse`); the two
    are merged by log-sum-exp. Returns ``(batch, q_heads, L, dim)`` in the query's dtype."""
    from kvsift.kernels import dispatch
    from kvsift.kernels.sparse_decode_attention import merge_attention

    b, hq, L, d = query.shape
    hk = quant.k_res.shape[1]
    g = hq // hk
    n, q0 = quant.length, quant.qtok
    r0 = n - L - q0                                      # the chunk's first window slot
    kc, vc = quant.k_res[:, :, r0 : r0 + L], quant.v_res[:, :, r0 : r0 + L]
    own = attend_lse(query, kc, vc, quant.positions[:, :, n - L : n], query_pos, scale)
    # the earlier slots: up to each row's first chunk position (exclusive)
    big = torch.iinfo(torch.int64).max
    first = torch.where(query_pos >= 0, query_pos.long(), big).amin(1)
    before = torch.where(first == big, -1, first - 1)                 # (batch,): a padded-only row sees none
    args = quant.kernel_args()
    args["k_codes"], args["v_codes"] = args["k_codes"][:, :, : n - L], args["v_codes"][:, :, : n - L]
    args["v_scale"], args["v_zero"] = args["v_scale"][:, :, : n - L], args["v_zero"][:, :, : n - L]
    args["key_pos"] = args["key_pos"][:, :, : n - L]
    # query head h*g + j, token l -> folded head (h*g + j) * L_blk + l of KV head h
    # tokens per launch: CUDA folds at most QUANT_PREFILL_ROWS query rows into a program; the
    # reference scores (batch, rows, 4096 slots) per block, kept within MASK_ELEMENTS
    step = max(1, QUANT_PREFILL_ROWS // g) if query.is_cuda else max(1, MASK_ELEMENTS // (b * hq * 4096))
    q5 = query.reshape(b, hk, g, L, d)
    outs, lses = [], []
    for s in range(0, L, step):
        e = min(L, s + step)
        qb = q5[:, :, :, s:e].reshape(b, hq * (e - s), d)
        o, lse = dispatch.quant_decode_attention(qb, query_pos=before, slot_idx=None, scale=scale,
                                                 group=quant.group, return_lse=True, **args)
        outs.append(o.view(b, hq, e - s, d))
        lses.append(lse.view(b, hq, e - s))
    earlier = (torch.cat(outs, 2), torch.cat(lses, 2))
    out = merge_attention([(earlier[0].reshape(b, hq * L, d), earlier[1].reshape(b, hq * L)),
                           (own[0].reshape(b, hq * L, d), own[1].reshape(b, hq * L))])
    return out.view(b, hq, L, d).to(query.dtype)


def attend_lse(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor,
               query_pos: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` (masked by positions, GQA without repeating KV) in fp32 with the natural-log
    log-sum-exp of each query's visible scores: ``(out (batch, q_heads, q, dim), lse (batch, q_heads,
    q))``; a query that sees no key gets zeros and ``-inf``. Queries go in blocks, so the scores stay
    within :data:`MASK_ELEMENTS` (for a prefill chunk over its own tokens)."""
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    g = hq // hk
    kf, vf = keys.float(), values.float()
    kp = key_pos[:, :, None, None, :]                                       # (b, hk, 1, 1, n)
    step = max(1, MASK_ELEMENTS // max(1, b * hq * n))
    outs, lses = [], []
    for s in range(0, L, step):
        e = min(L, s + step)
        q = query[:, :, s:e].float().reshape(b, hk, g, e - s, d)
        w = torch.einsum("bhgld,bhnd->bhgln", q, kf) * scale
        qp = query_pos[:, None, None, s:e, None]
        w = w.masked_fill(~((kp <= qp) & (kp >= 0)), float("-inf"))
        lse = torch.logsumexp(w, -1)                                        # (b, hk, g, l)
        p = torch.exp(w - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        outs.append(torch.einsum("bhgln,bhnd->bhgld", p, vf).reshape(b, hq, e - s, d))
        lses.append(lse.reshape(b, hq, e - s))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _attend_blocks(query, keys, values, kpos, qpos, scale, sliding_window, softcap) -> torch.Tensor:
    """:func:`attend` over blocks of queries, so the boolean mask (and the additive one SDPA makes of
    it) stays within :data:`MASK_ELEMENTS` whatever the chunk and the gathered KV: a prefill chunk
    over a long reused context, or over the chunks sentencekv fetched for it. Same result."""
    b, hq, L, _ = query.shape
    step = max(1, MASK_ELEMENTS // max(1, b * hq * keys.shape[2]))
    if step >= L:
        return attend(query, keys, values, kpos, qpos, scale, sliding_window, softcap)
    return torch.cat([attend(query[:, :, s:s + step], keys, values, kpos, qpos[:, s:s + step], scale,
                             sliding_window, softcap) for s in range(0, L, step)], 2)


def _union(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, own: torch.Tensor | None,
           extras: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, values, positions)`` copies of a selection over buffers ``(batch, kv_heads, n, ...)``:
    the own slots (every slot when None; slots past ``n`` or negative dropped, position -1), then
    each extra :class:`~kvsift.methods.base.SlotSource`; for masked attention without the kernel
    (a prefill chunk, soft-capped logits)."""
    from kvsift.methods.base import SlotSource

    if own is not None:
        own = torch.where(own < positions.shape[2], own, -1)
        keys, values, positions = SlotSource(keys, values, positions, own).gather()
    if not extras:
        return keys, values, positions
    gathered = [x.gather() for x in extras]
    return (torch.cat([keys] + [g[0].to(keys.dtype) for g in gathered], 2),
            torch.cat([values] + [g[1].to(values.dtype) for g in gathered], 2),
            torch.cat([positions] + [g[2].to(positions.dtype) for g in gathered], 2))


def rope_function(model: torch.nn.Module):
    """The model's rotary embedding as ``rope(positions (batch, n), layer_idx) -> (cos, sin)``, each
    ``(batch, n, head_dim)`` fp32, exactly what the model applies (``q * cos + rotate_half(q) * sin``,
    ``attention_scaling`` included), for methods that move queries between positions (e.g.
    ``expected_attention``). None when the model has no module named ``rotary_emb``."""
    import inspect

    found = [(n.count("."), n, m) for n, m in model.named_modules() if n.split(".")[-1] == "rotary_emb"]
    if not found:
        return None
    emb = min(found, key=lambda t: t[:2])[2]
    types = getattr(getattr(emb, "config", None), "layer_types", None)
    by_type = "layer_type" in inspect.signature(emb.forward).parameters  # gemma3: one per attention type

    def rope(positions: torch.Tensor, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(0, dtype=torch.float32, device=positions.device)
        args = (types[layer_idx],) if by_type and types else ()
        return emb(x, positions.long(), *args)

    return rope


def register_attention() -> None:
    """Add ``"kvsift"`` to transformers' attention registry (adds a name; patches nothing)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, kvsift_attention)


@contextlib.contextmanager
def use_kvsift_attention(model: torch.nn.Module, configs: list | None = None):
    """Switch ``model`` to kvsift attention for the duration of the block; restored in ``finally``.
    ``configs``: the model's configs (``model_configs(model)``), to skip the module walk per step."""
    register_attention()
    saved = [(c, c._attn_implementation) for c in (configs if configs is not None else model_configs(model))]
    try:
        for c, _ in saved:
            c._attn_implementation = ATTN_NAME
        yield model
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def model_configs(model) -> list:
    """The distinct config objects of ``model``'s modules (text models may nest sub-configs)."""
    out = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            out[id(c)] = c
    return list(out.values())
