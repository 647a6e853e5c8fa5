"""Exact query-key scores at given slots of a layer's key buffer, reduced over a GQA group.

A second selection stage (Quest's ``refine``) ranks the tokens of candidate pages by the exact
``q . k``: ``q (batch, q_heads, dim)`` one decode query per row, ``keys (batch, kv_heads, cap,
dim)`` the layer's key buffer (any strides; the kernel needs a unit stride on ``dim``), ``key_pos
(batch, kv_heads, cap)`` integer positions (``-1``: empty or padding) and ``slots (batch,
kv_heads, n)`` integer slots into the buffer (negative: none). Slot ``slots[b, h, j]`` is
**valid** when it lies in ``[0, cap)`` and ``key_pos`` there is ``>= 0``. Returns ``(batch,
kv_heads, n)`` float32: the unscaled ``q . k`` of the ``q_heads // kv_heads`` query heads of KV
head ``h`` with the key at that slot, reduced over those heads by ``reduce`` (``"max"`` or
``"mean"``), and ``-inf`` at invalid slots (so a top-k never picks them). ``reduce="votes"``
(TokenSelect's criterion over the given slots): each query head's softmax of its scaled scores
``q . k / sqrt(dim)`` over the row's valid slots, summed over the group.

``page > 1``: ``slots (batch, kv_heads, m)`` are page indices, and the ``n = m * page``
candidates are their pages' slots in order (candidate ``j`` is slot ``slots[..., j // page] * page
+ j % page``; a negative page gives ``page`` invalid candidates): Quest's candidate pages go in as
they come from its top-k, with no expansion launch before. :func:`pick_slots` maps a top-k over
the candidates back to slots (and appends the page being filled) in one more launch.

``slot_scores_ref`` is PyTorch in float32 (a gather of the candidates' keys and an einsum; the
keys' own dtype would round the scores to bf16, and near-ties would then order differently from
the kernel's). ``slot_scores`` is one Triton launch: program (row, KV head) x block of
``BLOCK_N`` slots loads the group's query heads once, the block's positions and keys through the
slot indices, one ``tl.dot`` accumulated in float32, the reduction and the mask, and writes the
block's scores. It replaces about fifteen PyTorch launches (index checks, two gathers, the
einsum, the reduction, the mask), which under a CUDA graph cost more than the bytes they read.
``votes`` needs each head's softmax over the whole row before any slot's vote, so it is two
launches: TokenSelect's two vote kernels (:func:`kvsift.kernels.token_votes.votes_at_slots`),
their first reading the keys through the slot indices.
"""

from __future__ import annotations

import torch

from kvsift.kernels._checks import check_group_keys
from kvsift.kernels._flash import candidate_slots, group_program
from kvsift.kernels._triton import HAS_TRITON, pdl_launch, pdl_start, tl, triton
from kvsift.kernels.token_votes import token_votes_ref, votes_at_slots

REDUCES = ("max", "mean", "votes")
# launch settings (slots per program)
TUNING = {"block_n": 64, "num_warps": 4}


def _check_page(page) -> None:
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page must be a positive int, got {page!r}")


def _check(q, keys, key_pos, slots, reduce, page=1) -> None:
    check_group_keys(q, keys, key_pos, "cap")
    _check_page(page)
    b, hk = keys.shape[:2]
    if slots.dim() != 3 or tuple(slots.shape[:2]) != (b, hk) or slots.is_floating_point():
        raise ValueError(f"slots must be integers of shape (batch, kv_heads, n) = ({b}, {hk}, n), got "
                         f"{slots.dtype} {tuple(slots.shape)}")
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def page_slots(pages: torch.Tensor, page: int) -> torch.Tensor:
    """The slots of ``pages (batch, kv_heads, m)`` (page indices, negative: none) in order:
    ``(batch, kv_heads, m * page)`` int64, ``-1`` for a negative page's ``page`` entries."""
    p = pages.to(torch.int64)
    if page == 1:
        return torch.where(p >= 0, p, -1)
    ar = torch.arange(page, device=pages.device)
    return torch.where(p[..., None] >= 0, p[..., None] * page + ar, -1).flatten(2)


