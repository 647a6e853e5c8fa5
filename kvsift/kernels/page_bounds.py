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

Int8 bounds (``inv (batch, kv_heads, 1, head_dim)`` float32, the inverse of
:func:`~kvsift.kernels.chunk_scores.int8_bounds`' power-of-two scale): ``kmin``/``kmax`` are int8
codes, and the key enters them as ``floor(k * inv)`` and ``ceil(k * inv)`` (exact: ``inv`` is a
power of two), clamped to [-127, 127], so the codes stay outward-rounded bounds.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton
from kvsift.kernels.chunk_scores import key_bounds


def _check(kmin, kmax, filled, k_buf, slot, page, inv=None) -> None:
    if kmin.shape != kmax.shape or kmin.dim() != 4 or filled.shape != kmin.shape[:3]:
        raise ValueError(f"kmin/kmax must be (batch, kv_heads, n_pages, dim) and filled (batch, kv_heads, n_pages), "
                         f"got {tuple(kmin.shape)}, {tuple(kmax.shape)}, {tuple(filled.shape)}")
    if k_buf.dim() != 4 or k_buf.shape[:2] != kmin.shape[:2] or k_buf.shape[3] != kmin.shape[3]:
        raise ValueError(f"k_buf must be (batch, kv_heads, capacity, dim) matching the bounds, got {tuple(k_buf.shape)}")
    if slot.numel() != 1 or slot.dtype.is_floating_point:
        raise ValueError("slot must be a one-element integer tensor")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise ValueError(f"page must be a positive int, got {page!r}")
    if (inv is not None) != (kmin.dtype == torch.int8):
        raise ValueError("int8 bounds go with their inverse scale, float bounds without one")
    if inv is not None and (inv.dtype != torch.float32 or tuple(inv.shape) != (*kmin.shape[:2], 1, kmin.shape[3])):
        raise ValueError(f"inv must be float32 (batch, kv_heads, 1, head_dim), got {inv.dtype} {tuple(inv.shape)}")


def page_bounds_append_ref(kmin: torch.Tensor, kmax: torch.Tensor, filled: torch.Tensor, k_buf: torch.Tensor,
                           slot: torch.Tensor, page: int, inv: torch.Tensor | None = None) -> None:
    """Reference (PyTorch), in place; see the module docstring."""
    _check(kmin, kmax, filled, k_buf, slot, page, inv)
    s = slot.reshape(1).to(torch.int64)
    k_lo, k_hi = key_bounds(k_buf.index_select(2, s), kmin.dtype, inv)   # (b, h, 1, d) each
    p = s // page
    first = (s % page == 0).view(1, 1, 1, 1)
    kmin.index_copy_(2, p, torch.where(first, k_lo, torch.minimum(kmin.index_select(2, p), k_lo)))
    kmax.index_copy_(2, p, torch.where(first, k_hi, torch.maximum(kmax.index_select(2, p), k_hi)))
    filled.index_fill_(2, p, True)


if HAS_TRITON:

    @triton.jit
    def _page_bounds_kernel(lo_ptr, hi_ptr, f_ptr, k_ptr, slot_ptr, inv_ptr, D,
                            sl_b, sl_h, sl_p, sh_b, sh_h, sh_p, sf_b, sf_h, sf_p, sk_b, sk_h, sk_n, si_b, si_h,
                            HK: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr = False):
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
        lo = tl.load(lo_p, mask=m, other=0)
        hi = tl.load(hi_p, mask=m, other=0)
        if INT8:   # codes: the key times the power-of-two inverse scale (exact), rounded outward
            kq = k.to(tl.float32) * tl.load(inv_ptr + b * si_b + h * si_h + offs, mask=m, other=0.0)
            k_lo = tl.minimum(tl.maximum(tl.floor(kq), -127.0), 127.0)
            k_hi = tl.minimum(tl.maximum(tl.ceil(kq), -127.0), 127.0)
        else:
            # compare in fp32 (exact for fp16/bf16 values; the key is first rounded to the bounds' dtype)
            k_lo = k.to(lo.dtype).to(tl.float32)
            k_hi = k_lo
        new_lo = tl.where(first, k_lo, tl.minimum(lo.to(tl.float32), k_lo))
        new_hi = tl.where(first, k_hi, tl.maximum(hi.to(tl.float32), k_hi))
        tl.store(lo_p, new_lo.to(lo.dtype), mask=m)
        tl.store(hi_p, new_hi.to(hi.dtype), mask=m)
        tl.store(f_ptr + b * sf_b + h * sf_h + p * sf_p, 1)


def page_bounds_append(kmin: torch.Tensor, kmax: torch.Tensor, filled: torch.Tensor, k_buf: torch.Tensor,
                       slot: torch.Tensor, page: int, inv: torch.Tensor | None = None) -> None:
    """Triton kernel, in place; same arguments and result as :func:`page_bounds_append_ref`."""
    if not HAS_TRITON:
        raise RuntimeError("page_bounds_append needs Triton; use page_bounds_append_ref")
    _check(kmin, kmax, filled, k_buf, slot, page, inv)
    b, h, _, d = kmin.shape
    if b * h == 0:
        return
    if k_buf.stride(3) != 1 or kmin.stride(3) != 1 or kmax.stride(3) != 1:
        raise ValueError("page_bounds_append needs a contiguous last dimension")
    fv = filled.view(torch.uint8)
    _page_bounds_kernel[(b * h,)](
        kmin, kmax, fv, k_buf, slot, inv if inv is not None else k_buf, d, kmin.stride(0), kmin.stride(1), kmin.stride(2),
        kmax.stride(0), kmax.stride(1), kmax.stride(2), fv.stride(0), fv.stride(1), fv.stride(2),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2),
        *((inv.stride(0), inv.stride(1)) if inv is not None else (0, 0)),
        HK=h, PAGE=page, BLOCK_D=max(16, triton.next_power_of_2(d)), INT8=inv is not None, num_warps=1)
