"""Bookkeeping of a device LRU cache of chunks, one decode step (sentencekv's device chunk cache).

``lru_plan(idx, slot_of, owner, last, starts, lens, T, counts, L, tab=None)`` for ``R`` cache rows
(one per (batch, kv_head)), each with ``S`` chunk slots plus a scratch slot ``S``:

* ``idx (R, k)`` int64: the chunks selected this step (``-1`` = none, ids unique per row);
* ``slot_of (R, n + 1)`` int64: cache slot of each chunk (``-1``: not cached; column ``n`` scratch);
  ``owner (R, S + 1)`` int64: chunk held by each slot (``-1``: empty); ``last (R, S + 1)`` int64:
  the row's step stamp of each slot's last use (``-1``: never). Updated in place;
* ``starts (R, n)`` int64 / ``lens (R, n)`` int: host row of each chunk (relative to its cache row's
  host block of ``T`` rows) and its length; ``counts (2,)`` int64 accumulates (lookups, misses).

Hits are stamped newest; each miss takes the least recently used slot (ties: the lowest slot); the
evicted chunk forgets its slot. Returns ``(src_row, src_len, dst_row)`` ``(R*k,)`` int64 copy
descriptors for :func:`kvsift.kernels.chunk_fetch.copy_chunks` (``src_len = -1``: nothing to copy)
and ``final (R, k)`` int64, the slot of every selected chunk (``S`` for ``-1`` entries). With
``tab (R, k*L)`` int32 it also writes the slot table read by the attention kernel: entry
``j*L + t`` is ``final[j]*L + t`` for the chunk's tokens, ``-1`` elsewhere.

``lru_plan_ref`` is the PyTorch version (about forty small launches); ``lru_plan`` is one Triton
program per row (the LRU order by a bitonic sort of ``(stamp, slot)`` keys). Same results.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def lru_plan_ref(idx, slot_of, owner, last, starts, lens, T: int, counts, L: int, tab=None):
    """Reference (PyTorch, no host sync); see the module docstring."""
    R, k = idx.shape
    S = owner.shape[1] - 1
    nslot = slot_of.shape[1] - 1
    valid = idx >= 0
    safe = idx.clamp(min=0)
    slot = slot_of.gather(1, safe)
    hit = valid & (slot >= 0)
    miss = valid & ~hit
    stamp = (last[:, :S].amax(1, keepdim=True) + 1).expand(R, k)         # each row's own clock
    last.scatter_(1, torch.where(hit, slot, S), stamp)
    order = last[:, :S].argsort(dim=1, stable=True)                      # least recently used first
    rank = (miss.cumsum(1) - 1).clamp(min=0)
    victim = torch.where(miss, order.gather(1, rank), S)
    old = owner.gather(1, victim)
    slot_of.scatter_(1, torch.where(miss & (old >= 0), old, nslot), -1)
    owner.scatter_(1, victim, torch.where(miss, safe, -1))
    slot_of.scatter_(1, torch.where(miss, safe, nslot), victim)
    last.scatter_(1, victim, stamp)
    final = torch.where(hit, slot, victim)
    ln = torch.where(valid, lens.gather(1, safe).to(torch.int64), 0)
    rows = torch.arange(R, device=idx.device)[:, None]
    src_row = rows * T + starts.gather(1, safe)
    src_len = torch.where(miss, ln, -1)
    dst_row = rows * (S + 1) + final
    counts.add_(torch.stack((valid.sum(), miss.sum())))
    if tab is not None:
        ar = torch.arange(L, device=idx.device)
        tab.copy_(torch.where(ar < ln[..., None], final[..., None] * L + ar, -1).view(R, k * L))
    return src_row.view(-1), src_len.view(-1), dst_row.view(-1), final


if HAS_TRITON:

    @triton.jit
    def _lru_plan_kernel(idx_ptr, slot_of_ptr, owner_ptr, last_ptr, starts_ptr, lens_ptr, counts_ptr,
                         src_ptr, srclen_ptr, dst_ptr, final_ptr, tab_ptr, order_ptr,
                         K, N1, S, T,
                         L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_L: tl.constexpr, WRITE_TAB: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_K)
        live = j < K
        c = tl.load(idx_ptr + r * K + j, mask=live, other=-1)
        valid = live & (c >= 0)
        safe = tl.maximum(c, 0)
        slot = tl.load(slot_of_ptr + r * N1 + safe, mask=valid, other=-1)
        hit = valid & (slot >= 0)
        miss = valid & (slot < 0)
        s = tl.arange(0, BLOCK_S)
        sl = s < S
        lastv = tl.load(last_ptr + r * (S + 1) + s, mask=sl, other=-1)
        stamp = tl.max(tl.where(sl, lastv, -1), axis=0) + 1
        # slots hit this step become the newest: stamped in memory (one slot per hit chunk; no
        # (k, S) tile, which passes Triton's largest block at long contexts), then read back
        tl.store(last_ptr + r * (S + 1) + slot, tl.zeros((BLOCK_K,), tl.int64) + stamp, mask=hit)
        tl.debug_barrier()
        lastv = tl.load(last_ptr + r * (S + 1) + s, mask=sl, other=-1)
        # LRU order: ascending (stamp, slot); padding lanes sort last
        key = tl.where(sl, ((lastv + 1) << 20) + s, 9223372036854775807)
        order = tl.sort(key) & 1048575
        tl.store(order_ptr + r * BLOCK_S + s, order)
        tl.debug_barrier()
        rank = tl.maximum(tl.cumsum(miss.to(tl.int32), axis=0) - 1, 0)
        victim = tl.load(order_ptr + r * BLOCK_S + rank, mask=miss, other=0)
        victim = tl.where(miss, victim, S)
        old = tl.load(owner_ptr + r * (S + 1) + victim, mask=miss, other=-1)
        tl.store(slot_of_ptr + r * N1 + old, tl.full((BLOCK_K,), -1, tl.int64), mask=miss & (old >= 0))
        tl.store(owner_ptr + r * (S + 1) + victim, c, mask=miss)
        tl.store(slot_of_ptr + r * N1 + safe, victim, mask=miss)
        tl.store(last_ptr + r * (S + 1) + victim, tl.zeros((BLOCK_K,), tl.int64) + stamp, mask=miss)
        final = tl.where(hit, slot, victim)
        ln = tl.load(lens_ptr + r * (N1 - 1) + safe, mask=valid, other=0).to(tl.int64)
        st = tl.load(starts_ptr + r * (N1 - 1) + safe, mask=live, other=0)
        tl.store(src_ptr + r * K + j, r * T + st, mask=live)
        tl.store(srclen_ptr + r * K + j, tl.where(miss, ln, -1), mask=live)
        tl.store(dst_ptr + r * K + j, r * (S + 1) + final, mask=live)
        tl.store(final_ptr + r * K + j, final, mask=live)
        tl.atomic_add(counts_ptr, tl.sum(valid.to(tl.int64), axis=0))
        tl.atomic_add(counts_ptr + 1, tl.sum(miss.to(tl.int64), axis=0))
        if WRITE_TAB:
            t = tl.arange(0, BLOCK_L)
            entry = tl.where(t[None, :] < ln[:, None], final[:, None] * L + t[None, :], -1).to(tl.int32)
            tl.store(tab_ptr + r * (K * L) + j[:, None] * L + t[None, :], entry,
                     mask=live[:, None] & (t[None, :] < L))


MAX_BLOCK = 1 << 20
"""Triton's largest block (elements): rows with more cache slots or selected chunks than this (or
a slot table tile ``k x L`` larger than this) take :func:`lru_plan_ref`."""


def lru_plan(idx, slot_of, owner, last, starts, lens, T: int, counts, L: int, tab=None):
    """Triton kernel (CUDA), one program per cache row; same arguments and results as
    :func:`lru_plan_ref`."""
    if not HAS_TRITON:
        raise RuntimeError("lru_plan needs Triton; use lru_plan_ref")
    R, k = idx.shape
    S = owner.shape[1] - 1
    dev = idx.device
    src = torch.empty(R * k, dtype=torch.int64, device=dev)
    srclen, dst = torch.empty_like(src), torch.empty_like(src)
    final = torch.empty(R, k, dtype=torch.int64, device=dev)
    if R * k == 0:
        return src, srclen, dst, final
    block_s = max(16, triton.next_power_of_2(S))
    block_k, block_l = max(16, triton.next_power_of_2(k)), max(16, triton.next_power_of_2(L))
    if block_s > MAX_BLOCK or block_k > MAX_BLOCK or (tab is not None and block_k * block_l > MAX_BLOCK):
        # more slots or selected chunks per row than one program's blocks hold: the reference
        # (no host sync either, so a CUDA graph records it the same way)
        return lru_plan_ref(idx, slot_of, owner, last, starts, lens, T, counts, L, tab)
    order = torch.empty(R, block_s, dtype=torch.int64, device=dev)
    for t in (idx, slot_of, owner, last, starts, lens):
        if not t.is_contiguous():
            raise ValueError("lru_plan needs contiguous tensors")
    _lru_plan_kernel[(R,)](idx, slot_of, owner, last, starts, lens, counts, src, srclen, dst, final,
                           tab if tab is not None else final, order, k, slot_of.shape[1], S, T,
                           L=L, BLOCK_K=block_k, BLOCK_S=block_s, BLOCK_L=block_l, WRITE_TAB=tab is not None,
                           num_warps=4)
    return src, srclen, dst, final
