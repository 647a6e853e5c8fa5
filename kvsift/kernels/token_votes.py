"""TokenSelect's soft votes: how much the query heads of a decode step want each cached token.

``q (batch, q_heads, dim)`` is one decode query per row; ``keys (batch, kv_heads, n, dim)`` the
layer's key buffer (any strides; the kernel needs a unit stride on ``dim``), ``key_pos (batch,
kv_heads, n)`` integer positions (``-1``: empty or padding) and ``limit (batch,)`` integers: slot
``j`` of row ``b`` is a **candidate** when ``key_pos >= 0`` and ``j < limit[b]`` (the slots from
``limit`` on are the local window, attended anyway). Each query head takes the softmax of its
scaled scores ``q . k`` over its KV head's candidates, and the heads vote: the probabilities are
summed over the query heads of each GQA group (``vote="group"``) or over all query heads
(``"layer"``: the same votes for every KV head). Returns ``(batch, kv_heads, n)`` float32, with
``fill`` at every slot that is not a candidate (a head or row without candidates votes 0).

``skip (batch,)`` bool (optional): rows whose votes are not needed this step (TokenSelect's
selection cache keeps their previous selection). The reference computes every row; the kernels
return at once for those rows and leave their output unwritten, so its values there are
unspecified. The flag is read on the device: under a CUDA graph a reused step costs two launches
that do nothing instead of a pass over every key.

``token_votes_ref`` is PyTorch (the scores in the keys' dtype, as ``torch.matmul`` returns them,
then a float32 softmax). ``token_votes`` is two Triton kernels: the first scores blocks of tokens
for the ``group`` query heads at once (one ``tl.dot`` per block, accumulated in float32: for bf16
keys its scores are more precise than the reference's, which rounds them to bf16), writes them in
base-2 units and keeps each program's running max and sum of exponentials per query head; the
second merges those per row and head, and turns each score into its probability, summed over the
group. Keys are read once; the float32 scores (``group`` per token) are written once and read once.
"""

from __future__ import annotations

import torch

from kvsift.kernels._checks import check_group_keys
from kvsift.kernels._flash import candidate_slots, load_group_query
from kvsift.kernels._triton import HAS_TRITON, pdl_launch, pdl_start, tl, triton

VOTES = ("group", "layer")
_LOG2E = 1.4426950408889634
# launch settings (tokens per block of the scoring kernel, at most this many programs per row; its
# software-pipelining stages, None: Triton's default). Swept on an H100 (bench/gpu_decode.py --tune
# --tune-kernels votes, 2026-12-05, 128k): at 4 warps every block_n of 32-128 and max_programs of
# 64-256 took 0.110-0.120 ms at batch 1 (these 0.111), 8 warps 7-38% more; num_stages not swept yet
TUNING = {"block_n": 64, "max_programs": 64, "block_v": 512, "num_warps": 4, "num_stages": None}


def _check(q, keys, key_pos, limit, vote, skip) -> None:
    check_group_keys(q, keys, key_pos, "n")
    b = keys.shape[0]
    if tuple(limit.shape) != (b,) or limit.is_floating_point():
        raise ValueError(f"limit must be integers of shape (batch,) = ({b},), got {limit.dtype} {tuple(limit.shape)}")
    if skip is not None and (tuple(skip.shape) != (b,) or skip.dtype != torch.bool):
        raise ValueError(f"skip must be a bool tensor of shape (batch,) = ({b},)")
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")


