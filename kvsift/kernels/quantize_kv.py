"""Quantize KV slots into KIVI's layout (:mod:`kvsift.cache.quant`) in two launches: what a
quantized store does when its full-precision window fills during decode (``QuantKV`` flush) and
when a prefilled layer moves into it (``QuantKV.from_dense``).

``quantize_kv(keys, values, positions, bits, group)``: ``keys``/``values (batch, kv_heads, n,
head_dim)`` (``n`` a multiple of ``group``), ``positions (batch, kv_heads, n)`` (slots at ``< 0``
take no part in a range). Returns ``(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)``:
keys per channel over groups of ``group`` slots (``k_scale/k_zero (batch, kv_heads, n / group,
head_dim)`` fp16), values per slot over groups of ``value_group(group, head_dim)`` channels
(``v_scale/v_zero (batch, kv_heads, n, head_dim / vgroup)``), codes packed along head_dim
(``(batch, kv_heads, n, head_dim * bits / 8)`` uint8). The ranges: zero point the group's minimum
rounded down to fp16, scale ``(max - zero) / levels`` rounded up to fp16 (so every real value is
within ``scale / 2`` of its code's); codes ``round((x - zero) / scale)`` (half to even) clamped.

``quantize_kv_ref`` is :func:`kvsift.cache.quant.quantize_keys` and ``quantize_values`` (PyTorch,
about thirty kernels and fp32 copies of the input). The Triton kernels do the same arithmetic in
the same order (IEEE division, fp16 rounding, the same nudges to the next fp16), one program per
(row, KV head, key group, channel block) and per (row, KV head, block of slots): the same bits.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def _check(keys, values, positions, bits, group) -> None:
    if bits not in (2, 4):
        raise ValueError(f"bits must be 4 or 2, got {bits!r}")
    if keys.dim() != 4 or values.shape != keys.shape or positions.shape != keys.shape[:3]:
        raise ValueError(f"keys/values must be (batch, kv_heads, n, head_dim) and positions (batch, kv_heads, n), got "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(positions.shape)}")
    if keys.shape[2] % group:
        raise ValueError(f"the slots ({keys.shape[2]}) must be whole groups of {group}")
    if keys.shape[3] % (8 // bits):
        raise ValueError(f"head_dim {keys.shape[3]} does not pack at {bits} bits")


def quantize_kv_ref(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bits: int, group: int):
    """Reference (PyTorch): ``(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)``."""
    from kvsift.cache.quant import quantize_keys, quantize_values

    _check(keys, values, positions, bits, group)
    return (*quantize_keys(keys, positions, bits, group), *quantize_values(values, positions, bits, group))


if HAS_TRITON:

    @triton.jit
    def _next_f16(z, up: tl.constexpr):
        """The fp16 next to fp16 ``z`` towards +inf (``up``) or -inf (finite ``z``; ``torch.nextafter``)."""
        b = z.to(tl.int16, bitcast=True)
        if up:
            n = tl.where(z > 0, b + 1, tl.where(z < 0, b - 1, 1))
        else:
            n = tl.where(z > 0, b - 1, tl.where(z < 0, b + 1, -32767))   # 0x8001: -(smallest subnormal)
        return n.to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _range(lo, hi, LEVELS: tl.constexpr):
        """fp16 ``(scale, zero)`` of ranges ``[lo, hi]`` (fp32; ``lo = inf``: an empty group, 0 and 0)
        as :func:`kvsift.cache.quant.range_params` computes them (60000: its ``_FP16_MAX``)."""
        empty = lo == float("inf")
        lo = tl.minimum(tl.maximum(tl.where(empty, 0.0, lo), -60000.0), 60000.0)
        hi = tl.minimum(tl.maximum(tl.where(empty, 0.0, hi), -60000.0), 60000.0)
        z = lo.to(tl.float16)
        z = tl.where(z.to(tl.float32) > lo, _next_f16(z, False), z)
        want = tl.math.div_rn(hi - z.to(tl.float32), LEVELS * 1.0)
        s = want.to(tl.float16)
        s = tl.where(s.to(tl.float32) < want, _next_f16(s, True), s)
        return s, z

    @triton.jit
    def _group_range(x, valid, AXIS: tl.constexpr, LEVELS: tl.constexpr):
        """fp16 ``(scale, zero)`` of ``x`` (fp32) reduced along ``AXIS`` over the ``valid`` elements
        (broadcast to ``x``), values clamped to +-60000 first, as :func:`kvsift.cache.quant._params`."""
        xc = tl.minimum(tl.maximum(x, -60000.0), 60000.0)
        lo = tl.min(tl.where(valid, xc, float("inf")), axis=AXIS)
        hi = tl.max(tl.where(valid, xc, float("-inf")), axis=AXIS)
        return _range(lo, hi, LEVELS)

    @triton.jit
    def _code(x, s, z, LEVELS: tl.constexpr):
        """``round((x - zero) / scale)`` half to even, clamped to the levels (a scale of 0 divides by 1)."""
        sf = s.to(tl.float32)
        v = tl.math.div_rn(x - z.to(tl.float32), tl.where(sf > 0, sf, 1.0))
        v = tl.minimum(tl.maximum(v, -1.0), LEVELS + 1.0)
        v = (v + 12582912.0) - 12582912.0          # 1.5 * 2**23: rounds half to even in fp32
        return tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0).to(tl.int32)

    @triton.jit
    def _pack(c, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr):
        """Codes ``(ROWS, COLS)`` int32 -> bytes ``(ROWS, COLS / PER)`` (channel ``j*PER + i`` at bit ``i*BITS``)."""
        c3 = tl.reshape(c, (ROWS, COLS // PER, PER))
        sh = (tl.arange(0, PER) * BITS)[None, None, :]
        return tl.sum(c3 << sh, axis=2).to(tl.uint8)

    @triton.jit
    def _row_head(HK):
        """This program's (row, KV head) from the grid's first axis, as int64."""
        pid = tl.program_id(0)
        return (pid // HK).to(tl.int64), (pid % HK).to(tl.int64)

    @triton.jit
    def _quantize_keys_kernel(k_ptr, p_ptr, kc_ptr, ks_ptr, kz_ptr, HK, NGRP,
                              sk_b, sk_h, sk_n, sp_b, sp_h, sp_n,
                              GROUP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BITS: tl.constexpr,
                              PER: tl.constexpr, LEVELS: tl.constexpr):
        # one program: (row, KV head) x key group x BLOCK_C channels; ranges over the group's slots
        b, h = _row_head(HK)
        grp = tl.program_id(1).to(tl.int64)
        cb = tl.program_id(2)
        slot = grp * GROUP + tl.arange(0, GROUP)
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        x = tl.load(k_ptr + b * sk_b + h * sk_h + slot[:, None] * sk_n + ch[None, :]).to(tl.float32)
        valid = tl.load(p_ptr + b * sp_b + h * sp_h + slot * sp_n) >= 0
        s, z = _group_range(x, valid[:, None], 0, LEVELS)                    # per channel, (BLOCK_C,)
        c = _code(x, s[None, :], z[None, :], LEVELS)
        out = ((b * HK + h) * NGRP + grp) * D + ch                           # (row, head, group, channel)
        tl.store(ks_ptr + out, s)
        tl.store(kz_ptr + out, z)
        W: tl.constexpr = D // PER
        byte = cb * (BLOCK_C // PER) + tl.arange(0, BLOCK_C // PER)
        rows = (b * HK + h) * (NGRP * GROUP) + slot
        tl.store(kc_ptr + rows[:, None] * W + byte[None, :], _pack(c, GROUP, BLOCK_C, BITS, PER))

    @triton.jit
    def _quantize_values_kernel(v_ptr, p_ptr, vc_ptr, vs_ptr, vz_ptr, HK, N,
                                sv_b, sv_h, sv_n, sp_b, sp_h, sp_n,
                                BLOCK_T: tl.constexpr, D: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                                PER: tl.constexpr, LEVELS: tl.constexpr):
        # one program: (row, KV head) x BLOCK_T slots; ranges over each slot's groups of VG channels
        b, h = _row_head(HK)
        tb = tl.program_id(1).to(tl.int64)
        slot = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        live = slot < N
        ch = tl.arange(0, D)
        x = tl.load(v_ptr + b * sv_b + h * sv_h + slot[:, None] * sv_n + ch[None, :], mask=live[:, None],
                    other=0.0).to(tl.float32)
        valid = tl.load(p_ptr + b * sp_b + h * sp_h + slot * sp_n, mask=live, other=-1) >= 0
        NG: tl.constexpr = D // VG
        x3 = tl.reshape(x, (BLOCK_T, NG, VG))
        s, z = _group_range(x3, valid[:, None, None], 2, LEVELS)             # per slot and group, (BLOCK_T, NG)
        c = _code(x3, s[:, :, None], z[:, :, None], LEVELS)
        rows = (b * HK + h) * N + slot
        g = tl.arange(0, NG)
        tl.store(vs_ptr + rows[:, None] * NG + g[None, :], s, mask=live[:, None])
        tl.store(vz_ptr + rows[:, None] * NG + g[None, :], z, mask=live[:, None])
        W: tl.constexpr = D // PER
        byte = tl.arange(0, W)
        tl.store(vc_ptr + rows[:, None] * W + byte[None, :], _pack(tl.reshape(c, (BLOCK_T, D)), BLOCK_T, D, BITS, PER),
                 mask=live[:, None])


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bits: int, group: int):
    """Triton; same arguments and result as :func:`quantize_kv_ref` (head_dim and the value group
    powers of two, as the models' are; the group at most 1024 slots)."""
    from kvsift.cache.quant import SCALE_DTYPE, value_group

    if not HAS_TRITON:
        raise RuntimeError("quantize_kv needs Triton (pip install triton); use quantize_kv_ref")
    _check(keys, values, positions, bits, group)
    b, h, n, d = keys.shape
    vg = value_group(group, d)
    if d & (d - 1) or vg & (vg - 1) or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("quantize_kv needs a power-of-two head_dim and value group and unit-stride channels")
    dev, per = keys.device, 8 // bits
    kc = torch.empty(b, h, n, d // per, dtype=torch.uint8, device=dev)
    vc = torch.empty_like(kc)
    ks = torch.empty(b, h, n // group, d, dtype=SCALE_DTYPE, device=dev)
    kz = torch.empty_like(ks)
    vs = torch.empty(b, h, n, d // vg, dtype=SCALE_DTYPE, device=dev)
    vz = torch.empty_like(vs)
    if b * h * n == 0:
        return kc, ks, kz, vc, vs, vz
    levels = (1 << bits) - 1
    block_c = max(per, min(d, 4096 // group))               # a (group, channels) tile of about 4k values
    sp = positions.stride()
    _quantize_keys_kernel[(b * h, n // group, d // block_c)](
        keys, positions, kc, ks, kz, h, n // group, *keys.stride()[:3], *sp,
        GROUP=group, D=d, BLOCK_C=block_c, BITS=bits, PER=per, LEVELS=levels, num_warps=4, enable_fp_fusion=False)
    block_t = max(1, min(64, 4096 // d))
    _quantize_values_kernel[(b * h, triton.cdiv(n, block_t))](
        values, positions, vc, vs, vz, h, n, *values.stride()[:3], *sp,
        BLOCK_T=block_t, D=d, VG=vg, BITS=bits, PER=per, LEVELS=levels, num_warps=4, enable_fp_fusion=False)
    return kc, ks, kz, vc, vs, vz
