"""Indices of the ``k`` best scores per row, for decode-time chunk selection.

scores ``(batch, kv_heads, n)`` float; ``-inf`` and NaN are never selected. Returns
``(batch, kv_heads, k)`` int32 (or ``dtype``) indices in ascending index order (cache order, which helps the
attention kernel's memory locality), ``-1``-padded at the end when a row has fewer than ``k``
selectable entries. Among equal scores at the threshold both keep the lowest indices, so a
selection does not depend on the row's length or the batch around it (``torch.topk`` alone breaks
ties by shape: a row alone and the same row padded with unselectable entries in a batch could get
different pages).

``topk_select_ref`` takes the ``k``-th largest score from ``torch.topk``, then every score above it
and the lowest-index ones equal to it, written in index order by a prefix sum (no sort);
``topk_select`` is one Triton program per row that
finds the k-th largest score by a 4-way search on order-preserving integer keys (three counts per
pass; it stops as soon as the count is exact, 16 passes at most), then writes the selected indices
with a prefix sum: one launch, no sort. Two variants of the search (``TUNING["impl"]``):
``"int32"`` (signed int32 keys, three int32 reductions per pass; the default, a little faster on
an H100) and ``"packed64"`` (unsigned keys, the three counts packed into one int64 reduction; the
one-program kernel only). A third, the threshold digit by digit in four passes of a 256-bin
``tl.histogram``, was timed on the H200 on 2026-12-05 and removed: 0.0149 against 0.0102 ms for
Quest's 8,192-page rows and 0.347 against 0.062 ms for 131,072 votes (batch 1,
``bench/results/gpu_decode_kvappend_h200.log``). It holds the row in registers,
so it takes rows of at most ``MAX_N`` scores (longer rows, e.g. TokenSelect's votes over every
token of a 128k-token cache, go to the blocked form below on a GPU). Cutting such a row into blocks of
``MAX_N`` for this kernel, then taking the top ``k`` of the blocks' candidates (exact, two launches)
was measured on the H200 (131,072 votes per row, k = 2,048, CUDA graphs). On 2026-12-02, with about
ten PyTorch ops gathering the blocks' candidates: 0.092 ms at batch 1 and 0.234 ms at batch 8,
against 0.082 and 0.161 ms for ``torch.topk`` alone. On 2026-12-04, :func:`topk_select_blocked`
with nothing between its two launches: 0.0622 and 0.1695 ms, against 0.1284 and 0.2634 ms for what
the dispatcher ran until then (``torch.topk`` and the sort of its ``k`` indices the contract needs),
so long rows now go to it whenever its candidates fit (``blocked_fits``); it also skips rows
(``skip (batch,)``: TokenSelect's selection cache), which ``torch.topk`` cannot. Where the blocks'
candidates are more than ``MAX_N`` (a static buffer a little longer than 131,072 slots: nine blocks'
2,048 each) it runs one more level of blocks over them (``block_levels``); until 2026-12-05 such
rows went to ``torch.topk`` and two sorts, which a profile of TokenSelect's decode at 128k on an
H100 showed taking 2.9 of its 15.4 ms of kernels per step. The same blocked form
with smaller blocks spreads a row one program could hold over several (``TUNING["block_from"]``):
Quest's 8,192 pages at 128k (k = 128) in blocks of 1,024 took 0.0102 / 0.0143 ms at batch 1 / 8
against 0.0135 / 0.0169 ms in one program per row (blocks of 512 and 2,048 in between).
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, pdl_launch, pdl_start, tl, triton

MAX_N = 16384
IMPLS = ("int32", "packed64")   # the threshold's search (TUNING["impl"]; the module docstring)
# launch settings of the Triton kernel (bench/gpu_decode.py --tune sweeps them); None = by size
TUNING = {"num_warps": None, "impl": "int32",
          # rows of at least max(2 * block_from, block_min_n) scores (and at most MAX_N) go to
          # topk_select_blocked in blocks of block_from (more programs per row); None: one program
          # per row. Measured (bench/gpu_decode.py's topk_one / topk_blocked* rows): at 8,192 scores
          # (Quest's pages of 16 at 128k) blocks were faster on the H200, at exactly 4,096 (pages of
          # 32) one program was, by 3% of the step (H100). Rows just past a power of two are what
          # the engine makes (its buffers hold the prompt and a decode reserve: 4,128 pages of 32
          # at 128k), and one program pads them to the next one: 15.5 us per layer in a profile of
          # the decode (H100) against 9.1 at exactly 4,096 in the bench. So past 4,096, blocks
          "block_from": 1024, "block_min_n": 4097,
          # rows of at least radix_min_n scores go to kvsift.kernels.topk_radix (six short launches
          # over blocks of 4,096 instead of the blocked form's two long ones); None: never (timed on
          # an H100: 3x slower at batch 1, 10x at batch 8, see that module)
          "radix_min_n": None}


def _check(scores: torch.Tensor, k: int, dtype: torch.dtype) -> None:
    if dtype not in (torch.int32, torch.int64):
        raise TypeError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    if scores.dim() != 3:
        raise ValueError(f"scores must be (batch, kv_heads, n), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")


def _prepared(scores: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Checked scores as float32 with NaN at ``-inf`` (never selected), and ``min(k, n)``."""
    _check(scores, k, dtype)
    s = scores.float()
    return s.masked_fill(torch.isnan(s), float("-inf")), min(k, scores.shape[-1])


