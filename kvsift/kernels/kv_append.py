"""A static decode step's KV write: the new token's key, value and position at the layer's device
slot, then the slot advanced, in one launch.

``k_buf``/``v_buf (batch, kv_heads, capacity, head_dim)`` and ``pos_buf (batch, kv_heads,
capacity)`` int32 are a layer's static buffers; ``slot (1,)`` int64 the next slot to write, on the
device (``SiftLayer.wslot``: a CUDA graph replays the write at whatever slot it holds);
``key``/``value (batch, kv_heads, 1, head_dim)`` the step's new states (any strides with a unit
stride on ``head_dim``, e.g. a projection's transposed view) and ``positions (batch, 1)`` integer
their positions. Writes ``k_buf[:, :, slot] = key``, ``v_buf[:, :, slot] = value``,
``pos_buf[:, :, slot] = positions`` (every KV head), then ``slot += 1``. ``slot`` must be inside the
buffers (the engine sizes them for every step); the kernel writes nothing past them.

``kv_append_ref`` is the PyTorch it replaces (three ``index_copy_`` and an ``add_``: four launches
per layer and step); ``kv_append`` is one Triton program that writes every row and then advances
the slot (one program, so the slot is read by all of it before it changes: a decode step's KV is
``batch * kv_heads`` rows of ``head_dim``, a few KiB to a few hundred).
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton

# "triton": False sends the dispatcher to the reference (bench/gpu_decode.py's kv_append rows and
# '@kvref' systems time the two)
TUNING = {"triton": True}


def _check(k_buf, v_buf, pos_buf, slot, key, value, positions) -> None:
    if k_buf.dim() != 4 or v_buf.shape != k_buf.shape or pos_buf.shape != k_buf.shape[:3]:
        raise ValueError(f"k_buf / v_buf must be (batch, kv_heads, capacity, head_dim) of one shape and pos_buf "
                         f"(batch, kv_heads, capacity), got {tuple(k_buf.shape)}, {tuple(v_buf.shape)}, "
                         f"{tuple(pos_buf.shape)}")
    b, h, _, d = k_buf.shape
    if tuple(key.shape) != (b, h, 1, d) or tuple(value.shape) != (b, h, 1, d):
        raise ValueError(f"key / value must be (batch, kv_heads, 1, head_dim) = ({b}, {h}, 1, {d}), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if tuple(slot.shape) != (1,) or slot.dtype != torch.int64:
        raise ValueError(f"slot must be int64 of shape (1,), got {slot.dtype} {tuple(slot.shape)}")
    if tuple(positions.shape) != (b, 1) or positions.is_floating_point():
        raise ValueError(f"positions must be integers of shape (batch, 1) = ({b}, 1), got {positions.dtype} "
                         f"{tuple(positions.shape)}")


def kv_append_ref(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, slot: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
    """Reference (PyTorch); in place, shapes in the module docstring."""
    _check(k_buf, v_buf, pos_buf, slot, key, value, positions)
    b, h = k_buf.shape[:2]
    k_buf.index_copy_(2, slot, key)
    v_buf.index_copy_(2, slot, value)
    pos_buf.index_copy_(2, slot, positions[:, None, :].expand(b, h, 1).to(pos_buf.dtype))
    slot.add_(1)


if HAS_TRITON:

    @triton.jit
    def _kv_append_kernel(k_ptr, v_ptr, p_ptr, slot_ptr, key_ptr, val_ptr, pos_ptr, BH, CAP,
                          sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sp_b, sp_h, sp_n,
                          kk_b, kk_h, kv_b, kv_h, sq_b,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        slot = tl.load(slot_ptr)
        rows = tl.where(slot < CAP, BH, 0)   # a slot past the buffers: no row written
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        for r0 in range(0, BH, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mr = r < rows
            b = (r // H).to(tl.int64)
            h = (r % H).to(tl.int64)
            m = mr[:, None] & mask_d[None, :]
            kx = tl.load(key_ptr + b[:, None] * kk_b + h[:, None] * kk_h + offs_d[None, :], mask=m)
            tl.store(k_ptr + b[:, None] * sk_b + h[:, None] * sk_h + slot * sk_n + offs_d[None, :], kx, mask=m)
            vx = tl.load(val_ptr + b[:, None] * kv_b + h[:, None] * kv_h + offs_d[None, :], mask=m)
            tl.store(v_ptr + b[:, None] * sv_b + h[:, None] * sv_h + slot * sv_n + offs_d[None, :], vx, mask=m)
            pos = tl.load(pos_ptr + b * sq_b, mask=mr)
            tl.store(p_ptr + b * sp_b + h * sp_h + slot * sp_n, pos.to(p_ptr.dtype.element_ty), mask=mr)
        tl.debug_barrier()   # every thread has read the slot before it moves
        tl.store(slot_ptr, slot + 1)


def kv_append(k_buf: torch.Tensor, v_buf: torch.Tensor, pos_buf: torch.Tensor, slot: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> None:
    """Triton kernel, one launch; same arguments and effect as :func:`kv_append_ref` (the buffers
    need a unit stride on ``head_dim``, as ``key`` and ``value`` do)."""
    if not HAS_TRITON:
        raise RuntimeError("kv_append needs Triton (pip install triton); use kv_append_ref")
    _check(k_buf, v_buf, pos_buf, slot, key, value, positions)
    if k_buf.stride(3) != 1 or v_buf.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        raise ValueError("kv_append needs a unit stride on head_dim (buffers, key and value)")
    b, h, cap, d = k_buf.shape
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(triton.next_power_of_2(b * h), 8192 // block_d))   # rows per iteration
    _kv_append_kernel[(1,)](
        k_buf, v_buf, pos_buf, slot, key, value, positions, b * h, cap,
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        pos_buf.stride(0), pos_buf.stride(1), pos_buf.stride(2),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), positions.stride(0),
        H=h, D=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
