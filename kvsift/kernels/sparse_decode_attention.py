"""Decode attention over selected KV slots, read in place through an index table.

q ``(batch, q_heads, head_dim)`` is one new token per sequence; ``k_cache``/``v_cache``
``(batch, kv_heads, capacity, head_dim)`` are the cache buffers (any strides, last dim unit-stride
for the Triton kernel); ``slot_idx (batch, kv_heads, n_sel)`` int32/int64 are the slots each KV
head attends to (``-1`` = unused, skipped; duplicates count twice). The ``group = q_heads //
kv_heads`` query heads of a KV head all attend to that head's slots. Returns ``(batch, q_heads,
head_dim)`` in q's dtype; a (batch, kv_head) with no valid slot gives zeros.

Masking by position (optional, the engine's decode path): with ``key_pos (batch, kv_heads,
capacity)`` int32 token positions (``-1`` = empty or padding) and ``query_pos (batch,)``, a slot is
attended only if ``0 <= key_pos <= query_pos`` (and ``key_pos > query_pos - window`` with a sliding
``window``), and slot indices past the capacity are skipped: no index table needs building or
masking per layer. ``slot_idx=None`` stands for every slot ``0 .. capacity-1``.

``slot_count (batch, kv_heads)`` (optional) bounds each head's table: only its first
``slot_count[b, h]`` entries are read (a ragged table whose rows hold their valid entries first:
the kernel's splits past a head's count exit at once, so short heads cost nothing).

``sparse_decode_attention_ref`` gathers and runs a float32 softmax (PyTorch). The Triton version
never copies KV: each program walks a contiguous part of the index table (split-K), gathers the
K/V rows it points to straight from the cache, keeps an online softmax for all ``group`` query
heads at once (one ``tl.dot`` per block), and writes a partial output plus its log-sum-exp; a
second small kernel merges the splits. ``kvsift.kernels.dispatch.sparse_decode_attention`` picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsift.kernels._flash import group_program, load_kv, online_softmax_step, store_split
from kvsift.kernels._triton import HAS_TRITON, pdl_launch, pdl_start, sm_count, tl, triton


def _check_pos(k_cache, key_pos, query_pos, window) -> None:
    if (key_pos is None) != (query_pos is None):
        raise ValueError("key_pos and query_pos go together")
    if key_pos is None:
        if window is not None:
            raise ValueError("a sliding window needs key_pos and query_pos")
        return
    if key_pos.shape != k_cache.shape[:3]:
        raise ValueError(f"key_pos must be (batch, kv_heads, capacity) = {tuple(k_cache.shape[:3])}, "
                         f"got {tuple(key_pos.shape)}")
    if query_pos.shape != (k_cache.shape[0],):
        raise ValueError(f"query_pos must be (batch,) = ({k_cache.shape[0]},), got {tuple(query_pos.shape)}")
    if key_pos.dtype.is_floating_point or query_pos.dtype.is_floating_point:
        raise TypeError("key_pos and query_pos must be integer tensors")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")


def _check_count(slot_idx, slot_count) -> None:
    if slot_count is None:
        return
    if slot_idx is None:
        raise ValueError("slot_count bounds a slot table: it needs slot_idx")
    if tuple(slot_count.shape) != tuple(slot_idx.shape[:2]) or slot_count.is_floating_point():
        raise ValueError(f"slot_count must be integers of shape (batch, kv_heads) = {tuple(slot_idx.shape[:2])}, "
                         f"got {slot_count.dtype} {tuple(slot_count.shape)}")
    if slot_count.device != slot_idx.device:
        raise ValueError("slot_count and slot_idx must be on one device")


def _check(q, k_cache, v_cache, slot_idx, scale, page: int = 1) -> None:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page must be a positive int, got {page!r}")
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, q_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (batch, kv_heads, capacity, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    kb, hk, _, kd = k_cache.shape
    if kb != b or kd != d:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head_dim")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q_heads ({hq}) must be a multiple of kv_heads ({hk})")
    if slot_idx is None:
        if page != 1:
            raise ValueError("slot_idx=None (every slot) takes page=1")
    else:
        if slot_idx.dim() != 3 or slot_idx.shape[:2] != (b, hk):
            raise ValueError(f"slot_idx must be (batch={b}, kv_heads={hk}, n_sel), got shape {tuple(slot_idx.shape)}")
        if slot_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"slot_idx must be int32 or int64, got {slot_idx.dtype}")
    if not (q.device == k_cache.device == v_cache.device) or (slot_idx is not None and slot_idx.device != q.device):
        raise ValueError("q, k_cache, v_cache and slot_idx must be on one device")
    if not (q.is_floating_point() and k_cache.is_floating_point() and v_cache.is_floating_point()):
        raise TypeError("q, k_cache and v_cache must be floating point")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def sparse_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_idx: torch.Tensor | None, scale: float, page: int = 1,
                                num_splits: int | None = None, return_lse: bool = False,
                                key_pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
                                window: int | None = None, slot_count: torch.Tensor | None = None):
    """Reference: gather the selected K/V, float32 softmax. Shapes as in the module docstring.
    Without ``key_pos``, slot indices must be ``-1`` or inside ``[0, capacity)``; with it, slots
    past the capacity and slots whose position fails the mask are skipped. ``page > 1``: each entry
    of ``slot_idx`` is a page index standing for slots ``p*page .. p*page+page-1``. ``return_lse``:
    also return the log-sum-exp of the scaled scores ``(batch, q_heads)`` float32 (natural log,
    ``-inf`` where no slot is valid), to merge attention over disjoint KV sets
    (:func:`merge_attention`). ``num_splits`` is the Triton kernel's launch setting (ignored here)."""
    _check(q, k_cache, v_cache, slot_idx, scale, page)
    _check_pos(k_cache, key_pos, query_pos, window)
    _check_count(slot_idx, slot_count)
    b, hq, d = q.shape
    hk, cap = k_cache.shape[1], k_cache.shape[2]
    shared = k_cache.stride(0) == 0 and v_cache.stride(0) == 0 and (key_pos is None or key_pos.stride(0) == 0)
    if slot_idx is None and (b == 1 or shared):
        return _shared_kv_ref(q, k_cache[:1], v_cache[:1], None if key_pos is None else key_pos[:1], query_pos,
                              scale, window, return_lse, finite=shared)
    if slot_idx is None:
        idx = torch.arange(cap, device=q.device).expand(b, hk, cap)
    else:
        idx = slot_idx.to(torch.int64)
        if slot_count is not None:
            idx = torch.where(torch.arange(idx.shape[2], device=idx.device) < slot_count[..., None], idx, -1)
    if page > 1:
        ar = torch.arange(page, device=idx.device)
        idx = torch.where(idx[..., None] >= 0, idx[..., None] * page + ar, -1).flatten(2)
    if key_pos is not None:
        idx = torch.where(idx < cap, idx, -1)
        kp = torch.where(idx >= 0, key_pos.gather(2, idx.clamp(min=0)).to(torch.int64), -1)
        idx = torch.where(_visible(kp, query_pos.to(torch.int64)[:, None, None], window), idx, -1)
    valid = idx >= 0
    if bool((idx >= cap).any()):
        raise IndexError(f"slot_idx has entries >= capacity ({cap})")
    if slot_idx is None:  # every slot, in order: the buffers themselves, nothing gathered (masked
        # slots' values zeroed: an empty slot of a static buffer holds whatever memory it got)
        k, v = k_cache.float(), torch.where(valid[..., None], v_cache.float(), 0.0)
    else:
        k, v = slot_rows(k_cache, v_cache, idx=idx.clamp(min=0))     # (b, hk, s, d)
        k, v = k.float(), v.float()
    qg = q.float().reshape(b, hk, hq // hk, d)                        # (b, hk, g, d)
    w = torch.matmul(qg, k.transpose(-1, -2)) * scale                 # (b, hk, g, s)
    w = w.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(w, dim=-1).nan_to_num(0.0)                      # rows with no valid slot -> 0
    out = torch.matmul(p, v).reshape(b, hq, d).to(q.dtype)            # (b, hq, d)
    if return_lse:
        return out, torch.logsumexp(w, dim=-1).reshape(b, hq)
    return out


def slot_rows(*caches: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows ``idx (batch, kv_heads, s)`` (int64, every entry in range) of each ``(batch,
    kv_heads, slots, head_dim)`` cache: ``(batch, kv_heads, s, head_dim)`` copies. Indexed by row
    (one offset per ``head_dim`` values), not by ``gather`` with the index expanded to every value:
    2.3-3.6x faster on the CPU (bf16 and fp32, 1-32 kv heads), the same values."""
    b, hk = idx.shape[:2]
    bi = torch.arange(b, device=idx.device)[:, None, None]
    hi = torch.arange(hk, device=idx.device)[None, :, None]
    return tuple(c[bi, hi, idx] for c in caches)


def _visible(kp: torch.Tensor, qp: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys at positions ``kp`` (-1: none) a query at ``qp`` sees (broadcast int64 tensors):
    not in its future, and inside the sliding ``window`` when there is one."""
    ok = (kp >= 0) & (kp <= qp)
    if window is not None:
        ok &= kp > qp - window
    return ok


def _shared_kv_ref(q, k1, v1, kpos1, query_pos, scale, window, return_lse, finite=False):
    """The reference over every slot of KV that every row shares (``k1``/``v1 (1, kv_heads, n, d)``:
    one row, or a batch-expanded view's one row, e.g. a reused context read by reference): the rows'
    query heads become one batch of queries against the one copy, so nothing is gathered or copied
    per row. Same result as the general path. ``finite``: every slot's value is finite, empty ones
    included (a shared view, e.g. a context's KV: its holes are zeros), so none is zeroed here."""
    b, hq, d = q.shape
    hk = k1.shape[1]
    g = hq // hk
    qg = q.float().reshape(b, hk, g, d).transpose(0, 1).reshape(hk, b * g, d)      # (hk, b*g, d)
    w = torch.matmul(qg, k1[0].float().transpose(-1, -2)) * scale                   # (hk, b*g, n)
    v = v1[0].float()
    if kpos1 is None:
        out, lse = softmax_weighted_sum(w, v, return_lse)                           # (hk, b*g, d)
    else:
        kp = kpos1[0].to(torch.int64)[:, None, :]                                   # (hk, 1, n)
        qp = query_pos.to(torch.int64).repeat_interleave(g)[None, :, None]          # (1, b*g, 1)
        w = w.masked_fill(~_visible(kp, qp, window), float("-inf"))
        if finite:
            out, lse = softmax_weighted_sum(w, v, return_lse)
        else:   # an empty slot of a static buffer may hold any bits
            out, lse = weighted_sum_over_any_bits(w, v, kp.transpose(1, 2) >= 0, return_lse)
    out = out.reshape(hk, b, g, d).transpose(0, 1).reshape(b, hq, d).to(q.dtype)
    if return_lse:
        return out, lse.reshape(hk, b, g).transpose(0, 1).reshape(b, hq)
    return out


def softmax_weighted_sum(w: torch.Tensor, v: torch.Tensor,
                         lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(w) @ v`` and ``logsumexp(w)`` over the last axis of scores ``w (..., n)`` (values
    ``v (..., n, d)``) from one ``exp`` pass: ``(out (..., d), lse (...))``, ``out`` zero and
    ``lse`` ``-inf`` on rows with no finite score (every slot masked); ``lse=False``: None for it."""
    m = w.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(w - m)
    tot = e.sum(-1, keepdim=True)
    out = torch.matmul(e, v) / torch.where(tot > 0, tot, torch.ones_like(tot))
    return out, (m + torch.log(tot)).squeeze(-1) if lse else None


def weighted_sum_over_any_bits(w: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                               lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`softmax_weighted_sum` where the values outside ``keep`` (bool, broadcast against ``v``:
    empty slots, whose scores in ``w`` are ``-inf``) may hold any bits. Such a slot's weight is
    exactly 0, so a finite value there adds exactly nothing: on the CPU the values are read as they
    are and zeroed (a pass over all of them: 4% of a 0.5B model's decode step over a 16k-token
    sentencekv fetch, 13% of a KIVI one) only when the result is not finite (0 * inf is NaN);
    elsewhere (no host sync on CUDA) zeroed first. Bit for bit the result over zeroed values."""
    if v.device.type == "cpu":
        out, l_ = softmax_weighted_sum(w, v, lse)
        if bool(torch.isfinite(out).all()):
            return out, l_
    return softmax_weighted_sum(w, torch.where(keep, v, 0.0), lse)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact attention over the union of disjoint KV sets from per-set ``(out (batch, q_heads,
    head_dim), lse (batch, q_heads))`` pairs (softmax renormalised by log-sum-exp). Sets with no
    valid slot (``lse = -inf``) weigh 0; a row empty in every set gives zeros. Pure PyTorch, no
    host sync."""
    lse = torch.stack([p[1] for p in parts])                          # (n, b, hq)
    m = lse.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)                                            # (n, b, hq)
    tot = w.sum(0)
    acc = sum(p[0].float() * w[i][..., None] for i, p in enumerate(parts))
    return (acc / torch.where(tot > 0, tot, torch.ones_like(tot))[..., None]).to(parts[0][0].dtype)


if HAS_TRITON:

    @triton.jit
    def _sparse_decode_split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, po_ptr, plse_ptr,
                                    kp_ptr, qp_ptr, CAP, WINDOW, sp_b, sp_h, sp_c,
                                    cnt_ptr, sc_b, sc_h,
                                    S, split_size, qk_scale,
                                    sq_b, sq_h, sq_d,
                                    sk_b, sk_h, sk_c,
                                    sv_b, sv_h, sv_c,
                                    si_b, si_h, si_s,
                                    so_b, so_h,
                                    spo_bh, spo_s,
                                    HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                    PAGE: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
                                    UPCAST: tl.constexpr, ALL: tl.constexpr, MASKPOS: tl.constexpr,
                                    HAS_CNT: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # S counts virtual slots (n_sel * PAGE); virtual slot j is cache slot
        # idx[j // PAGE] * PAGE + j % PAGE (PAGE == 1: idx[j]).
        pid_s = tl.program_id(1)
        b, h, offs_g, offs_d, mask_g, mask_d, q = group_program(q_ptr, sq_b, sq_h, sq_d, HK, G, G_P, D, BLOCK_D,
                                                                UPCAST)   # q: (G_P, BLOCK_D)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        i_base = idx_ptr + b * si_b + h * si_h
        if MASKPOS:
            kp_base = kp_ptr + b * sp_b + h * sp_h
            qpos = tl.load(qp_ptr + b).to(tl.int64)
        m_i = tl.full((G_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_P,), tl.float32)
        acc = tl.zeros((G_P, BLOCK_D), tl.float32)
        start = pid_s * split_size
        stop = tl.minimum(start + split_size, S)
        if HAS_CNT:  # this head's table holds its valid entries first: stop at its count
            stop = tl.minimum(stop, tl.load(cnt_ptr + b * sc_b + h * sc_h).to(tl.int32) * PAGE)
        for it in range(start, stop, BLOCK_S):
            offs_s = it + tl.arange(0, BLOCK_S)
            in_range = offs_s < stop
            if ALL:
                slot = offs_s.to(tl.int64)
                valid = in_range
            elif PAGE == 1:
                slot = tl.load(i_base + offs_s * si_s, mask=in_range, other=-1).to(tl.int64)
                valid = slot >= 0
            else:
                pidx = tl.load(i_base + (offs_s // PAGE) * si_s, mask=in_range, other=-1).to(tl.int64)
                valid = pidx >= 0
                slot = pidx * PAGE + offs_s % PAGE
            if MASKPOS:  # positions: skip empty, padding, future and out-of-window slots
                valid = valid & (slot < CAP)
                kpos = tl.load(kp_base + tl.where(valid, slot, 0) * sp_c, mask=valid, other=-1).to(tl.int64)
                valid = valid & (kpos >= 0) & (kpos <= qpos)
                if WINDOW > 0:
                    valid = valid & (kpos > qpos - WINDOW)
            slot = tl.where(valid, slot, 0)
            k, v = load_kv(k_base, v_base, slot, valid, sk_c, sv_c, offs_d, mask_d, UPCAST)  # (BLOCK_S, BLOCK_D)
            m_i, l_i, acc = online_softmax_step(q, k, v, valid[None, :], qk_scale, m_i, l_i, acc, IEEE)
        store_split(out_ptr, po_ptr, plse_ptr, m_i, l_i, acc, b, h, pid_s, offs_g, offs_d, mask_g, mask_d,
                    so_b, so_h, spo_bh, spo_s, HK, G, DIRECT)

    @triton.jit
    def _merge_splits_kernel(po_ptr, plse_ptr, out_ptr, lse_ptr, NS, spo_bh, spo_s, so_bh,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, NS_P: tl.constexpr, CHUNK: tl.constexpr,
                             WRITE_LSE: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # the splits' lse at once (NS_P floats), their partial outputs CHUNK splits at a time: a
        # (NS_P, BLOCK_D) tile of hundreds of splits would spill (measured: 33 us per layer at 264
        # splits on the H200, for a few MiB); a program per row and block of channels (one per row
        # left a 32-row batch on 32 multiprocessors)
        row = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, NS_P)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)   # this program's channels
        md = offs_d < D
        lse = tl.load(plse_ptr + row * NS + offs_s, mask=offs_s < NS, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tot = tl.sum(tl.exp2(lse - m_safe), axis=0)                           # 0 for empty splits
        o = tl.zeros((BLOCK_D,), tl.float32)
        offs_c = tl.arange(0, CHUNK)
        for s0 in range(0, NS, CHUNK):
            sc = s0 + offs_c
            mc = sc < NS
            w = tl.exp2(tl.load(plse_ptr + row * NS + sc, mask=mc, other=float("-inf")) - m_safe)
            po = tl.load(po_ptr + row * spo_bh + sc[:, None] * spo_s + offs_d[None, :],
                         mask=mc[:, None] & md[None, :], other=0.0)
            o += tl.sum(po * w[:, None], axis=0)
        o = o / tl.where(tot > 0.0, tot, 1.0)
        tl.store(out_ptr + row * so_bh + offs_d, o.to(out_ptr.dtype.element_ty), mask=md)
        if WRITE_LSE:  # natural-log lse of the whole row (-inf when no slot was valid), by its first program
            if tl.program_id(1) == 0:
                lse_row = tl.where(tot > 0.0, (m_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0))) * 0.6931471805599453,
                                   float("-inf"))
                tl.store(lse_ptr + row, lse_row)


_LOG2E = 1.4426950408889634
# launch settings of the Triton kernels (bench/gpu_decode.py --tune sweeps them)
TUNING = {"block_s": 64, "num_warps": 4, "num_stages": 2, "splits_per_sm": 2}


def plan_splits(batch: int, kv_heads: int, n_sel: int, block_s: int, device: torch.device,
                num_splits: int | None = None, splits_per_sm: int | None = None, min_blocks: int = 1,
                floor_per_sm: int = 1) -> tuple[int, int]:
    """``(num_splits, split_size)``: enough programs for about ``splits_per_sm`` (default: this
    kernel's tuning, two) waves of the GPU's multiprocessors, each split a whole number of
    ``block_s`` blocks; with ``min_blocks``, splits of at least that many blocks, unless that leaves
    fewer than ``floor_per_sm`` programs per multiprocessor. No Triton needed (a CPU test plans)."""
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    n_blocks = max(1, cdiv(n_sel, block_s))
    if num_splits is None:
        rows, sms = max(1, batch * kv_heads), sm_count(device)
        num_splits = cdiv((splits_per_sm or TUNING["splits_per_sm"]) * sms, rows)
        if min_blocks > 1:
            num_splits = min(num_splits, max(n_blocks // min_blocks, cdiv(floor_per_sm * sms, rows)))
    num_splits = max(1, min(int(num_splits), n_blocks))
    split_size = cdiv(n_blocks, num_splits) * block_s
    return cdiv(max(n_sel, 1), split_size), split_size


@dataclass
class SplitLaunch:
    """Launch plan and buffers of a split-K decode kernel over ``s`` slots per (row, KV head):
    ``out (batch, q_heads, dim)``, ``lse (batch, q_heads)`` (only with ``return_lse``), and the
    per-split partials ``po (batch * q_heads, splits, dim)`` / ``plse`` that :meth:`finish` merges;
    ``direct``: one split and no lse, so the kernel writes ``out`` itself."""

    out: torch.Tensor
    lse: torch.Tensor
    po: torch.Tensor
    plse: torch.Tensor
    spo_bh: int
    spo_s: int
    splits: int
    split_size: int
    block_d: int
    block_s: int
    g_p: int
    upcast: bool
    ieee: bool
    direct: bool
    return_lse: bool

    @classmethod
    def plan(cls, q: torch.Tensor, kv_heads: int, s: int, num_splits: int | None, return_lse: bool,
             block_s: int | None = None, splits_per_sm: int | None = None, min_blocks: int = 1,
             floor_per_sm: int = 1) -> "SplitLaunch":
        b, hq, d = q.shape
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, dtype=torch.float32, device=q.device) if return_lse else out
        block_d = max(16, triton.next_power_of_2(d))
        if block_s is None:
            block_s = TUNING["block_s"] if block_d <= 128 else TUNING["block_s"] // 2
        ns, split_size = plan_splits(b, kv_heads, s, block_s, q.device, num_splits, splits_per_sm, min_blocks,
                                     floor_per_sm)
        upcast = q.device.type != "cuda"  # TRITON_INTERPRET=1 on CPU tensors
        direct = ns == 1 and not return_lse  # else the lse comes from the merge kernel
        if direct:
            po = plse = out  # unused
            spo_bh = spo_s = 0
        else:
            po = torch.empty(b * hq, ns, d, dtype=torch.float32, device=q.device)
            plse = torch.empty(b * hq, ns, dtype=torch.float32, device=q.device)
            spo_bh, spo_s = po.stride(0), po.stride(1)
        return cls(out, lse, po, plse, spo_bh, spo_s, ns, split_size, block_d, block_s,
                   max(16, triton.next_power_of_2(hq // kv_heads)), upcast, upcast or q.dtype == torch.float32,
                   direct, return_lse)

    def finish(self):
        """Merge the splits (unless the kernel wrote ``out`` directly); ``out`` or ``(out, lse)``."""
        out = self.out
        if not self.direct:
            b, hq, d = out.shape
            bd = min(self.block_d, 32)   # channels per merge program
            _merge_splits_kernel[(b * hq, triton.cdiv(d, bd))](
                self.po, self.plse, out, self.lse, self.splits, self.spo_bh, self.spo_s, out.stride(1), D=d,
                BLOCK_D=bd, NS_P=triton.next_power_of_2(self.splits),
                CHUNK=min(16, triton.next_power_of_2(self.splits)), WRITE_LSE=self.return_lse, num_warps=2,
                **pdl_launch(out))
        return (out, self.lse) if self.return_lse else out


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_idx: torch.Tensor | None, scale: float, page: int = 1,
                            num_splits: int | None = None, return_lse: bool = False,
                            key_pos: torch.Tensor | None = None, query_pos: torch.Tensor | None = None,
                            window: int | None = None, slot_count: torch.Tensor | None = None):
    """Triton kernel; same arguments and result as :func:`sparse_decode_attention_ref`
    (``num_splits`` overrides the split-K heuristic). Out-of-range slot indices are not checked
    here (that would need a host sync); the reference checks them."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_decode_attention needs Triton (pip install triton); use sparse_decode_attention_ref")
    _check(q, k_cache, v_cache, slot_idx, scale, page)
    _check_pos(k_cache, key_pos, query_pos, window)
    _check_count(slot_idx, slot_count)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit stride on head_dim")
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    g = hq // hk
    cap = k_cache.shape[2]
    s = cap if slot_idx is None else slot_idx.shape[2] * page
    idx = slot_idx if slot_idx is not None else q          # unused pointer when ALL
    si = slot_idx.stride() if slot_idx is not None else (0, 0, 0)
    maskpos = key_pos is not None
    kp = key_pos if maskpos else q
    qp = query_pos if maskpos else q
    sp = key_pos.stride() if maskpos else (0, 0, 0)
    cnt = slot_count if slot_count is not None else q
    sc = slot_count.stride() if slot_count is not None else (0, 0)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share a dtype for the Triton kernel, got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if b == 0:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        return (out, torch.empty(b, hq, dtype=torch.float32, device=q.device)) if return_lse else out
    L = SplitLaunch.plan(q, hk, s, num_splits, return_lse)
    _sparse_decode_split_kernel[(b * hk, L.splits)](
        q, k_cache, v_cache, idx, L.out, L.po, L.plse,
        kp, qp, cap, int(window or 0), sp[0], sp[1], sp[2],
        cnt, sc[0], sc[1],
        s, L.split_size, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        si[0], si[1], si[2],
        L.out.stride(0), L.out.stride(1),
        L.spo_bh, L.spo_s,
        HK=hk, G=g, G_P=L.g_p, D=d, BLOCK_D=L.block_d, BLOCK_S=L.block_s, PAGE=page, DIRECT=L.direct, IEEE=L.ieee,
        UPCAST=L.upcast, ALL=slot_idx is None, MASKPOS=maskpos, HAS_CNT=slot_count is not None,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"], **pdl_launch(q),
    )
    return L.finish()
