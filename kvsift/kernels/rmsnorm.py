"""RMSNorm of Llama-family models (Llama, Qwen2/3, Mistral) in one launch.

``rmsnorm(x, weight, eps)``: ``x (..., hidden)``, ``weight (hidden,)`` of ``x``'s dtype; returns
``weight * (x * rsqrt(mean(x**2) + eps))`` with the normalised value computed in fp32, rounded to
``x``'s dtype, then multiplied by the weight and rounded again: transformers' ``LlamaRMSNorm``
step for step (its reduction order aside). transformers runs it as about seven launches (cast,
pow, mean, add, rsqrt, mul, cast, mul); at a batch-1 decode step each is a few microseconds of
latency for a few kilobytes of data, twice per layer.

``rmsnorm_ref`` is that PyTorch code; ``rmsnorm`` is one Triton program per row.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be (hidden,) = x's last dimension, got {tuple(weight.shape)} for "
                         f"x {tuple(x.shape)}")


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference (PyTorch, transformers' LlamaRMSNorm): ``(..., hidden)`` of ``x``'s dtype (of the
    promoted dtype when ``weight``'s differs)."""
    _check(x, weight)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, o_ptr, N, sx, so, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / N
        y = (x * tl.math.rsqrt(var + eps)).to(o_ptr.dtype.element_ty)     # rounded as .to(input_dtype)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * so + offs, (w * y.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton kernel; same arguments and result as :func:`rmsnorm_ref` (``weight`` of ``x``'s
    dtype, ``x``'s last dimension contiguous)."""
    if not HAS_TRITON:
        raise RuntimeError("rmsnorm needs Triton; use rmsnorm_ref")
    _check(x, weight)
    if weight.dtype != x.dtype or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("rmsnorm needs weight of x's dtype and contiguous last dimensions")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block = max(16, triton.next_power_of_2(n))
        _rmsnorm_kernel[(rows,)](x2, weight, out, n, x2.stride(0), out.stride(0), float(eps), BLOCK=block,
                                 num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16))
    return out.view(x.shape)
