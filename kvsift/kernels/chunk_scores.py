"""Score one decode query against per-chunk (or per-page) key summaries, GQA-aware.

Two kinds of summary:

* mean keys ``(batch, kv_heads, n_chunks, head_dim)``: score = ``q . mean_k`` (SentenceKV-style);
* Quest bounds ``(kmin, kmax)``, two tensors of that shape: score =
  ``sum_d max(q_d * kmin_d, q_d * kmax_d)``, an upper bound of ``q . k`` over the page's keys;
* Quest bounds as int8 (:func:`int8_bounds`): ``(kmin, kmax)`` int8 codes plus ``scale (batch,
  kv_heads, 1, head_dim)`` float32, a power of two per channel; the bounds are ``code * scale``,
  rounded outward, so the score is still an upper bound, and half the bytes of fp16 bounds are read.

The ``group = q_heads // kv_heads`` query heads that share a KV head are reduced to one score per
KV head (``"mean"`` or ``"max"``), because selection is per KV head: every query head of a group
attends to the same selected slots.

``chunk_scores_ref`` is pure PyTorch; ``chunk_scores`` is the Triton kernel (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``); both take the same arguments and return ``(batch, kv_heads,
n_chunks)`` float32. ``kvsift.kernels.dispatch.chunk_scores`` picks one.

``select_chunks`` / ``chunks_to_slots`` turn scores into a slot-index table for
``sparse_decode_attention`` under a token budget (plain PyTorch, no host synchronisation).
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, pdl_launch, pdl_start, tl, triton
from kvsift.kernels.topk_select import topk_select_ref

Summaries = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
# launch settings of the Triton kernel (bench/gpu_decode.py --tune sweeps them); int8 bounds read
# half the bytes per page, so they have a block size of their own (``block_n_int8``)
TUNING = {"dot": True, "block_n": 128, "block_n_int8": 256, "num_warps": 4}
REDUCES = ("mean", "max")


def _check(query: torch.Tensor, summaries: Summaries, reduce: str,
           scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate arguments; returns ``(lo, hi)`` where ``hi`` is None for mean-key summaries."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if isinstance(summaries, (tuple, list)):
        if len(summaries) != 2:
            raise ValueError(f"Quest summaries are a pair (kmin, kmax), got {len(summaries)} tensors")
        lo, hi = summaries
        if lo.shape != hi.shape:
            raise ValueError(f"kmin and kmax must have the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
        if lo.device != hi.device or lo.dtype != hi.dtype:
            raise ValueError("kmin and kmax must share device and dtype")
    elif isinstance(summaries, torch.Tensor):
        lo, hi = summaries, None
    else:
        raise TypeError(f"summaries must be a tensor or a (kmin, kmax) pair, got {type(summaries).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must be (batch, q_heads, head_dim), got shape {tuple(query.shape)}")
    if lo.dim() != 4:
        raise ValueError(f"summaries must be (batch, kv_heads, n_chunks, head_dim), got shape {tuple(lo.shape)}")
    b, hq, d = query.shape
    if lo.shape[0] != b or lo.shape[3] != d:
        raise ValueError(f"query {tuple(query.shape)} and summaries {tuple(lo.shape)} disagree on batch or head_dim")
    hk = lo.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads ({hk})")
    if lo.device != query.device:
        raise ValueError(f"query on {query.device} but summaries on {lo.device}")
    if scale is not None:
        if hi is None or lo.dtype != torch.int8:
            raise TypeError("a scale goes with int8 Quest bounds (kmin, kmax), see int8_bounds")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (b, hk, 1, d) or scale.device != lo.device:
            raise ValueError(f"scale must be float32 (batch, kv_heads, 1, head_dim) = {(b, hk, 1, d)} on the "
                             f"summaries' device, got {scale.dtype} {tuple(scale.shape)}")
        if not query.is_floating_point():
            raise TypeError("query must be floating point")
        return lo, hi
    if not (query.is_floating_point() and lo.is_floating_point()):
        raise TypeError("query and summaries must be floating point (int8 bounds take a scale)")
    return lo, hi


def int8_bounds(kmin: torch.Tensor, kmax: torch.Tensor, valid: torch.Tensor | None = None):
    """Quest bounds ``(batch, kv_heads, n_pages, head_dim)`` as int8 codes, rounded outward.

    Each channel of each (row, KV head) gets one scale, the power of two that puts the largest
    magnitude among the ``valid (batch, kv_heads, n_pages)`` pages' bounds (all pages if None) at
    most 127 codes from 0. ``kmin`` rounds down and ``kmax`` up: ``code * scale`` still bounds the
    page's keys, exactly (division by a power of two is exact), so a page's score stays an upper
    bound, a little looser. Returns ``(lo, hi, scale, inv)``: int8 codes, and the float32 scale
    ``(batch, kv_heads, 1, head_dim)`` and its inverse (also exact)."""
    lo, hi = kmin.float(), kmax.float()
    mag = torch.maximum(lo.abs(), hi.abs())
    if valid is not None:
        mag = torch.where(valid[..., None], mag, 0.0)
    amax = mag.amax(2, keepdim=True).clamp_min(2.0 ** -100)                   # (b, h, 1, d)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 127.0)))
    inv = 1.0 / scale
    return (quantize_bound(lo, inv, down=True), quantize_bound(hi, inv, down=False), scale, inv)


def quantize_bound(x: torch.Tensor, inv: torch.Tensor, down: bool) -> torch.Tensor:
    """``x`` (float) times the power-of-two ``inv``, rounded down (a minimum) or up (a maximum),
    clamped to [-127, 127], as int8."""
    y = x.float() * inv
    y = torch.floor(y) if down else torch.ceil(y)
    return y.clamp(-127, 127).to(torch.int8)


def key_bounds(k: torch.Tensor, dtype: torch.dtype, inv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A key ``k (..., head_dim)`` as the ``(low, high)`` it folds into page bounds of ``dtype``:
    itself in that dtype twice, or (int8 bounds, ``inv`` their inverse scale) its codes rounded
    down and up (:func:`quantize_bound`)."""
    if inv is None:
        k = k.to(dtype)
        return k, k
    return quantize_bound(k, inv, down=True), quantize_bound(k, inv, down=False)


