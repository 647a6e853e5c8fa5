"""The top-k of long rows over many programs per row: a radix select, for TokenSelect's votes.

Same contract and result as :func:`kvsift.kernels.topk_select.topk_select_ref` (indices of the
``k`` best scores of each row ``(batch, kv_heads, n)``, ascending, ``-1``-padded, ties at the
threshold to the lowest indices, ``skip``, ``tail`` and ``out`` as there).

Why: the one-program kernel holds a row in registers and searches its threshold there, and the
blocked form runs that kernel over blocks of 16,384, then once more over the blocks' candidates.
At batch 1, TokenSelect's 2,048 of 131,072 votes per KV head are then 64 programs, then 8, each
searching 16,384 keys: 0.062 ms of a 0.21 ms step on an H100 (``bench/gpu_decode.py``'s
``topk_tokens``), with most of the GPU idle. Here every launch spreads each row over blocks of
``block`` scores (4,096 by default: 32 programs per row at 131,072), and the threshold is found
digit by digit on the order-preserving 32-bit keys (11, 11 and 10 bits) through row histograms
that the blocks add to with atomics:

1. each block counts its keys by their top 11 bits into the row's first histogram;
2. each block reads that histogram, finds the bin holding the ``k``-th largest key and the count
   above it, and counts its keys of that bin by their next 11 bits into the second;
3. the same for the last 10 bits, into the third;
4. each block reads the three, so the exact threshold key ``t`` and how many keys equal to ``t``
   are taken (``k`` minus those above it), and writes how many of its keys are above ``t`` and
   equal to it;
5. each block reads the earlier blocks' counts (their prefix: where its picks start, and how many
   of the ties they took) and writes its picks in index order.

Six launches with the zeroing of the histograms (4 and 5 one kernel), each short and over ``n / block`` programs per
row, instead of two long ones over few. Rows are read from memory at every launch (from L2 for
TokenSelect's 4 MiB of votes at batch 1). Off in the dispatcher (``topk_select.TUNING["radix_min_n"]``
is None): timed on an H100 on 2026-12-05 (``bench/gpu_decode.py --tune --tune-kernels radix``,
CUDA graphs, 131,072 votes per row, k = 2,048, 8 KV heads) it lost at every setting. Batch 1: 0.185
ms at its best (blocks of 4,096, 4 warps; 0.21-0.93 ms at the others) against 0.063 ms for the
blocked form and 0.050 for ``torch.topk`` alone. Batch 8: 1.58 ms at its best against 0.167 and
0.057. End to end TokenSelect decoded at 20.8 ms/token with it against 16.1 without
(``bench/results/gpu_decode_tune_h100.log``). Its histogram atomics, every block of a row adding
into the same bins, are the likely cost (not profiled). Kept, tested against the reference, as the
starting point of a faster many-program select.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton
from kvsift.kernels.topk_select import _result, topk_select_ref

# a row's three histograms (int32 counts), one per digit of the 32-bit key, high to low: 11 bits
# (2,048 bins), 11 bits, 10 bits (1,024); the kernels address them at row * HIST, + 2048, + 4096
HIST = 2048 + 2048 + 1024
TUNING = {"block": 4096, "num_warps": 4}


if HAS_TRITON:
    from kvsift.kernels.topk_select import order_keys, write_tail

    @triton.jit
    def _block_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, blk, BLK: tl.constexpr):
        """Block ``blk`` of row ``(b, h)``: ``(offs, valid, u)``, ``u`` int64 keys in ``[0, 2**32)``
        whose order is the scores' (0 where not selectable: past the row, ``-inf``, NaN)."""
        offs = blk * BLK + tl.arange(0, BLK)
        x = tl.load(s_ptr + b * ss_b + h * ss_h + offs * ss_n, mask=offs < N, other=float("-inf")).to(tl.float32)
        valid, key = order_keys(x, offs < N)
        return offs, valid, key.to(tl.int64) + 2147483648           # (int32 min, unselectable: 0)

    @triton.jit
    def _row_block(HK: tl.constexpr, NBLK: tl.constexpr):
        """This program's ``(row, block, batch row, KV head)`` in a grid of ``rows * NBLK``."""
        pid = tl.program_id(0)
        row = (pid // NBLK).to(tl.int64)
        return row, pid % NBLK, row // HK, row % HK

    @triton.jit
    def _digit_bin(hist_ptr, need, NBINS: tl.constexpr):
        """In a row's histogram of one digit (``NBINS`` counts, over the keys that agree on the
        digits above it): the bin holding the ``need``-th largest key, and how many keys lie in the
        bins above it."""
        bins = tl.arange(0, NBINS)
        hc = tl.load(hist_ptr + bins)
        at_or_above = tl.sum(hc, axis=0) - tl.cumsum(hc, axis=0) + hc
        d = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
        return d, tl.sum(tl.where(bins > d, hc, 0), axis=0)

    @triton.jit
    def _row_state(hist_ptr, K, LEVELS: tl.constexpr):
        """``(kk, prefix, above)`` after the first ``LEVELS`` digits: ``kk = min(K, selectable
        keys)``, the key bits fixed so far (``prefix``, aligned at the top; all 32 with ``LEVELS``
        3: the threshold key) and the keys known to lie above the threshold."""
        total = tl.sum(tl.load(hist_ptr + tl.arange(0, 2048)), axis=0)
        kk = tl.minimum(K, total)
        d, above = _digit_bin(hist_ptr, kk, 2048)
        prefix = d.to(tl.int64) << 21
        if LEVELS >= 2:
            d2, a2 = _digit_bin(hist_ptr + 2048, kk - above, 2048)
            above += a2
            prefix = prefix | (d2.to(tl.int64) << 10)
        if LEVELS >= 3:
            d3, a3 = _digit_bin(hist_ptr + 4096, kk - above, 1024)
            above += a3
            prefix = prefix | d3.to(tl.int64)
        return kk, prefix, above

    @triton.jit
    def _radix_hist_kernel(s_ptr, skip_ptr, sx, hist_ptr, N, K, ss_b, ss_h, ss_n,
                           HK: tl.constexpr, NBLK: tl.constexpr, BLK: tl.constexpr, LEVEL: tl.constexpr,
                           SHIFT: tl.constexpr, BINS: tl.constexpr, TOP: tl.constexpr, BASE: tl.constexpr,
                           HAS_SKIP: tl.constexpr, HS: tl.constexpr = HIST):
        # launches 1-3: program (row, block) adds its keys' digit LEVEL (0, 1, 2: BINS bins, the
        # key's bits SHIFT to TOP) to the row's histogram of that digit (at BASE), over the keys
        # that agree with the threshold on the digits above (relaxed atomics: the launches after
        # read the sums, ordered by the kernel boundary)
        row, blk, b, h = _row_block(HK, NBLK)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        hrow = hist_ptr + row * HS
        offs, valid, u = _block_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, blk, BLK)
        if LEVEL > 0:   # the digits above, from the histograms before (a row with no key counts none)
            _, prefix, _ = _row_state(hrow, K, LEVEL)
            valid = valid & ((u >> TOP) == (prefix >> TOP))
        d = tl.where(valid, (u >> SHIFT) & (BINS - 1), BINS)
        hc = tl.histogram(d.to(tl.int32), 2 * BINS)                  # bin BINS: not counted
        bins = tl.arange(0, 2 * BINS)
        tl.atomic_add(hrow + BASE + bins, hc, mask=(bins < BINS) & (hc > 0), sem="relaxed")

    @triton.jit
    def _radix_pick_kernel(s_ptr, skip_ptr, sx, hist_ptr, cnt_ptr, out_ptr, tail_ptr, st_t, N, K,
                           ss_b, ss_h, ss_n, so_b, so_h, so_k,
                           HK: tl.constexpr, NBLK: tl.constexpr, NBLK_P: tl.constexpr, BLK: tl.constexpr,
                           FILL: tl.constexpr, WRITE: tl.constexpr, HAS_SKIP: tl.constexpr,
                           HAS_TAIL: tl.constexpr, HS: tl.constexpr = HIST):
        # launch 4 (WRITE False): program (row, block) writes how many of its keys lie above the
        # threshold key t and at it; launch 5: its picks, in index order after the earlier blocks'
        row, blk, b, h = _row_block(HK, NBLK)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        kk, t, above = _row_state(hist_ptr + row * HS, K, 3)
        offs, valid, u = _block_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, blk, BLK)
        gt = valid & (u > t)
        eq = valid & (u == t)
        if not WRITE:
            tl.store(cnt_ptr + (row * NBLK + blk) * 2, tl.sum(gt.to(tl.int32), axis=0))
            tl.store(cnt_ptr + (row * NBLK + blk) * 2 + 1, tl.sum(eq.to(tl.int32), axis=0))
        else:
            take_eq = kk - above                                # keys equal to t to take (lowest first)
            j = tl.arange(0, NBLK_P)
            earlier = j < blk
            gt_before = tl.sum(tl.load(cnt_ptr + (row * NBLK + j) * 2, mask=earlier, other=0), axis=0)
            eq_before = tl.sum(tl.load(cnt_ptr + (row * NBLK + j) * 2 + 1, mask=earlier, other=0), axis=0)
            eq_rank = eq_before + tl.cumsum(eq.to(tl.int32), axis=0)
            sel = gt | (eq & (eq_rank <= take_eq))              # (a row with no key: none)
            pos = gt_before + tl.minimum(eq_before, take_eq) + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            o_base = out_ptr + b * so_b + h * so_h
            tl.store(o_base + pos * so_k, offs.to(out_ptr.dtype.element_ty), mask=sel)
            if blk == 0:   # -1 from kk on, then the tail column
                for start in range(0, K, FILL):
                    offs_k = start + tl.arange(0, FILL)
                    tl.store(o_base + offs_k * so_k, tl.full((FILL,), -1, out_ptr.dtype.element_ty),
                             mask=(offs_k < K) & (offs_k >= kk))
                if HAS_TAIL:
                    write_tail(out_ptr, tail_ptr, b, h, st_t, so_b, so_h, so_k, K)


