"""The best variable-length chunks per row within a token budget (sentencekv's decode selection).

``budget_select(scores, lens, budget, k)``: scores ``(batch, kv_heads, n)`` float (NaN and
``-inf`` never selected), ``lens (batch, kv_heads, n)`` integer chunk lengths (``<= 0`` never
selected). Chunks are taken in descending score order while their lengths add up to at most
``budget`` tokens (the first chunk that would overflow stops the walk: the selection is a prefix of
the ranking) and at most ``k`` are taken. Returns ``(batch, kv_heads, k)`` int64 chunk indices in
ascending order, ``-1`` at the end.

``budget_select_ref`` is ``torch.topk`` + gather + cumsum + sort (five launches and a radix sort).
``budget_select`` is one Triton program per row: with order-preserving integer keys it searches the
score threshold ``t`` whose prefix ``{key >= t}`` is the longest that fits the budget and ``k`` (4-way
search, three weighted sums and counts per pass, 16 passes at most), then writes the chosen indices with a
prefix sum; no sort. A group of equal scores at the cut is kept only if all of it fits (the
reference takes some of it in ``torch.topk``'s order); with continuous scores both agree exactly.
Rows of at most ``MAX_N`` chunks are held in registers (the dispatcher uses the reference beyond).
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton

MAX_N = 16384


def _check(scores: torch.Tensor, lens: torch.Tensor, budget: int, k: int) -> None:
    if scores.dim() != 3 or lens.shape != scores.shape:
        raise ValueError(f"scores and lens must both be (batch, kv_heads, n), got {tuple(scores.shape)} "
                         f"and {tuple(lens.shape)}")
    if lens.dtype.is_floating_point:
        raise TypeError("lens must be an integer tensor")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (tokens), got {budget!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")


def budget_select_ref(scores: torch.Tensor, lens: torch.Tensor, budget: int, k: int) -> torch.Tensor:
    """Reference (PyTorch): ``(batch, kv_heads, k)`` int64, ascending, ``-1`` at the end."""
    _check(scores, lens, budget, k)
    n = scores.shape[-1]
    s = scores.float().masked_fill(torch.isnan(scores) | (lens <= 0), float("-inf"))
    kk = min(n, k)
    if kk <= 0:
        return torch.full((*scores.shape[:2], k), -1, dtype=torch.int64, device=scores.device)
    top = s.topk(kk, dim=-1)
    ok = top.values > float("-inf")
    top_lens = torch.where(ok, lens.gather(-1, top.indices).to(torch.int64), budget + 1)
    fits = (top_lens.cumsum(-1) <= budget) & ok
    idx = torch.where(fits, top.indices, n).sort(dim=-1).values
    idx = torch.where(idx >= n, -1, idx)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:2], k - kk), -1)], dim=-1)
    return idx


if HAS_TRITON:

    @triton.jit
    def _budget_select_kernel(s_ptr, l_ptr, out_ptr, N, K, BUDGET, ss_b, ss_h, ss_n, sl_b, sl_h, sl_n,
                              HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        inb = offs < N
        x = tl.load(s_ptr + b * ss_b + h * ss_h + offs * ss_n, mask=inb, other=float("-inf")).to(tl.float32)
        ln = tl.load(l_ptr + b * sl_b + h * sl_h + offs * sl_n, mask=inb, other=0).to(tl.int32)
        valid = inb & (x == x) & (x > float("-inf")) & (ln > 0)
        w = tl.where(valid, ln, 0)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 2147483647)          # signed int order == float order
        key = tl.where(valid, key, -2147483647 - 1)
        # W(t) = sum of lengths with key >= t and C(t) = how many, both non-increasing in t. Find
        # the smallest t with W(t) <= BUDGET and C(t) <= K (the reference looks at the top K only):
        # invariant "lo fails, hi fits" (unless everything fits: t = lo)
        lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64) + 1
        c = valid.to(tl.int32)
        if (tl.sum(w, axis=0) <= BUDGET) & (tl.sum(c, axis=0) <= K):
            hi = lo
        while hi - lo > 1:
            span = hi - lo
            m1 = lo + span // 4
            m2 = lo + span // 2
            m3 = lo + (3 * span) // 4
            g1 = key >= m1.to(tl.int32)
            g2 = key >= m2.to(tl.int32)
            g3 = key >= m3.to(tl.int32)
            f1 = (tl.sum(tl.where(g1, w, 0), axis=0) <= BUDGET) & (tl.sum(tl.where(g1, c, 0), axis=0) <= K)
            f2 = (tl.sum(tl.where(g2, w, 0), axis=0) <= BUDGET) & (tl.sum(tl.where(g2, c, 0), axis=0) <= K)
            f3 = (tl.sum(tl.where(g3, w, 0), axis=0) <= BUDGET) & (tl.sum(tl.where(g3, c, 0), axis=0) <= K)
            new_hi = tl.where(f1, m1, tl.where(f2, m2, tl.where(f3, m3, hi)))
            lo = tl.where(f1, lo, tl.where(f2, m1, tl.where(f3, m2, m3)))
            hi = new_hi
        sel = valid & (key >= hi.to(tl.int32))
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        cnt = tl.sum(sel.to(tl.int32), axis=0)
        o_base = out_ptr + pid.to(tl.int64) * K
        tl.store(o_base + pos, offs.to(tl.int64), mask=sel & (pos < K))
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(o_base + offs_k, tl.full((BLOCK_K,), -1, tl.int64), mask=(offs_k < K) & (offs_k >= cnt))


def budget_select(scores: torch.Tensor, lens: torch.Tensor, budget: int, k: int) -> torch.Tensor:
    """Triton kernel; same arguments and result as :func:`budget_select_ref` (rows of at most
    ``MAX_N`` chunks; ties at the cut: see the module docstring)."""
    if not HAS_TRITON:
        raise RuntimeError("budget_select needs Triton; use budget_select_ref")
    _check(scores, lens, budget, k)
    b, h, n = scores.shape
    if n > MAX_N:
        raise ValueError(f"budget_select handles rows of at most {MAX_N} chunks, got {n}; use budget_select_ref")
    out = torch.empty(b, h, k, dtype=torch.int64, device=scores.device)
    if k == 0 or b * h == 0:
        return out
    if n == 0:
        return out.fill_(-1)
    block_n = max(16, triton.next_power_of_2(n))
    _budget_select_kernel[(b * h,)](
        scores, lens, out, n, k, budget, scores.stride(0), scores.stride(1), scores.stride(2),
        lens.stride(0), lens.stride(1), lens.stride(2),
        HK=h, BLOCK_N=block_n, BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=8 if block_n >= 4096 else 4)
    return out
