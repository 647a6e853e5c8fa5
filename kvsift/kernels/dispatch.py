"""Pick the Triton kernel or the PyTorch reference for each call.

Triton runs when every tensor argument is on CUDA, ``import triton`` works, and
``KVSIFT_NO_TRITON`` is not set; otherwise the reference runs (so CPU paths always work). The
functions here have the same signatures as the kernels they pick from.

A Quest-style decode step over uniform pages is four launches on CUDA::

    scores = chunk_scores(q, (kmin, kmax), "max")              # (b, kv_heads, n_pages) fp32
    pages = select_chunks(scores, page, budget)                 # (b, kv_heads, budget // page) int64
    out = sparse_decode_attention(q, k_buf, v_buf, pages, scale, page=page)   # split + merge
"""

from __future__ import annotations

import torch

from kvsift.kernels import attention_received as _ar
from kvsift.kernels import budget_select as _bs
from kvsift.kernels import quant_decode_attention as _qda
from kvsift.kernels import quantize_kv as _qkv
from kvsift.kernels import chunk_scores as _cs
from kvsift.kernels import kv_append as _kva
from kvsift.kernels import page_bounds as _pb
from kvsift.kernels import rmsnorm as _rms
from kvsift.kernels import rope as _rope
from kvsift.kernels import sparse_decode_attention as _sda
from kvsift.kernels import slot_scores as _ss
from kvsift.kernels import sparse_prefill_attention as _spa
from kvsift.kernels import token_votes as _tv
from kvsift.kernels import topk_select as _tk
from kvsift.kernels import topk_radix as _tr
from kvsift.kernels._triton import HAS_TRITON, triton_disabled
from kvsift.kernels.chunk_scores import chunks_to_slots, page_summaries
from kvsift.kernels.sparse_decode_attention import merge_attention

__all__ = ["use_triton", "chunk_scores", "topk_select", "budget_select", "select_chunks", "sparse_decode_attention",
           "chunks_to_slots", "page_summaries", "selected_decode_attention", "merge_attention", "page_bounds_append",
           "quant_decode_attention", "quantize_kv", "sparse_prefill_attention", "rmsnorm", "rope",
           "attention_received", "token_votes", "slot_scores", "kv_append"]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels will run for these tensors."""
    if not HAS_TRITON or triton_disabled():
        return False
    return all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def chunk_scores(query: torch.Tensor, summaries, reduce: str = "mean", scale: torch.Tensor | None = None,
                 limit: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.chunk_scores.chunk_scores_ref`: ``(batch, kv_heads, n_chunks)``
    float32, ``-inf`` at chunks past ``limit`` or not ``valid``."""
    parts = tuple(summaries) if isinstance(summaries, (tuple, list)) else (summaries,)
    masks = [t for t in (limit, valid) if t is not None]
    if use_triton(query, *parts, *masks):
        return _cs.chunk_scores(query, summaries, reduce, scale, limit, valid)
    return _cs.chunk_scores_ref(query, summaries, reduce, scale, limit, valid)