def topk_select_radix(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32,
                      skip: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """:func:`kvsift.kernels.topk_select.topk_select` for rows of any length in six launches over
    blocks of ``block`` scores (a power of two, default ``TUNING["block"]``); same arguments and
    result as :func:`~kvsift.kernels.topk_select.topk_select_ref` (``skip`` rows left as they were
    in ``out``; ``tail (batch,)`` as column ``k``)."""
    out, done = _result(scores, k, dtype, skip, tail, out)   # bad arguments: ValueError, Triton or not
    block = TUNING["block"] if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if not HAS_TRITON:
        raise RuntimeError("topk_select_radix needs Triton (pip install triton); use topk_select_ref")
    b, h, n = scores.shape
    if n >= 2**31:
        raise ValueError(f"rows of at most 2**31 - 1 scores, got {n}")
    if done:
        return out
    if n == 0:   # no score at all: every column -1 (and the tail)
        return topk_select_ref(scores, k, dtype, skip, tail, out)
    nblk = triton.cdiv(n, block)
    hist = torch.zeros(b * h, HIST, dtype=torch.int32, device=scores.device)
    counts = torch.empty(b * h, nblk, 2, dtype=torch.int32, device=scores.device)
    flag = skip if skip is not None else out
    sx = skip.stride(0) if skip is not None else 0
    ss = scores.stride()
    common = dict(HK=h, NBLK=nblk, BLK=block, HAS_SKIP=skip is not None, num_warps=TUNING["num_warps"])
    grid = (b * h * nblk,)
    for level, (shift, bins, base) in enumerate(((21, 2048, 0), (10, 2048, 2048), (0, 1024, 4096))):
        _radix_hist_kernel[grid](scores, flag, sx, hist, n, k, *ss, LEVEL=level, SHIFT=shift, BINS=bins,
                                 TOP=shift + bins.bit_length() - 1, BASE=base, **common)
    for write in (False, True):
        _radix_pick_kernel[grid](
            scores, flag, sx, hist, counts, out, tail if tail is not None else out,
            tail.stride(0) if tail is not None else 0, n, k, *ss, *out.stride(),
            NBLK_P=max(2, triton.next_power_of_2(nblk)), FILL=min(1024, max(16, triton.next_power_of_2(k))),
            WRITE=write, HAS_TAIL=tail is not None, **common)
    return out
