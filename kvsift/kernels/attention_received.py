"""Softmax attention each key receives from a block of queries (H2O's and KVzip's prefill scores).

Shapes:

* query ``(batch, q_heads, L, dim)`` (model dtype: bf16 / fp16 / fp32);
* keys ``(batch, kv_heads, n, dim)``; GQA: q head ``h`` reads kv head ``h // (q_heads // kv_heads)``;
* key_pos ``(batch, kv_heads, n)`` int: each slot's position, ``-1`` = padding or an empty slot (not
  necessarily sorted or contiguous: after an eviction slots hold arbitrary positions);
* query_pos ``(batch, L)`` int, ``-1`` = a padding query.

Key ``j`` is visible to query ``i`` iff ``0 <= key_pos[j] <= query_pos[i]`` (and, with a
``sliding_window``, ``key_pos[j] > query_pos[i] - sliding_window``). The softmax of ``scale * q.k``
runs over the visible keys of each (row, q head, query); a padding query, or one that sees no key,
gives nothing. The weights are reduced over the queries (``reduce="sum"``: H2O's accumulated
attention; ``"max"``: KVzip's) and then over the q heads of each KV group (``head_reduce="mean"``
or ``"max"``). ``n_out``: only the first ``n_out`` keys are scored (the softmax still runs over all
``n``; KVzip's prompt slots come first, its pass's own tokens after them). Returns ``(batch,
kv_heads, n_out or n)`` float32.

``attention_received_ref`` (PyTorch) materialises float32 softmax weights a block of queries at a
time (one ``(batch, q_heads, block, n)`` fp32 tensor under ``max_bytes``, default
:data:`kvsift.methods.base.SCORE_BLOCK_BYTES`), through :func:`kvsift.methods.base.attention_blocks`.

``attention_received`` (Triton) never materialises the weights, in two launches:

1. per (row, KV head, block of the group's (q head, query) rows, key split): a flash-attention
   forward without values, ``q.k`` by ``tl.dot`` in the input dtype with fp32 accumulation, online
   max and sum-exp, masks from the positions; it writes each query's base-2 log-sum-exp (``-inf``
   where it sees nothing), per key split, merged in PyTorch when the keys were split;
2. per (row, KV head, key block): over the group's query rows (each q head apart unless the two
   reductions commute into one), recompute ``q.k``, ``p = exp2(q.k * scale * log2(e) - lse)``
   where visible, and reduce over the queries in registers; the heads are combined and the block
   is written once (no atomics: deterministic).

Key blocks none of whose positions a query block can see (causal, window) are skipped in both passes.
``kvsift.kernels.dispatch.attention_received`` picks one.
"""

from __future__ import annotations

import math

import torch

from kvsift.kernels._triton import HAS_TRITON, sm_count, tl, triton

_LOG2E = 1.4426950408889634
REDUCES = ("sum", "max")
HEAD_REDUCES = ("mean", "max")
# launch settings of the Triton kernels (bench/attention_received.py --tune sweeps them; these were
# the best on an H200, L=2048 over n=30000, 12/2 heads, dim 128, bf16); "splits": None =
# key splits of pass 1 planned for about ``waves`` programs per multiprocessor, an int forces them
TUNING = {"lse_block_m": 128, "lse_block_n": 64, "lse_warps": 4, "lse_stages": 2,
          "recv_block_m": 64, "recv_block_n": 64, "recv_warps": 4, "recv_stages": 2,
          "waves": 2, "splits": None}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_DIM = 256


def _check(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor, scale: float,
           reduce: str, head_reduce: str, n_out: int | None) -> int:
    """Validate arguments (``ValueError`` / ``TypeError``); returns ``n_out`` resolved."""
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCES}, got {head_reduce!r}")
    if query.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"query must be (batch, q_heads, L, dim) and keys (batch, kv_heads, n, dim), got "
                         f"{tuple(query.shape)} and {tuple(keys.shape)}")
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    if keys.shape[0] != b or keys.shape[3] != d or hk == 0 or hq % hk:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} disagree on batch, head_dim "
                         f"or head groups")
    if tuple(key_pos.shape) != (b, hk, n):
        raise ValueError(f"key_pos must be (batch, kv_heads, n) = {(b, hk, n)}, got {tuple(key_pos.shape)}")
    if tuple(query_pos.shape) != (b, L):
        raise ValueError(f"query_pos must be (batch, L) = {(b, L)}, got {tuple(query_pos.shape)}")
    if key_pos.is_floating_point() or query_pos.is_floating_point() or key_pos.dtype == torch.bool:
        raise TypeError("key_pos and query_pos must be integer positions")
    if not (query.is_floating_point() and keys.is_floating_point()):
        raise TypeError("query and keys must be floating point")
    if not (query.device == keys.device == key_pos.device == query_pos.device):
        raise ValueError("query, keys and the positions must be on one device")
    try:
        ok = not isinstance(scale, bool) and math.isfinite(float(scale))
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if n_out is None:
        return n
    if isinstance(n_out, bool) or not isinstance(n_out, int) or not 0 <= n_out <= n:
        raise ValueError(f"n_out must be an int in [0, n={n}], got {n_out!r}")
    return n_out


