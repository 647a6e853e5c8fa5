"""Prefill attention of one chunk under a sparse pattern (MInference, arXiv 2407.02490).

Every pattern the ``minference`` method uses (A-shape, vertical-slash, block-sparse) is handed to
the attention as one index form, per query head and query block:

* ``block_idx (batch, q_heads, n_qblocks, kb)`` int32: key blocks attended whole (key block ``j``
  = key slots ``j * block .. j * block + block - 1``), ``-1`` = unused; unique per row. A-shape and
  block-sparse patterns are blocks only; the slash diagonals of vertical-slash are turned into the
  (at most two) key blocks each diagonal crosses in a query block, as MInference's kernel does.
* ``cols (batch, q_heads, n_qblocks, nc)`` int32 or None: single key slots attended in addition
  (the vertical lines), ``-1`` = unused; a slot inside one of the row's listed blocks must not be
  listed again (the index builders in ``kvsift/methods/minference.py`` drop them).

q ``(batch, q_heads, L, dim)`` is the chunk's queries; k/v ``(batch, kv_heads, n, dim)`` are every
key of the layer, the chunk's own tokens being the last ``L`` slots in order (a fresh, unpadded
prefill: query row ``r`` sits at key slot ``n - L + r``). Query block ``i`` is rows ``i * block ..
i * block + block - 1`` of the chunk. A key slot ``j`` is attended by row ``r`` iff it is selected
(in a listed block or column) and causal, ``j <= n - L + r``. GQA: q head ``h`` reads kv head
``h // (q_heads // kv_heads)``. Returns ``(batch, q_heads, L, dim)`` in q's dtype; a row with no
selected key gives zeros (the builders always select the diagonal, so none has).

``sparse_prefill_attention_ref`` gathers each query block's selected keys (memory bounded by the
selection, not by ``n``) and runs a float32 softmax. ``sparse_prefill_attention`` (Triton) runs
one program per (query block, batch, q head): it walks the listed key blocks (contiguous loads)
then the columns (gathered rows) with an online softmax and writes the block's output once. Its
loops run between per-row bounds (:func:`loop_bounds`): the leading blocks every row of the query
block sees whole without a causal mask or a branch, so their loads pipeline (three stages), the
diagonal ones masked, nothing past a row's last listed entry (on the H200 at 128k this took the
vertical-slash attention from 245 to 146 ms per layer, ``bench/results/minference_prefill_tune_h200.json``).
``vertical_slash_attention`` and ``block_sparse_attention`` (and their ``_ref``) are the two
patterns' names for the same calls (block-sparse passes ``cols=None``).
"""

from __future__ import annotations

import math

import torch

from kvsift.kernels._flash import load_kv, online_softmax_step
from kvsift.kernels._triton import HAS_TRITON, tl, triton

_LOG2E = 1.4426950408889634
BLOCKS = (16, 32, 64, 128)
"""Block sizes the kernel takes (``tl.dot`` wants powers of two, at least 16)."""