def _check_pick(at, cand, page, tail, cap) -> None:
    if at.dim() != 3 or at.is_floating_point():
        raise ValueError(f"at must be integers of shape (batch, kv_heads, k), got {at.dtype} {tuple(at.shape)}")
    if cand.dim() != 3 or tuple(cand.shape[:2]) != tuple(at.shape[:2]) or cand.is_floating_point():
        raise ValueError(f"cand must be integers of shape {tuple(at.shape[:2])} + (m,), got {cand.dtype} "
                         f"{tuple(cand.shape)}")
    _check_page(page)
    if tail is not None:
        if tuple(tail.shape) != (*at.shape[:2], 1) or tail.is_floating_point():
            raise ValueError(f"tail must be integers of shape {(*at.shape[:2], 1)}, got {tail.dtype} {tuple(tail.shape)}")
        if cap is None:
            raise ValueError("tail needs cap (the buffer's slots)")


def pick_slots_ref(at: torch.Tensor, cand: torch.Tensor, page: int = 1, tail: torch.Tensor | None = None,
                   cap: int | None = None) -> torch.Tensor:
    """The slots a top-k over the candidates picked: ``at (batch, kv_heads, k)`` integer indices into
    each row's candidates (negative: none), ``cand (batch, kv_heads, m)`` the candidates as
    :func:`slot_scores` takes them (slots, or page indices with ``page > 1``). Returns ``(batch,
    kv_heads, k)`` int64 slots, ``-1`` where ``at`` is negative; with ``tail (batch, kv_heads, 1)`` a
    page index (Quest's page being filled, negative: none), ``page`` more columns: that page's
    slots, ``-1`` from ``cap`` (the buffer's slots) on. PyTorch reference of :func:`pick_slots`."""
    _check_pick(at, cand, page, tail, cap)
    slots = page_slots(cand, page)
    out = torch.where(at >= 0, slots.gather(2, at.clamp_min(0).to(torch.int64)), -1)
    if tail is not None:
        ts = page_slots(tail, page)
        out = torch.cat([out, torch.where(ts < cap, ts, -1)], dim=-1)
    return out


def slot_scores_ref(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, slots: torch.Tensor,
                    reduce: str = "max", page: int = 1) -> torch.Tensor:
    """Reference (PyTorch, float32); shapes in the module docstring."""
    _check(q, keys, key_pos, slots, reduce, page)
    slots = page_slots(slots, page)
    b, hk, cap, d = keys.shape
    n = slots.shape[2]
    g = q.shape[1] // hk
    ok = (slots >= 0) & (slots < cap)
    idx = torch.where(ok, slots, 0).to(torch.int64)
    ok &= key_pos.gather(2, idx) >= 0
    ck = keys.gather(2, idx[..., None].expand(b, hk, n, d)).float()          # (b, hk, n, d)
    if reduce == "votes":   # TokenSelect's votes over the gathered slots (the invalid ones: no candidates)
        return token_votes_ref(q.float(), ck, torch.where(ok, 0, -1), torch.full((b,), n, device=q.device),
                               "group", float("-inf"))
    s = torch.einsum("bhgd,bhnd->bhgn", q.float().reshape(b, hk, g, d), ck)
    s = s.amax(2) if reduce == "max" else s.mean(2)
    return s.masked_fill(~ok, float("-inf"))