def attention_received_ref(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                           scale: float, sliding_window: int | None = None, reduce: str = "sum",
                           head_reduce: str = "mean", n_out: int | None = None,
                           max_bytes: int | None = None) -> torch.Tensor:
    """Reference (PyTorch, float32 weights a block of queries at a time, each block's ``(batch,
    q_heads, block, n)`` fp32 weights under ``max_bytes``, default ``SCORE_BLOCK_BYTES``).
    Shapes and meaning in the module docstring; returns ``(batch, kv_heads, n_out or n)`` float32."""
    from kvsift.methods.base import SCORE_BLOCK_BYTES, attention_blocks   # (methods import the dispatcher)

    n_out = _check(query, keys, key_pos, query_pos, scale, reduce, head_reduce, n_out)
    b, hq, L, _ = query.shape
    hk = keys.shape[1]
    g = hq // hk
    out = torch.zeros(b, hk, n_out, dtype=torch.float32, device=keys.device)
    if L == 0 or n_out == 0:
        return out
    blocks = attention_blocks(query, keys, key_pos, query_pos, scale, sliding_window,
                              SCORE_BLOCK_BYTES if max_bytes is None else max_bytes)
    if (reduce, head_reduce) == ("sum", "mean"):   # H2O: the sums of the heads' weights add up
        for _, attn in blocks:
            out += attn[..., :n_out].sum(3).mean(2)
        return out
    if (reduce, head_reduce) == ("max", "max"):    # KVzip: one max over the heads and the queries
        for _, attn in blocks:
            torch.maximum(out, attn[..., :n_out].amax(dim=(2, 3)), out=out)
        return out
    per_head = torch.zeros(b, hk, g, n_out, dtype=torch.float32, device=keys.device)
    for _, attn in blocks:   # each head's reduction over every query first, then the heads'
        if reduce == "sum":
            per_head += attn[..., :n_out].sum(3)
        else:
            torch.maximum(per_head, attn[..., :n_out].amax(3), out=per_head)
    return per_head.mean(2) if head_reduce == "mean" else per_head.amax(2)