def candidates(key_pos: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, n)`` bool: slots holding a token (``key_pos >= 0``) before ``limit[b]``."""
    slot = torch.arange(key_pos.shape[2], device=key_pos.device)
    return (key_pos >= 0) & (slot < limit.to(key_pos.device)[:, None, None])


def token_votes_ref(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, limit: torch.Tensor,
                    vote: str = "group", fill: float = -1.0, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (PyTorch); shapes in the module docstring. ``skip`` is accepted and ignored (every
    row is computed)."""
    _check(q, keys, key_pos, limit, vote, skip)
    b, hk, n, d = keys.shape
    g = q.shape[1] // hk
    cand = candidates(key_pos, limit)
    logits = torch.matmul(q.reshape(b, hk, g, d), keys.transpose(-1, -2)).float().mul_(d ** -0.5)   # (b, hk, g, n)
    logits.masked_fill_(~cand[:, :, None], float("-inf"))
    votes = torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(2)                          # (b, hk, n)
    if vote == "layer":
        votes = votes.sum(1, keepdim=True).expand(b, hk, n)
    return votes.masked_fill(~cand, fill)


if HAS_TRITON:

    @triton.jit
    def _scores_kernel(q_ptr, k_ptr, kp_ptr, lim_ptr, skip_ptr, sl_ptr, sc_ptr, st_ptr, N, CAP, PER_PROG, NPROG,
                       qk_scale, sl, sx,
                       sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sp_b, sp_h, sp_n, ss_b, ss_h, ss_n,
                       HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       HAS_SKIP: tl.constexpr, SLOTS: tl.constexpr, PAGE: tl.constexpr = 1,
                       PDL: tl.constexpr = False):
        pdl_start(PDL)
        # program (row, kv head) x part: scores of PER_PROG tokens for the G query heads, in base-2
        # units (-inf at non-candidates), into sc (b * HK, G, N); its max and sum of exp2 per head
        # into st (b * HK, NPROG, 2, G_P). SLOTS: token j is the key at slot sl[b, h, j] of a buffer
        # of CAP slots (a candidate when that slot is in range and holds a token; limit unused); with
        # PAGE > 1, sl holds page indices and token j is slot sl[b, h, j // PAGE] * PAGE + j % PAGE
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = (pid_bh // HK).to(tl.int64)
        h = (pid_bh % HK).to(tl.int64)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs_g = tl.arange(0, G_P)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < G
        mask_d = offs_d < D
        q = load_group_query(q_ptr, b, h, sq_b, sq_h, sq_d, offs_g, offs_d, mask_g, mask_d, G, UPCAST)  # (G_P, BLOCK_D)
        if not SLOTS:   # (a constexpr branch: lim exists only where it is read)
            lim = tl.load(lim_ptr + b * sl).to(tl.int64)
        k_base = k_ptr + b * sk_b + h * sk_h
        p_base = kp_ptr + b * sp_b + h * sp_h
        s_base = sc_ptr + pid_bh.to(tl.int64) * G * N
        m_i = tl.full((G_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_P,), tl.float32)
        start = pid_n * PER_PROG
        stop = tl.minimum(start + PER_PROG, N)
        for it in range(start, stop, BLOCK_N):
            offs_n = it + tl.arange(0, BLOCK_N)
            in_range = offs_n < stop
            if SLOTS:
                slot = candidate_slots(sl_ptr + b * ss_b + h * ss_h, ss_n, offs_n, in_range, PAGE)
                ok = in_range & (slot >= 0) & (slot < CAP)
                kpos = tl.load(p_base + slot * sp_n, mask=ok, other=-1)
                cand = ok & (kpos >= 0)
                k = tl.load(k_base + slot[:, None] * sk_n + offs_d[None, :], mask=cand[:, None] & mask_d[None, :],
                            other=0.0)                                             # (BLOCK_N, BLOCK_D)
            else:
                kpos = tl.load(p_base + offs_n * sp_n, mask=in_range, other=-1)
                cand = in_range & (kpos >= 0) & (offs_n < lim)
                k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :],
                            mask=in_range[:, None] & mask_d[None, :], other=0.0)   # (BLOCK_N, BLOCK_D)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(cand[None, :], s * qk_scale, float("-inf"))               # (G_P, BLOCK_N)
            tl.store(s_base + offs_g[:, None] * N + offs_n[None, :], s, mask=mask_g[:, None] & in_range[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        st = st_ptr + (pid_bh.to(tl.int64) * NPROG + pid_n) * 2 * G_P
        tl.store(st + offs_g, m_i)
        tl.store(st + G_P + offs_g, l_i)

    @triton.jit
    def _votes_kernel(sc_ptr, st_ptr, skip_ptr, sx, out_ptr, N, NPROG, fill, so_b, so_h, so_n,
                      HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, G_V: tl.constexpr, NP_P: tl.constexpr,
                      BLOCK_V: tl.constexpr, HAS_SKIP: tl.constexpr, PDL: tl.constexpr = False):
        pdl_start(PDL)
        # (G_P: the statistics' layout, padded for the first kernel's dot; G_V: this kernel's tile of
        # the group, no dot here, so padded only to a power of two)
        # program (row, kv head) x block of BLOCK_V tokens: each head's softmax from the merged
        # statistics, summed over the group; fill where no head sees a candidate
        pid_bh = tl.program_id(0)
        pid_v = tl.program_id(1)
        b = (pid_bh // HK).to(tl.int64)
        h = (pid_bh % HK).to(tl.int64)
        if HAS_SKIP:
            if tl.load(skip_ptr + b * sx) != 0:
                return
        offs_g = tl.arange(0, G_V)
        offs_p = tl.arange(0, NP_P)
        st = st_ptr + pid_bh.to(tl.int64) * NPROG * 2 * G_P
        mp = offs_p < NPROG
        mask_g = offs_g < G
        mm = mp[:, None] & mask_g[None, :]
        m = tl.load(st + offs_p[:, None] * 2 * G_P + offs_g[None, :], mask=mm, other=float("-inf"))
        l = tl.load(st + offs_p[:, None] * 2 * G_P + G_P + offs_g[None, :], mask=mm, other=0.0)
        big = tl.max(m, axis=0)                                                      # (G_V,)
        big_safe = tl.where(big == float("-inf"), 0.0, big)
        tot = tl.sum(l * tl.exp2(m - big_safe[None, :]), axis=0)                     # 0: no candidate
        inv = tl.where(tot > 0.0, 1.0 / tl.where(tot > 0.0, tot, 1.0), 0.0)
        offs_n = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mn = offs_n < N
        s = tl.load(sc_ptr + pid_bh.to(tl.int64) * G * N + offs_g[:, None] * N + offs_n[None, :],
                    mask=mask_g[:, None] & mn[None, :], other=float("-inf"))          # (G_V, BLOCK_V)
        p = tl.exp2(s - big_safe[:, None]) * inv[:, None]
        votes = tl.sum(tl.where(mask_g[:, None], p, 0.0), axis=0)
        cand = tl.max(s, axis=0) > float("-inf")
        tl.store(out_ptr + b * so_b + h * so_h + offs_n * so_n, tl.where(cand, votes, fill), mask=mn)


def token_votes(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, limit: torch.Tensor,
                vote: str = "group", fill: float = -1.0, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Triton kernels; same arguments and result as :func:`token_votes_ref` (rows with ``skip``
    set are left unwritten)."""
    if not HAS_TRITON:
        raise RuntimeError("token_votes needs Triton (pip install triton); use token_votes_ref")
    _check(q, keys, key_pos, limit, vote, skip)
    if keys.stride(-1) != 1:
        raise ValueError("keys need a unit stride on dim")
    out = _launch(q, keys, key_pos, keys.shape[2], limit, None, 0.0 if vote == "layer" else float(fill), skip)
    if vote == "layer":   # every KV head gets the layer's sum; non-candidates (no head's) get fill
        cand = candidates(key_pos, limit)
        out = torch.where(cand, out.sum(1, keepdim=True), fill)
    return out


def votes_at_slots(q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, slots: torch.Tensor,
                   fill: float = float("-inf"), page: int = 1) -> torch.Tensor:
    """The ``group`` votes of :func:`token_votes` over the keys at ``slots (batch, kv_heads, n)``
    of the buffer ``keys (batch, kv_heads, cap, dim)`` instead of over the buffer itself: each
    query head's softmax over the row's valid slots (in ``[0, cap)``, ``key_pos >= 0`` there),
    summed over the group; ``(batch, kv_heads, n)`` float32, ``fill`` at invalid slots. The same
    two kernels, the keys read through the slot indices (no gather copy). ``page > 1``: ``slots
    (batch, kv_heads, m)`` are page indices, the ``m * page`` tokens their pages' slots in order
    (as :func:`kvsift.kernels.slot_scores.slot_scores`). Arguments are checked by the caller
    (:func:`kvsift.kernels.slot_scores.slot_scores`, ``reduce="votes"``)."""
    if not HAS_TRITON:
        raise RuntimeError("votes_at_slots needs Triton (pip install triton)")
    return _launch(q, keys, key_pos, slots.shape[2] * page, None, slots, float(fill), None, page)


def _launch(q, keys, key_pos, n, limit, slots, fill, skip, page=1) -> torch.Tensor:
    """Both kernels over ``n`` tokens: the buffer's first ``n`` slots (``limit``) or ``slots``."""
    b, hk, cap, d = keys.shape
    g = q.shape[1] // hk
    out = torch.empty(b, hk, n, dtype=torch.float32, device=q.device)
    if b == 0 or n == 0:
        return out
    g_p = max(16, triton.next_power_of_2(g))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = TUNING["block_n"]
    per_prog = triton.cdiv(triton.cdiv(n, block_n), TUNING["max_programs"]) * block_n
    nprog = triton.cdiv(n, per_prog)
    sc = torch.empty(b * hk, g, n, dtype=torch.float32, device=q.device)
    st = torch.empty(b * hk, nprog, 2, g_p, dtype=torch.float32, device=q.device)
    upcast = q.device.type != "cuda"
    sk = skip if skip is not None else out
    lim = limit if limit is not None else out
    sl = slots if slots is not None else out
    _scores_kernel[(b * hk, nprog)](
        q, keys, key_pos, lim, sk, sl, sc, st, n, cap, per_prog, nprog, float(d ** -0.5) * _LOG2E,
        limit.stride(0) if limit is not None else 0, skip.stride(0) if skip is not None else 0,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        key_pos.stride(0), key_pos.stride(1), key_pos.stride(2), *(sl.stride() if slots is not None else (0, 0, 0)),
        HK=hk, G=g, G_P=g_p, D=d, BLOCK_D=block_d, BLOCK_N=block_n, IEEE=upcast or q.dtype == torch.float32,
        UPCAST=upcast, HAS_SKIP=skip is not None, SLOTS=slots is not None, PAGE=page,
        num_warps=TUNING["num_warps"], **({"num_stages": TUNING["num_stages"]} if TUNING["num_stages"] else {}),
        **pdl_launch(q))
    block_v = TUNING["block_v"]
    _votes_kernel[(b * hk, triton.cdiv(n, block_v))](
        sc, st, sk, skip.stride(0) if skip is not None else 0, out, n, nprog, fill, out.stride(0), out.stride(1),
        out.stride(2),
        HK=hk, G=g, G_P=g_p, G_V=max(2, triton.next_power_of_2(g)), NP_P=max(2, triton.next_power_of_2(nprog)),
        BLOCK_V=block_v, HAS_SKIP=skip is not None, num_warps=TUNING["num_warps"], **pdl_launch(q))
    return out


# ---- the selection cache's decision ----------------------------------------------------------------

def _check_reuse(q: torch.Tensor, last_q: torch.Tensor, counts: torch.Tensor) -> None:
    if q.dim() != 3 or tuple(last_q.shape) != tuple(q.shape) or last_q.dtype != q.dtype:
        raise ValueError(f"q and last_q must be (batch, q_heads, dim) of one shape and dtype, got "
                         f"{q.dtype} {tuple(q.shape)} and {last_q.dtype} {tuple(last_q.shape)}")
    if tuple(counts.shape) != (2,) or counts.dtype != torch.int64:
        raise ValueError(f"counts must be int64 of shape (2,), got {counts.dtype} {tuple(counts.shape)}")


def query_reuse_ref(q: torch.Tensor, last_q: torch.Tensor, threshold: float, counts: torch.Tensor) -> torch.Tensor:
    """TokenSelect's selection-cache decision (PyTorch). ``q (batch, q_heads, dim)`` this step's
    decode queries, ``last_q`` the last step's (same shape and dtype): returns ``(batch,)`` bool,
    the rows whose mean over the query heads of the cosine similarity ``q . l / max(|q| |l|,
    1e-12)`` is at least ``threshold``. In place: ``last_q`` becomes ``q``, and ``counts (2,)``
    int64 adds the rows decided (``batch``) and the rows reused (so ``counts[1] / counts[0]`` is
    the fraction of row selections reused)."""
    _check_reuse(q, last_q, counts)
    qf, lf = q.float(), last_q.float()
    cos = (qf * lf).sum(-1) / (qf.norm(dim=-1) * lf.norm(dim=-1)).clamp_min(1e-12)   # (b, hq)
    flag = cos.mean(-1) >= threshold
    last_q.copy_(q)
    counts[0] += q.shape[0]
    counts[1] += flag.sum()
    return flag


if HAS_TRITON:

    @triton.jit
    def _query_reuse_kernel(q_ptr, l_ptr, flag_ptr, cnt_ptr, threshold, HQ, D, sq_b, sq_h, sq_d, sl_b, sl_h, sl_d,
                            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per row: the decision, the row's new last query, the counters
        b = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = (h[:, None] < HQ) & (d[None, :] < D)
        q_raw = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :] * sq_d, mask=m, other=0.0)
        q = q_raw.to(tl.float32)
        last = tl.load(l_ptr + b * sl_b + h[:, None] * sl_h + d[None, :] * sl_d, mask=m, other=0.0).to(tl.float32)
        norms = tl.sqrt(tl.sum(q * q, axis=1)) * tl.sqrt(tl.sum(last * last, axis=1))
        cos = tl.sum(q * last, axis=1) / tl.maximum(norms, 1e-12)                # (BLOCK_H,)
        reuse = tl.sum(tl.where(h < HQ, cos, 0.0), axis=0) / HQ >= threshold
        tl.store(l_ptr + b * sl_b + h[:, None] * sl_h + d[None, :] * sl_d, q_raw, mask=m)
        tl.store(flag_ptr + b, reuse)
        tl.atomic_add(cnt_ptr, 1)
        tl.atomic_add(cnt_ptr + 1, reuse.to(tl.int64))


def query_reuse(q: torch.Tensor, last_q: torch.Tensor, threshold: float, counts: torch.Tensor) -> torch.Tensor:
    """Triton kernel, one launch; same arguments, result and in-place updates as
    :func:`query_reuse_ref` (where a row's mean similarity falls within rounding of ``threshold``
    the two may decide it differently: the sums run in another order)."""
    if not HAS_TRITON:
        raise RuntimeError("query_reuse needs Triton (pip install triton); use query_reuse_ref")
    _check_reuse(q, last_q, counts)
    b, hq, d = q.shape
    flag = torch.empty(b, dtype=torch.bool, device=q.device)
    if b == 0:
        return flag
    _query_reuse_kernel[(b,)](
        q, last_q, flag, counts, float(threshold), hq, d, *q.stride(), *last_q.stride(),
        BLOCK_H=max(16, triton.next_power_of_2(hq)), BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)
    return flag