def check_index(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                cols: torch.Tensor | None, scale: float, block: int) -> None:
    """Shapes, dtypes and devices of a sparse prefill call (``ValueError`` / ``TypeError``)."""
    if isinstance(block, bool) or block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (batch, q_heads, L, dim) and k, v (batch, kv_heads, n, dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, L, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, head_dim or head groups")
    if L > k.shape[2]:
        raise ValueError(f"the chunk's {L} queries must be the last of the {k.shape[2]} keys")
    nqb = -(-L // block)
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (b, hq, nqb):
        raise ValueError(f"block_idx must be (batch, q_heads, n_qblocks, kb) = ({b}, {hq}, {nqb}, kb), "
                         f"got {tuple(block_idx.shape)}")
    if cols is not None and (cols.dim() != 4 or tuple(cols.shape[:3]) != (b, hq, nqb)):
        raise ValueError(f"cols must be (batch, q_heads, n_qblocks, nc) = ({b}, {hq}, {nqb}, nc), got {tuple(cols.shape)}")
    for name, t in (("block_idx", block_idx), ("cols", cols)):
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on one device")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError("q, k and v must be floating point")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def sparse_prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                 cols: torch.Tensor | None, scale: float, block: int = 64) -> torch.Tensor:
    """Reference: for each query block, gather its selected keys (listed blocks, then columns) and
    run a masked float32 softmax. Shapes as in the module docstring; returns ``(batch, q_heads, L,
    dim)``."""
    check_index(q, k, v, block_idx, cols, scale, block)
    b, hq, L, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    off = n - L
    out = torch.zeros(b, hq, L, d, dtype=q.dtype, device=q.device)
    ar = torch.arange(block, device=q.device)
    kv_of = (torch.arange(hq, device=q.device) // g)[None, :, None]          # (1, hq, 1)
    bi = torch.arange(b, device=q.device)[:, None, None]                      # (b, 1, 1)
    for i in range(block_idx.shape[2]):
        r0, r1 = i * block, min(L, (i + 1) * block)
        blk = block_idx[:, :, i].long()                                       # (b, hq, kb)
        slots = torch.where(blk[..., None] >= 0, blk[..., None] * block + ar, -1).flatten(2)
        if cols is not None:
            slots = torch.cat([slots, cols[:, :, i].long()], dim=2)           # (b, hq, s)
        ok = (slots >= 0) & (slots < n)
        safe = torch.where(ok, slots, 0)
        kk = k[bi, kv_of, safe].float()                                       # (b, hq, s, d)
        vv = v[bi, kv_of, safe].float()
        qq = q[:, :, r0:r1].float()                                           # (b, hq, l, d)
        w = torch.matmul(qq, kk.transpose(-1, -2)) * scale                    # (b, hq, l, s)
        qslot = off + torch.arange(r0, r1, device=q.device)
        vis = ok[:, :, None, :] & (slots[:, :, None, :] <= qslot[None, None, :, None])
        w = w.masked_fill(~vis, float("-inf"))
        p = torch.softmax(w, dim=-1).nan_to_num(0.0)
        out[:, :, r0:r1] = torch.matmul(p, vv).to(q.dtype)
    return out


def selected_mask(block_idx: torch.Tensor, cols: torch.Tensor | None, L: int, n: int, block: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """The pairs a call attends, as a dense ``(batch, q_heads, L, n)`` bool mask (selected and
    causal): for tests, the pattern search's recall and ``bench/minference_coverage.py`` (small
    sizes only). ``rows (r,)``: only those chunk rows, ``(batch, q_heads, r, n)``."""
    b, hq = block_idx.shape[:2]
    dev = block_idx.device
    off = n - L
    blocks = -(-n // block)
    if rows is not None:   # one query block per row asked for
        rows = rows.to(dev)
        block_idx = block_idx[:, :, rows // block]
        cols = None if cols is None else cols[:, :, rows // block]
    nq = block_idx.shape[2]
    bm = torch.zeros(b, hq, nq, blocks + 1, dtype=torch.bool, device=dev)
    bm.scatter_(3, torch.where(block_idx >= 0, block_idx.long(), blocks), True)
    m = bm[..., :blocks].repeat_interleave(block, dim=3)[..., :n]             # (b, hq, nq, n)
    if cols is not None:
        cm = torch.zeros(b, hq, nq, n + 1, dtype=torch.bool, device=dev)
        cm.scatter_(3, torch.where(cols >= 0, cols.long(), n), True)
        m |= cm[..., :n]
    if rows is None:
        m = m.repeat_interleave(block, dim=2)[:, :, :L]                       # (b, hq, L, n)
        rows = torch.arange(L, device=dev)
    causal = torch.arange(n, device=dev)[None, :] <= (off + rows)[:, None]
    return m & causal


# launch settings of the Triton kernel (bench/minference_prefill.py --tune sweeps them): pipeline
# depth, warps for blocks of at most 64 and above, and whether the leading key blocks every row of
# a query block sees whole skip the causal mask (``skip_mask``)
TUNING = {"num_stages": 3, "num_warps_small": 4, "num_warps_large": 8, "skip_mask": True}


def loop_bounds(block_idx: torch.Tensor, cols: torch.Tensor | None, L: int, n: int, block: int):
    """Per (batch, q head, query block), int32 ``(batch, q_heads, n_qblocks)``: ``whole``, how many
    leading entries of ``block_idx`` are listed key blocks that every row of the query block sees
    entirely (causal, inside the ``n`` keys: no mask needed), ``ends``, one past its last listed
    entry, and ``col_ends`` the same for ``cols`` (None without columns). The kernel walks
    ``[0, whole)`` unmasked, ``[whole, ends)`` masked (unlisted entries inside, -1, are skipped by
    their mask), so an index listed first (``blocks_to_index`` lists blocks first, ascending) costs
    nothing past its end.
    Small elementwise PyTorch work, no host sync."""
    def end_of(idx: torch.Tensor) -> torch.Tensor:
        listed = idx >= 0
        pos = torch.arange(1, idx.shape[-1] + 1, device=idx.device, dtype=torch.int32)
        return torch.where(listed, pos, 0).amax(-1).to(torch.int32) if idx.shape[-1] else \
            torch.zeros(idx.shape[:-1], dtype=torch.int32, device=idx.device)

    nqb = block_idx.shape[2]
    first_row = n - L + torch.arange(nqb, device=block_idx.device, dtype=torch.int64) * block    # (nqb,)
    last_key = block_idx.long() * block + block - 1
    seen = (block_idx >= 0) & (last_key <= first_row[:, None]) & (last_key < n)
    whole = seen.to(torch.int32).cumprod(-1).sum(-1, dtype=torch.int32) if block_idx.shape[-1] else \
        torch.zeros(block_idx.shape[:-1], dtype=torch.int32, device=block_idx.device)
    return whole, end_of(block_idx), (end_of(cols) if cols is not None else None)


if HAS_TRITON:

    @triton.jit
    def _sparse_prefill_kernel(q_ptr, k_ptr, v_ptr, bi_ptr, ci_ptr, o_ptr, wh_ptr, en_ptr, ce_ptr,
                               L, N, qk_scale,
                               sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_l,
                               sb_b, sb_h, sb_q, sb_k, sc_b, sc_h, sc_q, sc_k,
                               HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_COLS: tl.constexpr,
                               IEEE: tl.constexpr, UPCAST: tl.constexpr):
        qb = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // HQ).to(tl.int64)
        h = (pid_bh % HQ).to(tl.int64)
        kh = h // G
        nqb = tl.num_programs(0)
        row = pid_bh * nqb + qb                                   # (batch, q head, query block), flat
        offs_m = qb * BLOCK + tl.arange(0, BLOCK)                 # chunk rows
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK).to(tl.int64)
        mask_m = offs_m < L
        mask_d = offs_d < D
        qslot = (N - L + offs_m).to(tl.int64)                     # each row's own key slot
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter mis-computes bf16/fp16 tl.dot: do it in float32 there
            q = q.to(tl.float32)
        k_base = k_ptr + b * sk_b + kh * sk_h
        v_base = v_ptr + b * sv_b + kh * sv_h
        m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
        b_base = bi_ptr + b * sb_b + h * sb_h + qb * sb_q
        whole = tl.load(wh_ptr + row)
        end = tl.load(en_ptr + row)
        # listed blocks every row sees whole: no row or causal mask, no branch (so loads pipeline)
        for j in range(0, whole):
            slot = tl.load(b_base + j * sb_k).to(tl.int64) * BLOCK + offs_s
            k = tl.load(k_base + slot[:, None] * sk_n + offs_d[None, :], mask=mask_d[None, :], other=0.0)
            v = tl.load(v_base + slot[:, None] * sv_n + offs_d[None, :], mask=mask_d[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            m_i, l_i, acc = online_softmax_step(q, k, v, None, qk_scale, m_i, l_i, acc, IEEE, False)
        # the rest (the diagonal, unlisted -1 entries, the last partial block): masked
        for j in range(whole, end):
            kb = tl.load(b_base + j * sb_k).to(tl.int64)
            slot = kb * BLOCK + offs_s
            valid = (slot >= 0) & (slot < N)                      # kb = -1: every slot negative
            k, v = load_kv(k_base, v_base, slot, valid, sk_n, sv_n, offs_d, mask_d, UPCAST)  # (BLOCK_S, BLOCK_D)
            vis = valid[None, :] & (slot[None, :] <= qslot[:, None])
            m_i, l_i, acc = online_softmax_step(q, k, v, vis, qk_scale, m_i, l_i, acc, IEEE)
        if HAS_COLS:
            c_base = ci_ptr + b * sc_b + h * sc_h + qb * sc_q
            c_end = tl.load(ce_ptr + row)
            for c0 in range(0, c_end, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                slot = tl.load(c_base + offs_c * sc_k, mask=offs_c < c_end, other=-1).to(tl.int64)
                valid = (slot >= 0) & (slot < N)
                slot = tl.where(valid, slot, 0)
                k, v = load_kv(k_base, v_base, slot, valid, sk_n, sv_n, offs_d, mask_d, UPCAST)  # (BLOCK_S, BLOCK_D)
                vis = valid[None, :] & (slot[None, :] <= qslot[:, None])
                m_i, l_i, acc = online_softmax_step(q, k, v, vis, qk_scale, m_i, l_i, acc, IEEE)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_l + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def sparse_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                             cols: torch.Tensor | None, scale: float, block: int = 64) -> torch.Tensor:
    """Triton kernel; same arguments and result as :func:`sparse_prefill_attention_ref`.

    One program per (query block, batch, q head). Its loop bounds come from :func:`loop_bounds`:
    the leading key blocks all its rows see whole go unmasked and without a branch, the others
    (the diagonal) masked, then the columns; nothing is read past a row's last listed entry."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_prefill_attention needs Triton (pip install triton); use sparse_prefill_attention_ref")
    check_index(q, k, v, block_idx, cols, scale, block)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a unit stride on head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype for the Triton kernel, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, L, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    out = torch.empty(b, hq, L, d, dtype=q.dtype, device=q.device)
    nqb = block_idx.shape[2]
    if b * hq * L == 0:
        return out
    has_cols = cols is not None and cols.shape[3] > 0
    whole, ends, col_ends = loop_bounds(block_idx, cols if has_cols else None, L, n, block)
    if not TUNING["skip_mask"]:
        whole = torch.zeros_like(whole)
    ci = cols if has_cols else block_idx
    sc = cols.stride() if has_cols else (0, 0, 0, 0)
    upcast = q.device.type != "cuda"  # TRITON_INTERPRET=1 on CPU tensors
    ieee = upcast or q.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    _sparse_prefill_kernel[(nqb, b * hq)](
        q, k, v, block_idx, ci, out, whole, ends, col_ends if has_cols else ends,
        L, n, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *block_idx.stride(), *sc,
        HQ=hq, G=hq // hk, D=d, BLOCK_D=block_d, BLOCK=block, BLOCK_C=64, HAS_COLS=has_cols,
        IEEE=ieee, UPCAST=upcast, num_stages=TUNING["num_stages"],
        num_warps=TUNING["num_warps_small"] if block <= 64 else TUNING["num_warps_large"],
    )
    return out


def vertical_slash_attention_ref(q, k, v, block_idx, cols, scale, block=64):
    """Vertical-slash: the slash diagonals as ``block_idx``, the vertical lines as ``cols``."""
    return sparse_prefill_attention_ref(q, k, v, block_idx, cols, scale, block)


def vertical_slash_attention(q, k, v, block_idx, cols, scale, block=64):
    """Triton; same as :func:`vertical_slash_attention_ref`."""
    return sparse_prefill_attention(q, k, v, block_idx, cols, scale, block)


def block_sparse_attention_ref(q, k, v, block_idx, cols=None, scale=1.0, block=64):
    """Block-sparse (and A-shape): key blocks only."""
    return sparse_prefill_attention_ref(q, k, v, block_idx, cols, scale, block)


def block_sparse_attention(q, k, v, block_idx, cols=None, scale=1.0, block=64):
    """Triton; same as :func:`block_sparse_attention_ref`."""
    return sparse_prefill_attention(q, k, v, block_idx, cols, scale, block)