def _padded(idx: torch.Tensor, k: int) -> torch.Tensor:
    """``idx (batch, kv_heads, kk)`` padded with ``-1`` to ``k`` entries."""
    kk = idx.shape[-1]
    return idx if kk >= k else torch.cat([idx, idx.new_full((*idx.shape[:2], k - kk), -1)], dim=-1)


def topk_select_ref(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32,
                    skip: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (PyTorch): ``(batch, kv_heads, k)`` indices of ``dtype`` (int32 or int64),
    ascending, ``-1`` padded; with ``tail (batch,)`` integers, one more column holding
    ``tail[b]`` (an entry always kept, e.g. Quest's page being filled). ``out``: the result is
    written there (and returned), except in its ``skip (batch,)`` rows, which keep what they held
    (the kernels' rows left out); without ``out``, ``skip`` is accepted and ignored."""
    _check_tail(scores, tail)
    return into(with_tail(_topk_ref(scores, k, dtype), tail), skip, out)


def into(res: torch.Tensor, skip: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``res`` written into ``out`` but for its ``skip`` rows, as the kernels leave them (the
    PyTorch paths' way to the kernels' in-place result); ``res`` itself without ``out``."""
    if out is None:
        return res
    _check_out(out, tuple(res.shape), res.dtype, res.device)
    return out.copy_(res if skip is None else torch.where(skip[:, None, None], out, res))


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device):
        raise ValueError(f"out must be {dtype} of shape {tuple(shape)} on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")


def _topk_ref(scores: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    s, kk = _prepared(scores, k, dtype)
    b, h, n = s.shape
    out = torch.full((b, h, kk + 1), -1, dtype=torch.int64, device=scores.device)
    if kk > 0:
        t = s.topk(kk, dim=-1).values[..., -1:]                          # the kk-th largest
        valid = s > float("-inf")
        gt = valid & (s > t)
        eq = valid & (s == t)
        sel = gt | (eq & (eq.cumsum(-1) <= kk - gt.sum(-1, keepdim=True)))   # ties: the lowest indices
        at = torch.where(sel, sel.cumsum(-1) - 1, kk)                     # column kk: a dump, dropped
        out.scatter_(-1, at, torch.arange(n, device=s.device).expand(b, h, n))
    return _padded(out[..., :kk].to(dtype), k)


def topk_select_long(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """:func:`topk_select_ref` for rows too long for the kernel on a GPU (TokenSelect's votes over
    every token): ``torch.topk``, then the ``k`` indices sorted, without the reference's prefix sums
    over the whole row; ties at the threshold go as ``torch.topk`` returns them (continuous votes
    rarely tie)."""
    s, kk = _prepared(scores, k, dtype)
    n = s.shape[-1]
    top = s.topk(kk, dim=-1)
    idx = torch.where(top.values > float("-inf"), top.indices, n)      # unselectable sort last
    idx = idx.sort(dim=-1).values
    return _padded(torch.where(idx >= n, -1, idx).to(dtype), k)


if HAS_TRITON:

    @triton.jit
    def order_keys(x, in_row):
        """Scores ``x`` (float32, ``in_row``: the entries that exist) as signed int32 keys whose
        order is the floats' (``int32`` min where unselectable: outside the row, ``-inf``, NaN).
        Returns ``(valid, key)``."""
        valid = in_row & (x == x) & (x > float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 2147483647)          # signed order == float order
        return valid, tl.where(valid, key, -2147483647 - 1)

    @triton.jit
    def float_keys(x, in_row, K):
        """:func:`order_keys`, and ``(n_valid, kk)``, ``kk = min(K, n_valid)``. Returns ``(valid,
        key, n_valid, kk)``."""
        valid, key = order_keys(x, in_row)
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        return valid, key, n_valid, tl.minimum(K, n_valid)

    @triton.jit
    def row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N: tl.constexpr):
        """One row's scores as :func:`float_keys`. Returns ``(offs, valid, key, n_valid, kk)``."""
        offs = tl.arange(0, BLOCK_N)
        x = tl.load(s_ptr + b * ss_b + h * ss_h + offs * ss_n, mask=offs < N, other=float("-inf")).to(tl.float32)
        valid, key, n_valid, kk = float_keys(x, offs < N, K)
        return offs, valid, key, n_valid, kk

    @triton.jit
    def search_threshold(valid, key, n_valid, kk):
        """The k-th largest key by a 4-way search (three int32 counts per pass), stopping as soon as
        the count at the low end is exactly ``kk`` or the interval is one key wide. Invariant:
        ``#(key >= lo) >= kk > #(key >= hi)``. Returns ``(t, exact, passes)``: the threshold key,
        whether ``#(key >= t) == kk`` (no tie to break) and the passes it took."""
        lo = tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64)
        hi = tl.max(key, axis=0).to(tl.int64) + 1
        cnt_lo = n_valid
        passes = 0
        while (hi - lo > 1) & (cnt_lo != kk):
            w = hi - lo
            m1 = (lo + w // 4).to(tl.int32)
            m2 = (lo + w // 2).to(tl.int32)
            m3 = (lo + (3 * w) // 4).to(tl.int32)
            c1 = tl.sum((valid & (key >= m1)).to(tl.int32), axis=0)
            c2 = tl.sum((valid & (key >= m2)).to(tl.int32), axis=0)
            c3 = tl.sum((valid & (key >= m3)).to(tl.int32), axis=0)
            new_lo = tl.where(c3 >= kk, m3, tl.where(c2 >= kk, m2, tl.where(c1 >= kk, m1, lo.to(tl.int32))))
            new_cnt = tl.where(c3 >= kk, c3, tl.where(c2 >= kk, c2, tl.where(c1 >= kk, c1, cnt_lo)))
            hi = tl.where(c3 >= kk, hi, tl.where(c2 >= kk, m3.to(tl.int64), tl.where(c1 >= kk, m2.to(tl.int64),
                                                                                      m1.to(tl.int64))))
            lo = new_lo.to(tl.int64)
            cnt_lo = new_cnt
            passes += 1
        return lo.to(tl.int32), cnt_lo == kk, passes

    @triton.jit
    def select_at(valid, key, t, kk, exact):
        """The selection for threshold key ``t``: every key above it and, unless ``exact`` (the
        count at ``t`` is ``kk`` already), the lowest-index ones equal to it up to ``kk``."""
        if exact:
            sel = valid & (key >= t)
        else:
            gt = valid & (key > t)
            eq = valid & (key == t)
            n_gt = tl.sum(gt.to(tl.int32), axis=0)
            eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
            sel = gt | (eq & (eq_rank <= kk - n_gt))
        return sel

    @triton.jit
    def write_tail(out_ptr, tail_ptr, b, h, st_t, so_b, so_h, so_k, K):
        """Column ``K`` of ``out[b, h]``: ``tail[b]``, the row's always-attended entry (Quest: the
        page being filled)."""
        tl.store(out_ptr + b * so_b + h * so_h + K * so_k, tl.load(tail_ptr + b * st_t).to(out_ptr.dtype.element_ty))

    @triton.jit
    def best_k(valid, key, n_valid, kk):
        """The ``kk`` best keys' mask: the threshold's 4-way search, then ties to the lowest
        indices."""
        t, exact, _ = search_threshold(valid, key, n_valid, kk)
        return select_at(valid, key, t, kk, exact)

    @triton.jit
    def write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, sel, kk, K, BLOCK_K: tl.constexpr, fill=-1):
        """``offs`` at the selected entries, in their order, into ``out[b, h, :K]`` (a prefix sum,
        no sort; ``offs`` the entries' indices, or any per-entry value), ``fill`` from ``kk`` on."""
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        o_base = out_ptr + b * so_b + h * so_h
        tl.store(o_base + pos * so_k, offs.to(out_ptr.dtype.element_ty), mask=sel)
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(o_base + offs_k * so_k, tl.full((BLOCK_K,), fill, out_ptr.dtype.element_ty),
                 mask=(offs_k < K) & (offs_k >= kk))

    @triton.jit
    def _topk_select_kernel(s_ptr, out_ptr, skip_ptr, sx, tail_ptr, st_t, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
                            HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            HAS_SKIP: tl.constexpr = False, HAS_TAIL: tl.constexpr = False,
                            PDL: tl.constexpr = False):
        pdl_start(PDL)
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        if HAS_SKIP:   # a row whose selection is not needed this step: nothing to do
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs = tl.arange(0, BLOCK_N)
        x = tl.load(s_ptr + b * ss_b + h * ss_h + offs * ss_n, mask=offs < N, other=float("-inf")).to(tl.float32)
        valid = (offs < N) & (x == x) & (x > float("-inf"))
        # order-preserving unsigned key: positive floats get the top bit, negative ones are flipped
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits ^ -2147483648, ~bits).to(tl.uint32, bitcast=True).to(tl.int64)
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        kk = tl.minimum(K, n_valid)
        # 4-way search for the threshold t: invariant #(key >= lo) >= kk > #(key >= hi); stop as soon
        # as #(key >= lo) == kk (no tie to break) or the interval is one key wide
        lo = tl.min(tl.where(valid, key, 4294967296), axis=0)
        hi = tl.max(tl.where(valid, key, 0), axis=0) + 1
        cnt_lo = n_valid.to(tl.int64)
        kk64 = kk.to(tl.int64)
        while (hi - lo > 1) & (cnt_lo != kk64):
            w = hi - lo
            m1 = lo + w // 4
            m2 = lo + w // 2
            m3 = lo + (3 * w) // 4
            packed = ((key >= m1).to(tl.int64) + ((key >= m2).to(tl.int64) << 20)
                      + ((key >= m3).to(tl.int64) << 40))
            c = tl.sum(tl.where(valid, packed, 0), axis=0)
            c1 = c & 1048575
            c2 = (c >> 20) & 1048575
            c3 = c >> 40
            new_lo = tl.where(c3 >= kk64, m3, tl.where(c2 >= kk64, m2, tl.where(c1 >= kk64, m1, lo)))
            new_cnt = tl.where(c3 >= kk64, c3, tl.where(c2 >= kk64, c2, tl.where(c1 >= kk64, c1, cnt_lo)))
            hi = tl.where(c3 >= kk64, hi, tl.where(c2 >= kk64, m3, tl.where(c1 >= kk64, m2, m1)))
            lo = new_lo
            cnt_lo = new_cnt
        sel = select_at(valid, key, lo, kk, cnt_lo == kk64)   # ties at the threshold: the lowest indices
        write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, sel, kk, K, BLOCK_K)
        if HAS_TAIL:   # one more column: the row's always-attended entry (Quest: the page being filled)
            write_tail(out_ptr, tail_ptr, b, h, st_t, so_b, so_h, so_k, K)


    @triton.jit
    def _topk_select_kernel_i32(s_ptr, out_ptr, skip_ptr, sx, tail_ptr, st_t, N, K, ss_b, ss_h, ss_n, so_b, so_h, so_k,
                                HK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                HAS_SKIP: tl.constexpr = False, HAS_TAIL: tl.constexpr = False,
                                PDL: tl.constexpr = False):
        pdl_start(PDL)
        # same algorithm on signed int32 keys, three separate int32 counts per pass
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs, valid, key, n_valid, kk = row_keys(s_ptr, b, h, ss_b, ss_h, ss_n, N, K, BLOCK_N)
        sel = best_k(valid, key, n_valid, kk)
        write_selected(out_ptr, b, h, so_b, so_h, so_k, offs, sel, kk, K, BLOCK_K)
        if HAS_TAIL:   # one more column: the row's always-attended entry (Quest: the page being filled)
            write_tail(out_ptr, tail_ptr, b, h, st_t, so_b, so_h, so_k, K)


    @triton.jit
    def _topk_blocks_kernel(s_ptr, si_ptr, ci_ptr, cv_ptr, skip_ptr, sx, N, K, ss_b, ss_h, ss_n,
                            HK: tl.constexpr, NB: tl.constexpr, BLK: tl.constexpr, BLOCK_K: tl.constexpr,
                            HAS_SKIP: tl.constexpr, HAS_IDX: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # a level of the blocked selection: program (row, block) writes its block's best K as
        # candidates, global indices ascending into ci[b, h, blk*K:(blk+1)*K] and their scores into
        # cv (-1 / -inf past the block's selectable entries). HAS_IDX: a later level, whose scores
        # are an earlier level's candidates and si (laid out as the scores) their global indices
        pid = tl.program_id(0)
        row = pid // NB
        blk = (pid % NB).to(tl.int64)
        b = (row // HK).to(tl.int64)
        h = (row % HK).to(tl.int64)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs = tl.arange(0, BLK)
        idx = blk * BLK + offs
        x = tl.load(s_ptr + b * ss_b + h * ss_h + idx * ss_n, mask=idx < N, other=float("-inf")).to(tl.float32)
        valid, key, n_valid, kk = float_keys(x, idx < N, K)
        sel = best_k(valid, key, n_valid, kk)
        if HAS_IDX:
            idx = tl.load(si_ptr + b * ss_b + h * ss_h + idx * ss_n, mask=sel, other=-1)
        m = NB * K
        write_selected(ci_ptr + blk * K, b, h, HK * m, m, 1, idx, sel, kk, K, BLOCK_K)
        write_selected(cv_ptr + blk * K, b, h, HK * m, m, 1, x, sel, kk, K, BLOCK_K, float("-inf"))

    @triton.jit
    def _topk_pick_kernel(ci_ptr, cv_ptr, out_ptr, skip_ptr, sx, tail_ptr, st_t, M, K, so_b, so_h, so_k,
                          HK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SKIP: tl.constexpr,
                          HAS_TAIL: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # the second launch: the best K of a row's M candidates (ascending global indices, so the
        # lowest candidate positions are the lowest indices at a tie), written as global indices
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs, valid, key, n_valid, kk = row_keys(cv_ptr, b, h, HK * M, M, 1, M, K, BLOCK_M)
        sel = best_k(valid, key, n_valid, kk)
        idx = tl.load(ci_ptr + (b * HK + h) * M + offs, mask=sel, other=-1)
        write_selected(out_ptr, b, h, so_b, so_h, so_k, idx, sel, kk, K, BLOCK_K)
        if HAS_TAIL:
            write_tail(out_ptr, tail_ptr, b, h, st_t, so_b, so_h, so_k, K)


def _check_impl() -> None:
    if TUNING["impl"] not in IMPLS:
        raise ValueError(f"topk_select.TUNING['impl'] must be one of {IMPLS}, got {TUNING['impl']!r}")


def _check_skip(scores: torch.Tensor, skip: torch.Tensor | None) -> None:
    if skip is not None and (tuple(skip.shape) != (scores.shape[0],) or skip.dtype != torch.bool
                             or skip.device != scores.device):
        raise ValueError(f"skip must be a bool tensor of shape (batch,) = ({scores.shape[0]},) on the scores' device")


def topk_select(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32,
                skip: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton kernel; same arguments and result as :func:`topk_select_ref` (rows of at most
    ``MAX_N`` scores). ``skip (batch,)`` bool: rows whose programs return at once, their output
    left unwritten (as it was in ``out``, unspecified in a new one). ``tail (batch,)``: written by
    the same launch as column ``k``. ``out``: written in place when given."""
    if not HAS_TRITON:
        raise RuntimeError("topk_select needs Triton (pip install triton); use topk_select_ref")
    out, done = _result(scores, k, dtype, skip, tail, out)
    b, h, n = scores.shape
    if n > MAX_N:
        raise ValueError(f"topk_select handles rows of at most {MAX_N} scores, got {n}; use topk_select_ref")
    if done:
        return out
    _check_impl()
    block_n = max(16, triton.next_power_of_2(n))
    kernel = _topk_select_kernel if TUNING["impl"] == "packed64" else _topk_select_kernel_i32
    kernel[(b * h,)](
        scores, out, skip if skip is not None else out, skip.stride(0) if skip is not None else 0,
        tail if tail is not None else out,
        tail.stride(0) if tail is not None else 0, n, k,
        scores.stride(0), scores.stride(1), scores.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HK=h, BLOCK_N=block_n, BLOCK_K=max(16, triton.next_power_of_2(k)), HAS_SKIP=skip is not None,
        HAS_TAIL=tail is not None, num_warps=TUNING["num_warps"] or (8 if block_n >= 4096 else 4),
        **pdl_launch(scores),
    )
    return out


def _result(scores: torch.Tensor, k: int, dtype: torch.dtype, skip: torch.Tensor | None,
            tail: torch.Tensor | None, out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The kernels' wrappers' common start: the arguments checked and the result ``(batch,
    kv_heads, k [+ 1])`` (``out``, or a new buffer); ``True`` when no kernel is needed (no rows, or
    ``k == 0``: only the tail column, written but in the ``skip`` rows, as the kernels do)."""
    _check(scores, k, dtype)
    _check_skip(scores, skip)
    _check_tail(scores, tail)
    b, h, _ = scores.shape
    shape = (b, h, k + (tail is not None))
    _check_out(out, shape, dtype, scores.device)
    out = torch.empty(shape, dtype=dtype, device=scores.device) if out is None else out
    if b * h == 0:
        return out, True
    if k == 0:
        if tail is not None:
            into(tail.to(dtype)[:, None, None].expand(b, h, 1), skip, out)
        return out, True
    return out, False


def _check_tail(scores: torch.Tensor, tail: torch.Tensor | None) -> None:
    if tail is not None and (tuple(tail.shape) != (scores.shape[0],) or tail.is_floating_point()
                             or tail.device != scores.device):
        raise ValueError(f"tail must be integers of shape (batch,) = ({scores.shape[0]},) on the scores' device")


def with_tail(idx: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """``idx (batch, kv_heads, k)`` with ``tail (batch,)`` as one more column (the references' and
    the long rows' way to what the kernel writes in its own launch)."""
    if tail is None:
        return idx
    b, h = idx.shape[:2]
    return torch.cat([idx, tail.to(idx.dtype)[:, None, None].expand(b, h, 1)], dim=-1)


def block_levels(n: int, k: int, block: int | None = None, max_levels: int = 4) -> list[int] | None:
    """The block size of each candidate level :func:`topk_select_blocked` runs for rows of ``n``
    scores and ``k`` (the first ``block``, default ``MAX_N``, the later ones ``MAX_N``): each level
    keeps the best ``k`` of every block, until at most ``MAX_N`` candidates are left for the last
    launch to pick from. ``None`` where that takes more than ``max_levels`` levels or a level would
    not shrink the row (``k`` too large for its blocks)."""
    block = MAX_N if block is None else block
    if not k <= block <= MAX_N:
        return None
    levels, m = [], n
    while True:
        blk = block if not levels else MAX_N
        nxt = -(-m // blk) * k
        if levels and nxt >= m:
            return None
        levels.append(blk)
        if nxt <= MAX_N:
            return levels
        if len(levels) == max_levels:
            return None
        m = nxt


def blocked_fits(n: int, k: int, block: int | None = None) -> bool:
    """Whether :func:`topk_select_blocked` takes rows of ``n`` scores for ``k`` in blocks of
    ``block`` (default ``MAX_N``): see :func:`block_levels`."""
    return block_levels(n, k, block) is not None


def topk_select_blocked(scores: torch.Tensor, k: int, dtype: torch.dtype = torch.int32,
                        skip: torch.Tensor | None = None, out: torch.Tensor | None = None,
                        block: int | None = None, tail: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`topk_select` in a few launches, exactly as :func:`topk_select_ref`: the best ``k`` of
    each block of ``block`` scores (a power of two, default ``MAX_N``), then the best ``k`` of
    those candidates (the same result: a score among a row's best ``k`` is among its block's best
    ``k``, ties included, as every pass keeps the lowest indices). Where the candidates are still
    more than ``MAX_N`` (TokenSelect's votes over a buffer a little longer than 131,072 slots: nine
    blocks of 2,048 candidates), the same launch runs again over them, in blocks of ``MAX_N``
    (:func:`block_levels`); candidates stay in ascending index order at every level, so the lowest
    positions are the lowest indices at a tie. Nothing runs between the launches: each level writes
    its candidates (global indices and scores), the last launch picks among them and writes global
    indices (and ``tail (batch,)`` as column ``k``, as the one-launch kernel). Rows longer than
    ``MAX_N`` need it; shorter ones may spread a row over more programs with a smaller ``block``
    (Quest's 8,192 pages at 128k: one program per row otherwise). Every launch returns at once for
    ``skip`` rows, whose ``out`` rows are left as they were (``out (batch, kv_heads, k [+ 1])`` of
    ``dtype``, written in place when given). For ``blocked_fits(n, k, block)`` shapes."""
    out, done = _result(scores, k, dtype, skip, tail, out)   # bad arguments: ValueError, Triton or not
    b, h, n = scores.shape
    block = MAX_N if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    levels = block_levels(n, k, block)
    if levels is None:
        raise ValueError(f"topk_select_blocked takes k <= block <= {MAX_N} and k small enough for its candidates "
                         f"to shrink to {MAX_N} within a few levels of blocks, got n={n}, k={k}, block={block}")
    if not HAS_TRITON:
        raise RuntimeError("topk_select_blocked needs Triton (pip install triton); use topk_select_ref")
    if done:
        return out
    _check_impl()
    flag = skip if skip is not None else out
    sx = skip.stride(0) if skip is not None else 0
    block_k = max(16, triton.next_power_of_2(k))
    vals, idx, m = scores, None, n
    for blk in levels:
        nb = -(-m // blk)
        cand_i = torch.empty(b, h, nb * k, dtype=torch.int64, device=scores.device)
        cand_v = torch.empty(b, h, nb * k, dtype=torch.float32, device=scores.device)
        _topk_blocks_kernel[(b * h * nb,)](
            vals, idx if idx is not None else cand_i, cand_i, cand_v, flag, sx, m, k,
            vals.stride(0), vals.stride(1), vals.stride(2),
            HK=h, NB=nb, BLK=blk, BLOCK_K=block_k, HAS_SKIP=skip is not None, HAS_IDX=idx is not None,
            num_warps=TUNING["num_warps"] or (8 if blk >= 4096 else 4), **pdl_launch(scores))
        vals, idx, m = cand_v, cand_i, nb * k
    block_m = max(16, triton.next_power_of_2(m))
    _topk_pick_kernel[(b * h,)](
        idx, vals, out, flag, sx, tail if tail is not None else out, tail.stride(0) if tail is not None else 0,
        m, k, out.stride(0), out.stride(1), out.stride(2),
        HK=h, BLOCK_M=block_m, BLOCK_K=block_k, HAS_SKIP=skip is not None, HAS_TAIL=tail is not None,
        num_warps=TUNING["num_warps"] or (8 if block_m >= 4096 else 4), **pdl_launch(scores))
    return out