def topk_select(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32,
                skip: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.topk_select.topk_select_ref`: ``(batch, kv_heads, k)`` indices
    (``k + 1`` with ``tail (batch,)``, its last column, written by the kernel's own launch).
    ``skip (batch,)`` bool: rows whose result the caller will not use; the kernels return at once
    for them, leaving them as they were in ``out`` (written in place when given; every path keeps
    the ``skip`` rows of ``out``), unspecified without it."""
    if use_triton(scores, *(t for t in (skip, tail, out) if t is not None)):
        n = scores.shape[-1]
        if _tk.TUNING["radix_min_n"] and n >= _tk.TUNING["radix_min_n"]:   # many programs per row
            return _tr.topk_select_radix(scores, k, dtype, skip, tail, out)
        blk = _tk.TUNING["block_from"]
        if (blk and max(2 * blk, _tk.TUNING["block_min_n"] or 0) <= n <= _tk.MAX_N
                and _tk.blocked_fits(n, k, blk)):   # more programs per row
            return _tk.topk_select_blocked(scores, k, dtype, skip, out, blk, tail)
        if n <= _tk.MAX_N:
            return _tk.topk_select(scores, k, dtype, skip, tail, out)
        if _tk.blocked_fits(n, k):   # longer rows: blocks of MAX_N, a level more where their candidates
            return _tk.topk_select_blocked(scores, k, dtype, skip, out, tail=tail)   # exceed MAX_N
        # k too large for blocks of MAX_N to shrink the row: torch.topk and a sort
        return _tk.into(_tk.with_tail(_tk.topk_select_long(scores, k, dtype), tail), skip, out)
    return _tk.topk_select_ref(scores, k, dtype, skip, tail, out)


def kv_append(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, slot: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
    """See :func:`kvsift.kernels.kv_append.kv_append_ref`: a static decode step's key, value and
    position written at the device ``slot (1,)``, which then advances; in place."""
    if (_kva.TUNING["triton"] and use_triton(k_buf, v_buf, pos_buf, slot, key, value, positions)
            and key.dtype == k_buf.dtype
            and value.dtype == v_buf.dtype and all(t.stride(-1) == 1 for t in (k_buf, v_buf, key, value))):
        return _kva.kv_append(k_buf, v_buf, pos_buf, slot, key, value, positions)
    return _kva.kv_append_ref(k_buf, v_buf, pos_buf, slot, key, value, positions)


def token_votes(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, limit: torch.Tensor,
                vote: str = "group", fill: float = -1.0, skip: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.token_votes.token_votes_ref`: TokenSelect's soft votes ``(batch,
    kv_heads, n)`` float32 (``fill`` at non-candidates; rows with ``skip`` unspecified)."""
    tensors = [t for t in (q, keys, key_pos, limit, skip) if t is not None]
    if use_triton(*tensors) and keys.stride(-1) == 1 and q.dtype == keys.dtype:
        return _tv.token_votes(q, keys, key_pos, limit, vote, fill, skip)
    return _tv.token_votes_ref(q, keys, key_pos, limit, vote, fill, skip)


def slot_scores(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, slots: torch.Tensor,
                reduce: str = "max", page: int = 1) -> torch.Tensor:
    """See :func:`kvsift.kernels.slot_scores.slot_scores_ref`: the exact ``q . k`` at ``slots
    (batch, kv_heads, n)`` (page indices with ``page > 1``: ``n = m * page`` candidates), reduced
    over each GQA group, ``(batch, kv_heads, n)`` float32 (``-inf`` at invalid slots)."""
    if use_triton(q, keys, key_pos, slots) and keys.stride(-1) == 1 and q.dtype == keys.dtype:
        return _ss.slot_scores(q, keys, key_pos, slots, reduce, page)
    return _ss.slot_scores_ref(q, keys, key_pos, slots, reduce, page)


def pick_slots(at: torch.Tensor, cand: torch.Tensor, page: int = 1, tail: torch.Tensor | None = None,
               cap: int | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.slot_scores.pick_slots_ref`: the slots of the candidates ``at``
    points to (then the ``tail`` page's slots), ``(batch, kv_heads, k [+ page])`` int64."""
    if use_triton(*(t for t in (at, cand, tail) if t is not None)):
        return _ss.pick_slots(at, cand, page, tail, cap)
    return _ss.pick_slots_ref(at, cand, page, tail, cap)


def query_reuse(q: torch.Tensor, last_q: torch.Tensor, threshold: float, counts: torch.Tensor) -> torch.Tensor:
    """See :func:`kvsift.kernels.token_votes.query_reuse_ref`: TokenSelect's selection-cache
    decision ``(batch,)`` bool; ``last_q`` becomes ``q`` and ``counts (2,)`` advances, in place."""
    if use_triton(q, last_q, counts):
        return _tv.query_reuse(q, last_q, threshold, counts)
    return _tv.query_reuse_ref(q, last_q, threshold, counts)


def budget_select(scores: torch.Tensor, lens: torch.Tensor, budget: int, k: int) -> torch.Tensor:
    """See :func:`kvsift.kernels.budget_select.budget_select_ref`: ``(batch, kv_heads, k)`` int64."""
    if use_triton(scores, lens) and scores.shape[-1] <= _bs.MAX_N:
        return _bs.budget_select(scores, lens, budget, k)
    return _bs.budget_select_ref(scores, lens, budget, k)


