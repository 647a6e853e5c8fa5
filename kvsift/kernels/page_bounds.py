"""Fold one appended key per (row, KV head) into its page's per-channel min/max (Quest's summaries).

``page_bounds_append(kmin, kmax, filled, k_buf, slot, page)``: ``kmin``/``kmax`` ``(batch,
kv_heads, n_pages, head_dim)``, ``filled (batch, kv_heads, n_pages)`` bool, updated in place;
``k_buf (batch, kv_heads, capacity, head_dim)`` the layer's keys, ``slot`` a ``(1,)`` integer
device tensor: the slot just written (the same for every row, as in decode). The key at ``slot``
goes into page ``slot // page``: a page's first slot resets its bounds to that key, later slots
widen them, and the page is marked filled. No host sync (the slot stays on the device), so it runs
inside a CUDA graph.

``page_bounds_append_ref`` is PyTorch (about ten small launches); ``page_bounds_append`` is one
Triton program per (row, KV head). Both give the same tensors.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def _check(kmin, kmax, filled, k_buf, slot, page) -> None:
    if kmin.shape != kmax.shape or kmin.dim() != 4 or filled.shape != kmin.shape[:3]:
        raise ValueError(f"kmin/kmax must be (batch, kv_heads, n_pages, dim) and filled (batch, kv_heads, n_pages), "
                         f"got {tuple(kmin.shape)}, {tuple(kmax.shape)}, {tuple(filled.shape)}")
    if k_buf.dim() != 4 or k_buf.shape[:2] != kmin.shape[:2] or k_buf.shape[3] != kmin.shape[3]:
        raise ValueError(f"k_buf must be (batch, kv_heads, capacity, dim) matching the bounds, got {tuple(k_buf.shape)}")
    if slot.numel() != 1 or slot.dtype.is_floating_point:
        raise ValueError("slot must be a one-element integer tensor")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page must be a positive int, got {page!r}")


def page_bounds_append_ref(kmin: torch.Tensor, kmax: torch.Tensor, filled: torch.Tensor, k_buf: torch.Tensor,
                           slot: torch.Tensor, page: int) -> None:
    """Reference (PyTorch), in place; see the module docstring."""
    _check(kmin, kmax, filled, k_buf, slot, page)
    s = slot.reshape(1).to(torch.int64)
    k = k_buf.index_select(2, s).to(kmin.dtype)                          # (b, h, 1, d)
    p = s // page
    first = (s % page == 0).view(1, 1, 1, 1)
    kmin.index_copy_(2, p, torch.where(first, k, torch.minimum(kmin.index_select(2, p), k)))
    kmax.index_copy_(2, p, torch.where(first, k, torch.maximum(kmax.index_select(2, p), k)))
    filled.index_fill_(2, p, True)


if HAS_TRITON:

    @triton.jit
    def _page_bounds_kernel(lo_ptr, hi_ptr, f_ptr, k_ptr, slot_ptr, D,
                            sl_b, sl_h, sl_p, sh_b, sh_h, sh_p, sf_b, sf_h, sf_p, sk_b, sk_h, sk_n,
                            HK: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // HK).to(tl.int64)
        h = (pid % HK).to(tl.int64)
        s = tl.load(slot_ptr).to(tl.int64)
        p = s // PAGE
        first = (s % PAGE) == 0
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        k = tl.load(k_ptr + b * sk_b + h * sk_h + s * sk_n + offs, mask=m, other=0.0)
        lo_p = lo_ptr + b * sl_b + h * sl_h + p * sl_p + offs
        hi_p = hi_ptr + b * sh_b + h * sh_h + p * sh_p + offs
        lo = tl.load(lo_p, mask=m, other=0.0)
        hi = tl.load(hi_p, mask=m, other=0.0)
        # compare in fp32 (exact for fp16/bf16 values; the key is first rounded to the bounds' dtype)
        k = k.to(lo.dtype).to(tl.float32)
        new_lo = tl.where(first, k, tl.minimum(lo.to(tl.float32), k))
        new_hi = tl.where(first, k, tl.maximum(hi.to(tl.float32), k))
        tl.store(lo_p, new_lo.to(lo.dtype), mask=m)
        tl.store(hi_p, new_hi.to(hi.dtype), mask=m)
        tl.store(f_ptr + b * sf_b + h * sf_h + p * sf_p, 1)


def page_bounds_append(kmin: torch.Tensor, kmax: torch.Tensor, filled: torch.Tensor, k_buf: torch.Tensor,
                       slot: torch.Tensor, page: int) -> None:
    """Triton kernel, in place; same arguments and result as :func:`page_bounds_append_ref`."""
    if not HAS_TRITON:
        raise RuntimeError("page_bounds_append needs Triton; use page_bounds_append_ref")
    _check(kmin, kmax, filled, k_buf, slot, page)
    b, h, _, d = kmin.shape
    if b * h == 0:
        return
    if k_buf.stride(3) != 1 or kmin.stride(3) != 1 or kmax.stride(3) != 1:
        raise ValueError("page_bounds_append needs a contiguous last dimension")
    fv = filled.view(torch.uint8)
    _page_bounds_kernel[(b * h,)](
        kmin, kmax, fv, k_buf, slot, d, kmin.stride(0), kmin.stride(1), kmin.stride(2),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), fv.stride(0), fv.stride(1), fv.stride(2),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        HK=h, PAGE=page, BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=1)