def _check_masks(lo: torch.Tensor, limit: torch.Tensor | None, valid: torch.Tensor | None) -> None:
    b, hk, n = lo.shape[:3]
    if limit is not None and (tuple(limit.shape) != (b,) or limit.is_floating_point() or limit.device != lo.device):
        raise ValueError(f"limit must be integers of shape (batch,) = ({b},) on the summaries' device")
    if valid is not None and (tuple(valid.shape) != (b, hk, n) or valid.dtype != torch.bool or valid.device != lo.device):
        raise ValueError(f"valid must be a bool tensor of shape (batch, kv_heads, n_chunks) = {(b, hk, n)}")


def chunk_scores_ref(query: torch.Tensor, summaries: Summaries, reduce: str = "mean",
                     scale: torch.Tensor | None = None, limit: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (PyTorch, float32 math).

    query ``(batch, q_heads, head_dim)``; summaries ``(batch, kv_heads, n_chunks, head_dim)`` mean
    keys, or a ``(kmin, kmax)`` pair of that shape (int8 codes with ``scale (batch, kv_heads, 1,
    head_dim)``, see :func:`int8_bounds`). Returns ``(batch, kv_heads, n_chunks)`` float32.
    Candidates only (the others score ``-inf``, never selected): with ``limit (batch,)``, chunks
    ``c < limit[b]`` (Quest: the complete pages), with ``valid (batch, kv_heads, n_chunks)`` bool,
    the chunks it marks (Quest: pages holding a token). The kernel applies both in the same launch.
    """
    lo, hi = _check(query, summaries, reduce, scale)
    _check_masks(lo, limit, valid)
    out = _scores_ref(query, lo, hi, reduce, scale)
    if limit is not None:
        out = out.masked_fill(torch.arange(out.shape[-1], device=out.device) >= limit[:, None, None], float("-inf"))
    if valid is not None:
        out = out.masked_fill(~valid, float("-inf"))
    return out


def _scores_ref(query, lo, hi, reduce, scale):
    b, hq, d = query.shape
    hk = lo.shape[1]
    q = query.float().reshape(b, hk, hq // hk, d)                 # (b, hk, g, d)
    if scale is not None:   # the scale folded into the query: the codes are the bounds
        q = q * scale
    # one (g, d) x (d, n) product per (batch, kv head): the summaries are read once, never expanded
    # over the group's heads (broadcasting a (b, hk, 1, d, n) operand copies it g times)
    if hi is None:
        s = torch.matmul(q, lo.float().transpose(-1, -2))                     # (b, hk, g, n)
    else:   # max(q lo, q hi) per channel is q hi where q >= 0, else q lo (lo <= hi on real pages)
        pos = q.clamp(min=0)
        s = torch.matmul(pos, hi.float().transpose(-1, -2)) + torch.matmul(q - pos, lo.float().transpose(-1, -2))
    return s.amax(dim=2) if reduce == "max" else s.mean(dim=2)


if HAS_TRITON:

    @triton.jit
    def _chunk_scores_kernel(q_ptr, lo_ptr, hi_ptr, sc_ptr, out_ptr, lim_ptr, sl, val_ptr, N, sv_b, sv_h, sv_n,
                             sq_b, sq_h, sq_d,
                             sl_b, sl_h, sl_n, sl_d,
                             sh_b, sh_h, sh_n, sh_d,
                             so_b, so_h, so_n, ss_b, ss_h,
                             HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, QUEST: tl.constexpr,
                             REDUCE_MAX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                             DOT: tl.constexpr, SCALED: tl.constexpr = False, HAS_LIMIT: tl.constexpr = False,
                             HAS_VALID: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # Quest's bound sum_d max(q_d lo_d, q_d hi_d) = min(q, 0) . lo + max(q, 0) . hi: two dots,
        # so every score runs on the tensor cores for all G query heads of the group at once.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (pid_bh // HK).to(tl.int64)
        h = (pid_bh % HK).to(tl.int64)
        offs_g = tl.arange(0, G_P)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < G
        mask_n = offs_n < N
        mask_d = offs_d < D
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g[:, None]) * sq_h + offs_d[None, :] * sq_d,
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)          # (G_P, BLOCK_D)
        if SCALED:   # int8 bounds: the per-channel power-of-two scale folded into the query (exact)
            sc = tl.load(sc_ptr + b * ss_b + h * ss_h + offs_d, mask=mask_d, other=0.0)
            q = (q.to(tl.float32) * sc[None, :]).to(q.dtype)
        m2 = mask_n[:, None] & mask_d[None, :]
        lo = tl.load(lo_ptr + b * sl_b + h * sl_h + offs_n[:, None].to(tl.int64) * sl_n + offs_d[None, :] * sl_d,
                     mask=m2, other=0)                                           # (BLOCK_N, BLOCK_D)
        if QUEST:
            hi = tl.load(hi_ptr + b * sh_b + h * sh_h + offs_n[:, None].to(tl.int64) * sh_n + offs_d[None, :] * sh_d,
                         mask=m2, other=0)
        if not DOT:
            # CUDA cores, float32 registers: one multiply-reduce per query head (mean keys with a
            # mean over the group need only the group's mean query)
            lof = lo.to(tl.float32)
            if QUEST:
                hif = hi.to(tl.float32)
            if (not QUEST) and (not REDUCE_MAX):
                qbar = tl.sum(q.to(tl.float32), axis=0) / G
                r = tl.sum(qbar[None, :] * lof, axis=1)
            else:
                if REDUCE_MAX:
                    r = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                else:
                    r = tl.zeros((BLOCK_N,), tl.float32)
                for g in tl.static_range(G):
                    qg = tl.load(q_ptr + b * sq_b + (h * G + g) * sq_h + offs_d * sq_d, mask=mask_d,
                                 other=0.0).to(tl.float32)
                    if SCALED:
                        qg = qg * sc
                    if QUEST:
                        sg = tl.sum(tl.maximum(qg[None, :] * lof, qg[None, :] * hif), axis=1)
                    else:
                        sg = tl.sum(qg[None, :] * lof, axis=1)
                    if REDUCE_MAX:
                        r = tl.maximum(r, sg)
                    else:
                        r += sg
                if not REDUCE_MAX:
                    r = r / G
        else:
            if UPCAST:  # the CPU interpreter mis-computes bf16/fp16 tl.dot: do it in float32 there
                q = q.to(tl.float32)
                lo = lo.to(tl.float32)
                if QUEST:
                    hi = hi.to(tl.float32)
            else:
                lo = lo.to(q.dtype)
                if QUEST:
                    hi = hi.to(q.dtype)
            if QUEST:
                q_lo = tl.minimum(q, 0.0).to(q.dtype)
                q_hi = tl.maximum(q, 0.0).to(q.dtype)
            else:
                q_lo = q
            if IEEE:
                s = tl.dot(q_lo, tl.trans(lo), input_precision="ieee")
                if QUEST:
                    s += tl.dot(q_hi, tl.trans(hi), input_precision="ieee")
            else:
                s = tl.dot(q_lo, tl.trans(lo))
                if QUEST:
                    s += tl.dot(q_hi, tl.trans(hi))                             # (G_P, BLOCK_N) fp32
            if REDUCE_MAX:
                r = tl.max(tl.where(mask_g[:, None], s, float("-inf")), axis=0)
            else:
                r = tl.sum(s, axis=0) / G                                        # padded rows are 0
        if HAS_LIMIT:   # chunks from limit[b] on are not candidates
            r = tl.where(offs_n < tl.load(lim_ptr + b * sl), r, float("-inf"))
        if HAS_VALID:
            ok = tl.load(val_ptr + b * sv_b + h * sv_h + offs_n * sv_n, mask=mask_n, other=0)
            r = tl.where(ok != 0, r, float("-inf"))
        tl.store(out_ptr + b * so_b + h * so_h + offs_n * so_n, r, mask=mask_n)


def chunk_scores(query: torch.Tensor, summaries: Summaries, reduce: str = "mean",
                 scale: torch.Tensor | None = None, limit: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Triton kernel; same arguments and result as :func:`chunk_scores_ref`.

    One program scores ``BLOCK_N`` chunks of one (batch, kv_head) for all ``group`` query heads
    with ``tl.dot`` (query rows padded to 16), so each summary row is read from memory once.
    Summaries may be strided views (e.g. the first ``n_chunks`` rows of a preallocated buffer);
    they are cast to the query's dtype inside the kernel.
    """
    if not HAS_TRITON:
        raise RuntimeError("chunk_scores needs Triton (pip install triton); use chunk_scores_ref")
    lo, hi = _check(query, summaries, reduce, scale)
    _check_masks(lo, limit, valid)
    b, hq, d = query.shape
    hk, n = lo.shape[1], lo.shape[2]
    out = torch.empty(b, hk, n, dtype=torch.float32, device=query.device)
    if n == 0 or b == 0:
        return out
    quest = hi is not None
    hi_t = hi if quest else lo
    g = hq // hk
    block_d = max(16, triton.next_power_of_2(d))
    block_n = TUNING["block_n_int8" if lo.dtype == torch.int8 else "block_n"]
    block_n = block_n if block_d <= 128 else block_n // 2
    upcast = query.device.type != "cuda"
    grid = (b * hk, triton.cdiv(n, block_n))
    vs = valid.stride() if valid is not None else (0, 0, 0)
    _chunk_scores_kernel[grid](
        query, lo, hi_t, scale if scale is not None else out, out, limit if limit is not None else out,
        limit.stride(0) if limit is not None else 0,
        valid if valid is not None else out, n, vs[0], vs[1], vs[2],
        query.stride(0), query.stride(1), query.stride(2),
        lo.stride(0), lo.stride(1), lo.stride(2), lo.stride(3),
        hi_t.stride(0), hi_t.stride(1), hi_t.stride(2), hi_t.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        *((scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)),
        HK=hk, G=g, G_P=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=block_d, BLOCK_N=block_n,
        QUEST=quest, REDUCE_MAX=reduce == "max", IEEE=upcast or query.dtype == torch.float32, UPCAST=upcast,
        DOT=TUNING["dot"], SCALED=scale is not None, HAS_LIMIT=limit is not None, HAS_VALID=valid is not None,
        num_warps=TUNING["num_warps"], **pdl_launch(query),
    )
    return out


# ---- selection under a token budget (PyTorch) ----------------------------------------------------

def select_chunks(scores: torch.Tensor, chunk_lens: torch.Tensor | int, budget: int,
                  max_chunks: int | None = None, topk=None, budget_fn=None) -> torch.Tensor:
    """Best chunks per (batch, kv_head) whose lengths add up to at most ``budget`` tokens.

    scores ``(batch, kv_heads, n_chunks)`` (``-inf`` = never select, e.g. padding chunks);
    chunk_lens: an int (every chunk that long, e.g. Quest pages: the best ``budget // page``) or
    ``(batch, kv_heads, n_chunks)`` / ``(n_chunks,)`` integer lengths (0-length chunks are never
    selected): chunks are taken in descending score order while the running total stays within
    ``budget`` (a chunk that would overflow stops the walk: the selection is a prefix of the
    ranking). ``max_chunks`` bounds how many chunks are ranked (default ``min(n_chunks, budget)``
    for variable lengths; pass ``budget // shortest_chunk + 1`` to rank fewer). ``topk`` is the
    top-k function for uniform pages (default :func:`topk_select_ref`; the dispatcher passes the
    Triton one), ``budget_fn`` the variable-length selection (default
    :func:`kvsift.kernels.budget_select.budget_select_ref`). Returns ``(batch, kv_heads, k)`` int64
    chunk indices in ascending order, ``-1`` at the end where unused; no host sync.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (batch, kv_heads, n_chunks), got shape {tuple(scores.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (tokens), got {budget!r}")
    n = scores.shape[-1]
    if isinstance(chunk_lens, int) and not isinstance(chunk_lens, bool):
        if chunk_lens < 1:
            raise ValueError(f"chunk length must be >= 1, got {chunk_lens}")
        k = min(n, budget // chunk_lens)
        if max_chunks is not None:
            k = min(k, max_chunks)
        return (topk or topk_select_ref)(scores, k, torch.int64)
    if not isinstance(chunk_lens, torch.Tensor):
        raise TypeError(f"chunk_lens must be an int or an integer tensor, got {type(chunk_lens).__name__}")
    if chunk_lens.dtype.is_floating_point:
        raise TypeError("chunk_lens must be an integer tensor")
    lens = chunk_lens.expand_as(scores) if chunk_lens.dim() == 1 else chunk_lens
    if lens.shape != scores.shape:
        raise ValueError(f"chunk_lens shape {tuple(chunk_lens.shape)} does not match scores {tuple(scores.shape)}")
    k = max(0, min(n, budget if max_chunks is None else max_chunks))
    from kvsift.kernels.budget_select import budget_select_ref

    return (budget_fn or budget_select_ref)(scores, lens, budget, k)


def chunks_to_slots(chunk_idx: torch.Tensor, chunk_starts: torch.Tensor | None, chunk_lens: torch.Tensor | int,
                    max_len: int | None = None, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Expand chunk indices to the cache slots they cover.

    chunk_idx ``(batch, kv_heads, k)`` (``-1`` = none). Uniform pages: ``chunk_starts=None`` and
    ``chunk_lens`` an int ``P`` (chunk ``c`` covers slots ``c*P .. c*P+P-1``). Otherwise
    ``chunk_starts`` / ``chunk_lens`` are ``(batch, kv_heads, n_chunks)`` or ``(n_chunks,)`` first
    slot and length of each chunk, and ``max_len`` the longest chunk (a python int: it fixes the
    output width). Returns ``(batch, kv_heads, k * width)`` slot indices, ``-1`` where unused.
    """
    if chunk_idx.dim() != 3:
        raise ValueError(f"chunk_idx must be (batch, kv_heads, k), got shape {tuple(chunk_idx.shape)}")
    valid = chunk_idx >= 0
    safe = chunk_idx.clamp(min=0).to(torch.int64)
    b, h, k = chunk_idx.shape
    if chunk_starts is None:
        if not isinstance(chunk_lens, int) or chunk_lens < 1:
            raise ValueError("uniform pages need chunk_lens as a positive int")
        ar = torch.arange(chunk_lens, device=chunk_idx.device)
        slots = safe[..., None] * chunk_lens + ar
        slots = torch.where(valid[..., None], slots, -1)
        return slots.reshape(b, h, k * chunk_lens).to(dtype)
    if max_len is None or max_len < 1:
        raise ValueError("variable-length chunks need max_len (the longest chunk, a positive int)")
    starts = chunk_starts.expand(b, h, -1) if chunk_starts.dim() == 1 else chunk_starts
    if isinstance(chunk_lens, int):
        lens = torch.full_like(starts, chunk_lens)
    else:
        lens = chunk_lens.expand(b, h, -1) if chunk_lens.dim() == 1 else chunk_lens
    st = starts.gather(-1, safe).to(torch.int64)
    ln = lens.gather(-1, safe).to(torch.int64)
    ar = torch.arange(max_len, device=chunk_idx.device)
    slots = st[..., None] + ar
    ok = valid[..., None] & (ar < ln[..., None])
    slots = torch.where(ok, slots, -1)
    return slots.reshape(b, h, k * max_len).to(dtype)


def page_summaries(keys: torch.Tensor, page: int, kind: str = "minmax") -> Summaries:
    """Summaries of uniform pages of ``keys (batch, kv_heads, n, head_dim)`` (``n`` a multiple of
    ``page``): ``"minmax"`` -> ``(kmin, kmax)`` (Quest), ``"mean"`` -> mean keys; each
    ``(batch, kv_heads, n // page, head_dim)`` in the keys' dtype."""
    b, h, n, d = keys.shape
    if page < 1 or n % page:
        raise ValueError(f"n ({n}) must be a positive multiple of page ({page})")
    kp = keys.reshape(b, h, n // page, page, d)
    if kind == "minmax":
        return kp.amin(dim=3), kp.amax(dim=3)
    if kind == "mean":
        return kp.float().mean(dim=3).to(keys.dtype)
    raise ValueError(f"kind must be 'minmax' or 'mean', got {kind!r}")