def page_bounds_append(kmin: torch.Tensor, kmax: torch.Tensor, filled: torch.Tensor, k_buf: torch.Tensor,
                       slot: torch.Tensor, page: int, inv: torch.Tensor | None = None) -> None:
    """See :mod:`kvsift.kernels.page_bounds`: fold the key at ``slot`` into its page's bounds, in place
    (int8 bounds with their inverse scale ``inv``)."""
    if (use_triton(kmin, kmax, filled, k_buf, slot) and k_buf.stride(3) == 1 and kmin.stride(3) == 1
            and kmax.stride(3) == 1):
        return _pb.page_bounds_append(kmin, kmax, filled, k_buf, slot, page, inv)
    return _pb.page_bounds_append_ref(kmin, kmax, filled, k_buf, slot, page, inv)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See :mod:`kvsift.kernels.rmsnorm`: Llama-family RMSNorm, one launch on CUDA."""
    if use_triton(x, weight) and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.is_contiguous():
        return _rms.rmsnorm(x, weight, eps)
    return _rms.rmsnorm_ref(x, weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See :mod:`kvsift.kernels.rope`: rotary embedding of queries and keys, one launch each on CUDA."""
    if (use_triton(q, k, cos, sin) and len({q.dtype, k.dtype, cos.dtype, sin.dtype}) == 1
            and all(t.stride(-1) == 1 for t in (q, k, cos, sin))):
        return _rope.rope(q, k, cos, sin)
    return _rope.rope_ref(q, k, cos, sin)


