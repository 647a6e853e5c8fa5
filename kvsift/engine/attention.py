"""kvsift's attention function, registered with transformers' ``AttentionInterface`` as ``"kvsift"``.

Transformers models call it with post-RoPE ``query (batch, q_heads, q, head_dim)`` and the
``(keys, values)`` our cache returned. It takes the mask from the cache's slot positions (so
evicted, reordered or offloaded KV need no transformers mask), lets the method plan a decode
selection, and calls the method hooks after the layer attended. Outside a kvsift forward (no active
:class:`ForwardContext`) it falls back to plain SDPA, so the model keeps working for others.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvsift.cache import SiftCache
    from kvsift.methods.base import KVMethod

ATTN_NAME = "kvsift"


@dataclass
class ForwardContext:
    """What one forward pass needs to know: the cache, the method, and the phase."""

    cache: "SiftCache"
    method: "KVMethod"
    prefill_end: bool = False   # the last prefill chunk: methods compress after attending
    decoding: bool = False      # one new token per sequence
    has_padding: bool = False   # some slot or query position is -1
    info: dict[str, Any] = field(default_factory=dict)


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


def static_decode_attention(query: torch.Tensor, layer, sel, query_pos: torch.Tensor, scale: float,
                            sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One decode token over the layer's whole buffer (static decode), plus a method's
    :class:`~kvsift.methods.base.SlotSelection` if any, without host syncs or shape changes.

    query ``(batch, q_heads, 1, dim)``; the layer's ``k_buf/v_buf (batch, kv_heads, capacity, dim)``
    and ``pos_buf (batch, kv_heads, capacity)``: slots with position -1 (empty, padding) or outside
    the sliding window are skipped through the index table given to the sparse decode kernel
    (Triton on CUDA, the PyTorch reference elsewhere); a selection is attended by a second call and
    merged by log-sum-exp. Returns ``(batch, q_heads, dim)``."""
    from kvsift.kernels.dispatch import merge_attention, sparse_decode_attention

    pos = layer.pos_buf
    qp = query_pos[:, -1][:, None, None]                                   # (b, 1, 1)
    valid = (pos >= 0) & (pos <= qp)
    if sliding_window is not None:
        valid &= pos > qp - sliding_window
        if sel is not None:
            sel = sel.within(query_pos[:, -1], sliding_window)
    if softcap is not None:  # no kernel for soft-capped logits: masked attention over copies
        keys, values, kpos = layer.k_buf, layer.v_buf, torch.where(valid, 0, -1).to(torch.int32)
        if sel is not None:
            sk, sv, sp = sel.gather()
            keys, values = torch.cat([keys, sk.to(keys.dtype)], 2), torch.cat([values, sv.to(values.dtype)], 2)
            kpos = torch.cat([kpos, sp], 2)
        return attend(query, keys, values, kpos, torch.zeros_like(query_pos[:, -1:]), scale, None, softcap)[:, :, 0]
    ar = torch.arange(pos.shape[-1], device=pos.device, dtype=torch.int32)
    slots = torch.where(valid, ar, -1)                                    # (b, kv_heads, capacity)
    q = query[:, :, -1]
    if sel is None:
        return sparse_decode_attention(q, layer.k_buf, layer.v_buf, slots, scale)
    own = sparse_decode_attention(q, layer.k_buf, layer.v_buf, slots, scale, return_lse=True)
    k, v = sel.keys.to(q.dtype), sel.values.to(q.dtype)
    return merge_attention([own, sparse_decode_attention(q, k, v, sel.slots, scale, return_lse=True)])


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
    if ctx.cache.static:  # fixed buffers, device-side writes (CUDA-graph safe)
        sel = ctx.method.plan(layer, query, ctx)
        out = static_decode_attention(query, layer, sel, qpos, scale, sliding_window, softcap)
        ctx.method.after_attend(layer, query, module, ctx)
        return out[:, None], None
    # layers whose KV partly lives outside the device buffer (sentencekv's host store, e.g. a reused
    # context) need the method's selection during prefill too
    sel = ctx.method.plan(layer, query, ctx) if ctx.decoding or layer.state.get("plan_prefill") else None
    if sel is None and layer.state.get("plan_prefill"):
        raise RuntimeError("this cache holds KV offloaded by sentencekv (e.g. a reused context): generate with "
                           "a method spec that includes sentencekv")
    if sel is not None:
        keys, values, kpos = sel
    else:
        keys, values, kpos = key, value, layer.positions
    L = query.shape[2]
    if ctx.decoding and not ctx.has_padding and sliding_window is None and sel is None:
        kpos = None  # every cached key precedes the new token: no mask needed
    elif sel is None and not ctx.has_padding and L == keys.shape[2] and sliding_window is None and softcap is None:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        ctx.method.after_attend(layer, query, module, ctx)
        return out.transpose(1, 2).contiguous(), None
    elif (sel is None and not ctx.has_padding and query.is_cuda and sliding_window is None and softcap is None
          and not ctx.decoding):
        # a later prefill chunk on CUDA: the chunk's tokens are the last L slots, in order, after every
        # earlier kept token, so the mask is causal aligned to the bottom right; flash attention does
        # that without the (kv_heads, group * L, n) boolean mask (4 GiB at 128k for a 1024 chunk)
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(L, keys.shape[2]),
                                             scale=scale, enable_gqa=True)
        ctx.method.after_attend(layer, query, module, ctx)
        return out.transpose(1, 2).contiguous(), None
    out = attend(query, keys, values, kpos, qpos, scale, sliding_window, softcap)
    ctx.method.after_attend(layer, query, module, ctx)
    return out.transpose(1, 2).contiguous(), None


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