if HAS_TRITON:

    @triton.jit
    def _visible(kp, qp, window, WINDOW: tl.constexpr):
        """``(M, N)`` visibility of keys at ``kp (N,)`` to queries at ``qp (M,)``."""
        vis = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
        if WINDOW:
            vis = vis & (kp[None, :] > qp[:, None] - window)
        return vis

    @triton.jit
    def _live(kmin, kmax, qp, window, WINDOW: tl.constexpr):
        """Whether any query at ``qp (M,)`` can see a key of a block whose valid positions span
        ``kmin .. kmax`` (``kmin`` huge when the block has none)."""
        live = kmin <= tl.max(qp, axis=0)
        if WINDOW:
            qmin = tl.min(tl.where(qp >= 0, qp, 1 << 30), axis=0)
            live = live & (kmax > qmin - window)
        return live

    @triton.jit
    def _load_rows(q_ptr, qp_ptr, b, kh, rows, r_hi, L, sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l, offs_d, mask_d,
                   G: tl.constexpr):
        """Query rows ``rows (M,)`` of a KV group, flattened as ``g * L + i`` (q head ``kh * G + g``,
        query ``i``), those ``>= r_hi`` masked: ``(q (M, BLOCK_D), qp (M,))``, ``qp = -1`` masked."""
        mask_r = rows < r_hi
        g = (rows // L).to(tl.int64)
        i = (rows % L).to(tl.int64)
        q = tl.load(q_ptr + b * sq_b + (kh * G + g)[:, None] * sq_h + i[:, None] * sq_l + offs_d[None, :] * sq_d,
                    mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        qp = tl.load(qp_ptr + b * sqp_b + i * sqp_l, mask=mask_r, other=-1).to(tl.int32)
        return q, qp

    @triton.jit
    def _dot(q, k, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _lse_kernel(q_ptr, k_ptr, kp_ptr, qp_ptr, lse_ptr, L, N, SPLIT, qk_scale, window,
                    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_n, sk_d, skp_b, skp_h, skp_n, sqp_b, sqp_l,
                    HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # pass 1: base-2 log-sum-exp of BLOCK_M (q head, query) rows of one KV group over a key split
        pid_bh = tl.program_id(0)
        rb = tl.program_id(1)
        sp = tl.program_id(2)
        b = (pid_bh // HK).to(tl.int64)
        kh = (pid_bh % HK).to(tl.int64)
        GL = G * L
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q, qp = _load_rows(q_ptr, qp_ptr, b, kh, rows, GL, L, sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l, offs_d, mask_d, G)
        if UPCAST:  # the CPU interpreter mis-computes bf16/fp16 tl.dot: do it in float32 there
            q = q.to(tl.float32)
        k_base = k_ptr + b * sk_b + kh * sk_h
        kp_base = kp_ptr + b * skp_b + kh * skp_h
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        n_lo = sp * SPLIT
        n_hi = tl.minimum(N, n_lo + SPLIT)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_hi
            kp = tl.load(kp_base + offs_n.to(tl.int64) * skp_n, mask=mask_n, other=-1).to(tl.int32)
            kmin = tl.min(tl.where(kp >= 0, kp, 1 << 30), axis=0)
            kmax = tl.max(kp, axis=0)
            if _live(kmin, kmax, qp, window, WINDOW):
                k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :] * sk_d,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                s = _dot(q, k, IEEE)
                s = tl.where(_visible(kp, qp, window, WINDOW), s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                m_i = m_new
        has = l_i > 0.0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        flat = pid_bh.to(tl.int64) * GL + rows                               # (batch, q_heads, L) flat
        tl.store(lse_ptr + flat * tl.num_programs(2) + sp, lse, mask=rows < GL)

    @triton.jit
    def _rows_received(q_ptr, qp_ptr, lse_ptr, k, kp, kmin, kmax, b, kh, r_lo, r_hi, L, qk_scale, window,
                       sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l, offs_d, mask_d,
                       HK: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       WINDOW: tl.constexpr, REDUCE_MAX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Sum (or max) over the group's query rows ``r_lo .. r_hi - 1`` of the weights they give
        the keys ``k (BLOCK_N, BLOCK_D)`` at ``kp``: ``(BLOCK_N,)`` fp32."""
        acc = tl.zeros((BLOCK_N,), tl.float32)
        lse_base = lse_ptr + (b * HK + kh) * G * L
        for r0 in range(r_lo, r_hi, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            q, qp = _load_rows(q_ptr, qp_ptr, b, kh, rows, r_hi, L, sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l,
                               offs_d, mask_d, G)
            if _live(kmin, kmax, qp, window, WINDOW):
                if UPCAST:
                    q = q.to(tl.float32)
                lse = tl.load(lse_base + rows, mask=rows < r_hi, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse)     # sees nothing: gives nothing
                s = _dot(q, k, IEEE)
                p = tl.where(_visible(kp, qp, window, WINDOW), tl.exp2(s * qk_scale - lse[:, None]), 0.0)
                if REDUCE_MAX:
                    acc = tl.maximum(acc, tl.max(p, axis=0))
                else:
                    acc += tl.sum(p, axis=0)
        return acc

    @triton.jit
    def _received_kernel(q_ptr, k_ptr, kp_ptr, qp_ptr, lse_ptr, out_ptr, L, N_OUT, qk_scale, window,
                         sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_n, sk_d, skp_b, skp_h, skp_n, sqp_b, sqp_l,
                         so_b, so_h, so_n,
                         HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                         REDUCE_MAX: tl.constexpr, HEAD_MAX: tl.constexpr, FLAT: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # pass 2: the weights one key block receives from every query row of its KV group
        pid_bh = tl.program_id(0)
        kb = tl.program_id(1)
        b = (pid_bh // HK).to(tl.int64)
        kh = (pid_bh % HK).to(tl.int64)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        kp = tl.load(kp_ptr + b * skp_b + kh * skp_h + offs_n.to(tl.int64) * skp_n, mask=mask_n,
                     other=-1).to(tl.int32)
        kmin = tl.min(tl.where(kp >= 0, kp, 1 << 30), axis=0)
        kmax = tl.max(kp, axis=0)
        k = tl.load(k_ptr + b * sk_b + kh * sk_h + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :] * sk_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if FLAT:   # sum then mean, or max then max: one pass over the group's rows
            total = _rows_received(q_ptr, qp_ptr, lse_ptr, k, kp, kmin, kmax, b, kh, 0, G * L, L, qk_scale, window,
                                   sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l, offs_d, mask_d,
                                   HK, G, BLOCK_M, BLOCK_N, WINDOW, REDUCE_MAX, IEEE, UPCAST)
        else:      # each q head's reduction over its queries, then the heads'
            total = tl.zeros((BLOCK_N,), tl.float32)
            for g in range(G):
                acc = _rows_received(q_ptr, qp_ptr, lse_ptr, k, kp, kmin, kmax, b, kh, g * L, g * L + L, L,
                                     qk_scale, window, sq_b, sq_h, sq_l, sq_d, sqp_b, sqp_l, offs_d, mask_d,
                                     HK, G, BLOCK_M, BLOCK_N, WINDOW, REDUCE_MAX, IEEE, UPCAST)
                if HEAD_MAX:
                    total = tl.maximum(total, acc)
                else:
                    total += acc
        if not HEAD_MAX:
            total = total / G
        tl.store(out_ptr + b * so_b + kh * so_h + offs_n.to(tl.int64) * so_n, total, mask=mask_n)


def plan_splits(rows: int, n: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """Pass 1's ``(splits, keys per split)``: enough programs for ``TUNING["waves"]`` per
    multiprocessor when ``rows`` (row blocks times rows and KV heads) are too few, each split a
    whole number of ``block_n`` key blocks (``TUNING["splits"]``, an int, forces the count)."""
    blocks = max(1, -(-n // block_n))
    splits = TUNING["splits"]
    if splits is None:
        splits = -(-TUNING["waves"] * sm_count(device) // max(1, rows))
    splits = max(1, min(int(splits), blocks))
    per = -(-blocks // splits) * block_n
    return -(-max(n, 1) // per), per


def attention_received(query: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                       scale: float, sliding_window: int | None = None, reduce: str = "sum",
                       head_reduce: str = "mean", n_out: int | None = None,
                       max_bytes: int | None = None) -> torch.Tensor:
    """Triton kernels; same arguments and result as :func:`attention_received_ref` (``max_bytes``
    is the reference's and is ignored: nothing here grows with ``L * n``). query and keys share a
    dtype (fp32, bf16 or fp16) and ``head_dim <= 256``; any strides."""
    if not HAS_TRITON:
        raise RuntimeError("attention_received needs Triton (pip install triton); use attention_received_ref")
    n_out = _check(query, keys, key_pos, query_pos, scale, reduce, head_reduce, n_out)
    if query.dtype != keys.dtype or query.dtype not in DTYPES:
        raise TypeError(f"query and keys must share a dtype of {DTYPES} for the Triton kernel, got "
                        f"{query.dtype} and {keys.dtype}")
    b, hq, L, d = query.shape
    hk, n = keys.shape[1], keys.shape[2]
    if d > MAX_DIM:
        raise ValueError(f"head_dim {d} > {MAX_DIM}: use attention_received_ref")
    g = hq // hk
    out = torch.zeros(b, hk, n_out, dtype=torch.float32, device=keys.device)
    if b == 0 or L == 0 or n_out == 0:
        return out
    upcast = query.device.type != "cuda"  # TRITON_INTERPRET=1 on CPU tensors
    ieee = upcast or query.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    window = int(sliding_window) if sliding_window else 0
    qk_scale = float(scale) * _LOG2E
    qs, ks, kps, qps = query.stride(), keys.stride(), key_pos.stride(), query_pos.stride()
    common = dict(HK=hk, G=g, D=d, BLOCK_D=block_d, WINDOW=window > 0, IEEE=ieee, UPCAST=upcast)

    bm, bn = TUNING["lse_block_m"], TUNING["lse_block_n"]
    row_blocks = triton.cdiv(g * L, bm)
    splits, per = plan_splits(b * hk * row_blocks, n, bn, query.device)
    parts = torch.empty(b * hq * L, splits, dtype=torch.float32, device=query.device)
    _lse_kernel[(b * hk, row_blocks, splits)](
        query, keys, key_pos, query_pos, parts, L, n, per, qk_scale, window,
        *qs, *ks, *kps, *qps, BLOCK_M=bm, BLOCK_N=bn, **common,
        num_warps=TUNING["lse_warps"], num_stages=TUNING["lse_stages"])
    if splits == 1:
        lse = parts
    else:   # merge the splits' base-2 log-sum-exps (-inf where a query saw nothing in any)
        m = parts.amax(1, keepdim=True)
        m = torch.where(torch.isinf(m), 0.0, m)
        lse = (m + torch.log2(torch.exp2(parts - m).sum(1, keepdim=True))).contiguous()

    bm, bn = TUNING["recv_block_m"], TUNING["recv_block_n"]
    flat = (reduce, head_reduce) in (("sum", "mean"), ("max", "max"))
    _received_kernel[(b * hk, triton.cdiv(n_out, bn))](
        query, keys, key_pos, query_pos, lse, out, L, n_out, qk_scale, window,
        *qs, *ks, *kps, *qps, *out.stride(), BLOCK_M=bm, BLOCK_N=bn,
        REDUCE_MAX=reduce == "max", HEAD_MAX=head_reduce == "max", FLAT=flat, **common,
        num_warps=TUNING["recv_warps"], num_stages=TUNING["recv_stages"])
    return out