def select_chunks(scores: torch.Tensor, chunk_lens, budget: int, max_chunks: int | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.chunk_scores.select_chunks` (uniform pages use :func:`topk_select`,
    variable lengths :func:`budget_select`)."""
    return _cs.select_chunks(scores, chunk_lens, budget, max_chunks, topk=topk_select, budget_fn=budget_select)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_idx: torch.Tensor | None, scale: float, page: int = 1,
                            num_splits: int | None = None, return_lse: bool = False,
                            key_pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
                            window: int | None = None, slot_count: torch.Tensor | None = None):
    """See :func:`kvsift.kernels.sparse_decode_attention.sparse_decode_attention_ref`:
    ``(batch, q_heads, head_dim)`` (and the ``(batch, q_heads)`` log-sum-exp with ``return_lse``)."""
    kw = dict(num_splits=num_splits, return_lse=return_lse, key_pos=key_pos, query_pos=query_pos, window=window,
              slot_count=slot_count)
    tensors = [t for t in (q, k_cache, v_cache, slot_idx, key_pos, query_pos, slot_count) if t is not None]
    if (use_triton(*tensors) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and q.dtype == k_cache.dtype == v_cache.dtype):
        return _sda.sparse_decode_attention(q, k_cache, v_cache, slot_idx, scale, page, **kw)
    return _sda.sparse_decode_attention_ref(q, k_cache, v_cache, slot_idx, scale, page, **kw)


def quant_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                           v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                           k_res: torch.Tensor, v_res: torch.Tensor, res_start: torch.Tensor,
                           key_pos: torch.Tensor, query_pos: torch.Tensor, slot_idx: torch.Tensor | None,
                           scale: float, group: int, window: int | None = None,
                           slot_count: torch.Tensor | None = None, num_splits: int | None = None,
                           return_lse: bool = False):
    """See :func:`kvsift.kernels.quant_decode_attention.quant_decode_attention_ref` (decode attention
    over quantized KV, dequantized while read): ``(batch, q_heads, head_dim)`` (and the log-sum-exp
    with ``return_lse``)."""
    kv = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)
    args = (q, *kv, res_start, key_pos, query_pos, slot_idx, scale, group)
    kw = dict(window=window, slot_count=slot_count, num_splits=num_splits, return_lse=return_lse)
    tensors = [t for t in (q, *kv, res_start, key_pos, query_pos, slot_idx, slot_count) if t is not None]
    if (use_triton(*tensors) and all(t.stride(-1) == 1 for t in kv) and k_scale.stride() == k_zero.stride()
            and v_scale.stride() == v_zero.stride() and k_res.dtype == v_res.dtype == q.dtype):
        return _qda.quant_decode_attention(*args, **kw)
    return _qda.quant_decode_attention_ref(*args, **kw)


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bits: int, group: int):
    """See :mod:`kvsift.kernels.quantize_kv`: KV slots into KIVI's codes and fp16 scales, ``(k_codes,
    k_scale, k_zero, v_codes, v_scale, v_zero)``, the same bits from the kernel and the reference."""
    d = keys.shape[-1]   # (the value group, min(group, head_dim), is then a power of two too)
    if (use_triton(keys, values, positions) and d & (d - 1) == 0 and group & (group - 1) == 0
            and keys.stride(-1) == 1 and values.stride(-1) == 1 and group <= 1024):
        return _qkv.quantize_kv(keys, values, positions, bits, group)
    return _qkv.quantize_kv_ref(keys, values, positions, bits, group)


def sparse_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                             cols: torch.Tensor | None, scale: float, block: int = 64) -> torch.Tensor:
    """See :func:`kvsift.kernels.sparse_prefill_attention.sparse_prefill_attention_ref`: one prefill
    chunk's attention over selected key blocks and columns, ``(batch, q_heads, L, head_dim)``."""
    tensors = [t for t in (q, k, v, block_idx, cols) if t is not None]
    if (use_triton(*tensors) and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and q.dtype == k.dtype == v.dtype):
        return _spa.sparse_prefill_attention(q, k, v, block_idx, cols, scale, block)
    return _spa.sparse_prefill_attention_ref(q, k, v, block_idx, cols, scale, block)


def attention_received(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                       scale: float, sliding_window: int | None = None, reduce: str = "sum", head_reduce: str = "mean",
                       n_out: int | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """See :func:`kvsift.kernels.attention_received.attention_received_ref`: the softmax attention
    each key receives, reduced over the queries and each KV group's q heads, ``(batch, kv_heads,
    n_out or n)`` float32 (``max_bytes`` bounds the reference's blocks of weights)."""
    if (use_triton(query, keys, key_pos, query_pos) and query.dtype == keys.dtype and query.dtype in _ar.DTYPES
            and query.shape[-1] <= _ar.MAX_DIM and not key_pos.is_floating_point()
            and not query_pos.is_floating_point()):
        return _ar.attention_received(query, keys, key_pos, query_pos, scale, sliding_window, reduce, head_reduce,
                                      n_out)
    return _ar.attention_received_ref(query, keys, key_pos, query_pos, scale, sliding_window, reduce, head_reduce,
                                      n_out, max_bytes)


def ragged_splits(q: torch.Tensor, kv_heads: int, width: int, fill: float) -> int | None:
    """Splits per head for a slot table of ``width`` columns that is only ``fill`` full (counts
    bounding each head): as many programs doing real work as a dense table of the same tokens
    would get, so the few long heads do not run on a few multiprocessors while the short heads'
    programs exit at once. ``q``: the query (its batch and device). None where the reference runs."""
    if not use_triton(q):
        return None
    batch, device = q.shape[0], q.device
    from kvsift.kernels.sparse_decode_attention import TUNING, plan_splits

    block_s = TUNING["block_s"]
    dense, _ = plan_splits(batch, kv_heads, max(1, int(width * fill)), block_s, device)
    full, _ = plan_splits(batch, kv_heads, width, block_s, device, num_splits=1 << 30)
    return max(1, min(full, round(dense / max(fill, 1e-3))))


def selected_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries,
                              page: int, budget: int, scale: float, reduce: str = "max") -> torch.Tensor:
    """Quest-style decode step over uniform pages: score pages, keep the best ``budget // page``
    per KV head, attend to their slots. q ``(batch, q_heads, head_dim)``; caches ``(batch,
    kv_heads, capacity, head_dim)`` whose first ``n_pages * page`` slots the summaries
    ``(batch, kv_heads, n_pages, head_dim)`` (or a (kmin, kmax) pair) describe. Returns
    ``(batch, q_heads, head_dim)``."""
    scores = chunk_scores(q, summaries, reduce)
    pages = select_chunks(scores, page, budget)
    return sparse_decode_attention(q, k_cache, v_cache, pages, scale, page=page)