if HAS_TRITON:

    @triton.jit
    def _slot_scores_kernel(q_ptr, k_ptr, kp_ptr, sl_ptr, out_ptr, N, CAP,
                            sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sp_b, sp_h, sp_n, ss_b, ss_h, ss_n,
                            so_b, so_h, so_n,
                            HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MEAN: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr, PAGE: tl.constexpr = 1,
                            PDL: tl.constexpr = False):
        pdl_start(PDL)
        # program (row, kv head) x block of BLOCK_N slots; q: the group's (G_P, BLOCK_D) tile
        b, h, offs_g, offs_d, mask_g, mask_d, q = group_program(q_ptr, sq_b, sq_h, sq_d, HK, G, G_P, D, BLOCK_D, UPCAST)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = offs_n < N
        slot = candidate_slots(sl_ptr + b * ss_b + h * ss_h, ss_n, offs_n, in_range, PAGE)
        ok = in_range & (slot >= 0) & (slot < CAP)
        kpos = tl.load(kp_ptr + b * sp_b + h * sp_h + slot * sp_n, mask=ok, other=-1)
        ok = ok & (kpos >= 0)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + slot[:, None] * sk_n + offs_d[None, :],
                    mask=ok[:, None] & mask_d[None, :], other=0.0)                  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))                                              # (G_P, BLOCK_N) fp32
        if MEAN:
            r = tl.sum(tl.where(mask_g[:, None], s, 0.0), axis=0) / G
        else:
            r = tl.max(tl.where(mask_g[:, None], s, float("-inf")), axis=0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_n * so_n, tl.where(ok, r, float("-inf")), mask=in_range)


    @triton.jit
    def _pick_slots_kernel(at_ptr, c_ptr, t_ptr, out_ptr, K, W, CAP, sa_b, sa_h, sa_k, sc_b, sc_h, sc_n,
                           st_b, st_h, so_b, so_h, so_k, HK: tl.constexpr, PAGE: tl.constexpr,
                           TAIL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # program (row, kv head) x block of BLOCK output columns: W = K (+ PAGE with the tail page)
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        body = offs < K
        a = tl.load(at_ptr + b * sa_b + h * sa_h + offs * sa_k, mask=body, other=-1).to(tl.int64)
        slot = candidate_slots(c_ptr + b * sc_b + h * sc_h, sc_n, a, body & (a >= 0), PAGE)
        if TAIL:
            tp = tl.load(t_ptr + b * st_b + h * st_h).to(tl.int64)
            ts = tp * PAGE + (offs - K)
            slot = tl.where(body, slot, tl.where((tp >= 0) & (ts < CAP), ts, -1))
        tl.store(out_ptr + b * so_b + h * so_h + offs * so_k, slot, mask=offs < W)


def pick_slots(at: torch.Tensor, cand: torch.Tensor, page: int = 1, tail: torch.Tensor | None = None,
               cap: int | None = None) -> torch.Tensor:
    """Triton kernel, one launch; same arguments and result as :func:`pick_slots_ref` (where the
    refine stage took a clamp, a gather, a mask, the tail page's slots and a concatenation)."""
    if not HAS_TRITON:
        raise RuntimeError("pick_slots needs Triton (pip install triton); use pick_slots_ref")
    _check_pick(at, cand, page, tail, cap)
    b, hk, k = at.shape
    w = k + (page if tail is not None else 0)
    out = torch.empty(b, hk, w, dtype=torch.int64, device=at.device)
    if b * hk == 0 or w == 0:
        return out
    block = min(1024, max(16, triton.next_power_of_2(w)))
    t = tail if tail is not None else at
    _pick_slots_kernel[(b * hk, triton.cdiv(w, block))](
        at, cand, t, out, k, w, cap if cap is not None else 0, *at.stride(), *cand.stride(),
        t.stride(0), t.stride(1), *out.stride(), HK=hk, PAGE=page, TAIL=tail is not None, BLOCK=block,
        num_warps=4, **pdl_launch(at))
    return out


def slot_scores(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, slots: torch.Tensor,
                reduce: str = "max", page: int = 1) -> torch.Tensor:
    """Triton kernel, one launch (two for ``votes``); same arguments and result as
    :func:`slot_scores_ref` (float32 accumulation of the keys' dtype: equal to the reference within
    rounding)."""
    if not HAS_TRITON:
        raise RuntimeError("slot_scores needs Triton (pip install triton); use slot_scores_ref")
    _check(q, keys, key_pos, slots, reduce, page)
    if keys.stride(-1) != 1:
        raise ValueError("keys need a unit stride on dim")
    if reduce == "votes":
        return votes_at_slots(q, keys, key_pos, slots, page=page)
    b, hk, cap, d = keys.shape
    n = slots.shape[2] * page
    g = q.shape[1] // hk
    out = torch.empty(b, hk, n, dtype=torch.float32, device=q.device)
    if b == 0 or n == 0:
        return out
    block_n = TUNING["block_n"]
    upcast = q.device.type != "cuda"
    _slot_scores_kernel[(b * hk, triton.cdiv(n, block_n))](
        q, keys, key_pos, slots, out, n, cap, *q.stride(), keys.stride(0), keys.stride(1), keys.stride(2),
        *key_pos.stride(), *slots.stride(), *out.stride(),
        HK=hk, G=g, G_P=max(16, triton.next_power_of_2(g)), D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_N=block_n, MEAN=reduce == "mean", IEEE=upcast or q.dtype == torch.float32, UPCAST=upcast,
        PAGE=page, num_warps=TUNING["num_warps"], **pdl_launch(q))
    return out
