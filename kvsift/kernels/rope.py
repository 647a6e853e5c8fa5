"""Rotary position embedding of queries and keys, one launch for both.

``rope(q, k, cos, sin)``: ``q (batch, q_heads, seq, dim)``, ``k (batch, kv_heads, seq, dim)``
(any strides with a contiguous last dimension, e.g. the transposed views a projection gives),
``cos``/``sin`` ``(batch or 1, seq, dim)`` of their dtype; returns ``(q_embed, k_embed)`` with
the strides of ``q`` and ``k``: ``x * cos + rotate_half(x) * sin`` where ``rotate_half(x) =
cat(-x[d/2:], x[:d/2])``, each product and the sum rounded to the dtype as PyTorch rounds them, so
the result is transformers' ``apply_rotary_pos_emb`` bit for bit. transformers runs it as about
fourteen launches per layer (slices, negation, concatenation, products, sums for each tensor).

``rope_ref`` is that PyTorch code; ``rope`` is one Triton launch for both tensors, a program per
(batch, head, position) of each (the queries' programs first).
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q and k must be (batch, heads, seq, dim) of one batch, seq and dim, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    b, _, n, d = q.shape
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (n, d) or t.shape[0] not in (1, b):
            raise ValueError(f"{name} must be (batch or 1, seq, dim) = (.., {n}, {d}), got {tuple(t.shape)}")
    if d % 2:
        raise ValueError(f"rope needs an even head dim, got {d}")


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (PyTorch, transformers' apply_rotary_pos_emb with ``unsqueeze_dim=1``)."""
    _check(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return (q * c) + (rot(q) * s), (k * c) + (rot(k) * s)


if HAS_TRITON:

    @triton.jit
    def _round_as(x, BF16: tl.constexpr):
        """fp32 ``x`` rounded to bf16 (``BF16``) or fp16, to nearest even, returned as fp32.

        Integer arithmetic on the bits rather than ``x.to(dtype).to(tl.float32)``: on the H200 that
        pair gave results one unit in the last place away from PyTorch's products (2026-12-02), and
        bit operations cannot be contracted or folded away. fp16: subnormals and overflow to inf as
        IEEE rounds them."""
        u = x.to(tl.uint32, bitcast=True)
        if BF16:   # bf16 shares fp32's exponent: round the low 16 bits away
            u = u + 0x7FFF + ((u >> 16) & 1)
            u = (u >> 16) << 16
        else:
            sign = (u >> 31) << 31
            a = u & 0x7FFFFFFF
            e = (a >> 23).to(tl.int32) - 127                       # unbiased exponent
            n = a + 0xFFF + ((a >> 13) & 1)                         # normal: keep 10 mantissa bits
            n = (n >> 13) << 13
            n = tl.where(n > 0x477FE000, 0x7F800000, n)             # above 65504: inf
            sig = (a & 0x7FFFFF) | 0x800000                         # subnormal: multiples of 2**-24
            drop = tl.minimum(tl.maximum(-1 - e, 1), 31).to(tl.uint32)
            one = tl.full(sig.shape, 1, tl.uint32)
            r = (sig + (one << (drop - 1)) - 1 + ((sig >> drop) & 1)) >> drop
            sub = (r.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
            u = tl.where(e < -14, sub, n) | sign
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def _rope_row(x_ptr, o_ptr, c_ptr, s_ptr, pid, H, L, sx_b, sx_h, sx_l, so_b, so_h, so_l, sc_b, sc_l, ss_b, ss_l,
                  HALF: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr, BF16: tl.constexpr):
        """Row ``pid`` (over (batch, head, position)) of one tensor."""
        pos = pid % L
        h = (pid // L) % H
        b = pid // (L * H)
        offs = tl.arange(0, BLOCK)
        m = offs < HALF
        dt = o_ptr.dtype.element_ty
        xb = x_ptr + b * sx_b + h * sx_h + pos * sx_l
        x1 = tl.load(xb + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xb + HALF + offs, mask=m, other=0.0).to(tl.float32)
        cb = c_ptr + b * sc_b + pos * sc_l
        sb = s_ptr + b * ss_b + pos * ss_l
        c1 = tl.load(cb + offs, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cb + HALF + offs, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sb + offs, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sb + HALF + offs, mask=m, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, every product and the sum rounded to the dtype (PyTorch's order)
        if EXACT:
            lo = _round_as(_round_as(x1 * c1, BF16) + _round_as((-x2) * s1, BF16), BF16)
            hi = _round_as(_round_as(x2 * c2, BF16) + _round_as(x1 * s2, BF16), BF16)
        else:   # fp32: no rounding between the steps
            lo = x1 * c1 + (-x2) * s1
            hi = x2 * c2 + x1 * s2
        ob = o_ptr + b * so_b + h * so_h + pos * so_l
        tl.store(ob + offs, lo.to(dt), mask=m)
        tl.store(ob + HALF + offs, hi.to(dt), mask=m)

    @triton.jit
    def _rope_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, c_ptr, s_ptr, HQ, HK, L, NQ,
                     sq_b, sq_h, sq_l, sqo_b, sqo_h, sqo_l, sk_b, sk_h, sk_l, sko_b, sko_h, sko_l,
                     sc_b, sc_l, ss_b, ss_l,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr, BF16: tl.constexpr):
        # the queries' rows (the first NQ programs), then the keys': both tensors in one launch
        pid = tl.program_id(0).to(tl.int64)
        if pid < NQ:
            _rope_row(q_ptr, qo_ptr, c_ptr, s_ptr, pid, HQ, L, sq_b, sq_h, sq_l, sqo_b, sqo_h, sqo_l,
                      sc_b, sc_l, ss_b, ss_l, HALF, BLOCK, EXACT, BF16)
        else:
            _rope_row(k_ptr, ko_ptr, c_ptr, s_ptr, pid - NQ, HK, L, sk_b, sk_h, sk_l, sko_b, sko_h, sko_l,
                      sc_b, sc_l, ss_b, ss_l, HALF, BLOCK, EXACT, BF16)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel; same arguments and result as :func:`rope_ref` (one dtype for all four, their
    last dimensions contiguous)."""
    if not HAS_TRITON:
        raise RuntimeError("rope needs Triton; use rope_ref")
    _check(q, k, cos, sin)
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1 or any(t.stride(-1) != 1 for t in (q, k, cos, sin)):
        raise ValueError("rope needs one dtype for q, k, cos and sin and contiguous last dimensions")
    b, hq, n, d = q.shape
    hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)   # their strides (a transposed projection stays so)
    if n == 0 or b == 0 or hq + hk == 0:
        return qo, ko
    half = d // 2
    _rope_kernel[(b * (hq + hk) * n,)](
        q, qo, k, ko, cos, sin, hq, hk, n, b * hq * n, q.stride(0), q.stride(1), q.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), k.stride(0), k.stride(1), k.stride(2),
        ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), sin.stride(0) if sin.shape[0] > 1 else 0,
        sin.stride(1), HALF=half, BLOCK=max(16, triton.next_power_of_2(half)),
        EXACT=q.dtype in (torch.bfloat16, torch.float16), BF16=q.dtype == torch.bfloat16, num_warps=1)
    return qo, ko
