"""Decode attention over quantized KV (:mod:`kvsift.cache.quant`), dequantized while it is read.

q ``(batch, q_heads, head_dim)`` is one new token per sequence. The KV of a layer, slots ``0 ..
capacity-1``:

* ``k_codes``/``v_codes (batch, kv_heads, capacity, head_dim * bits // 8)`` uint8 codes, packed along
  head_dim (byte ``j``, bits ``i*bits ..``: channel ``j * (8 // bits) + i``);
* ``k_scale``/``k_zero (batch, kv_heads, >= capacity / group, head_dim)`` fp16: slot ``s`` uses
  group ``s // group`` (``group = capacity // ...`` is passed as ``group``);
* ``v_scale``/``v_zero (batch, kv_heads, capacity, head_dim // vgroup)`` fp16: per slot, channel
  ``c`` uses ``c // vgroup``;
* ``k_res``/``v_res (batch, kv_heads, rcap, head_dim)`` in q's dtype: the full-precision window,
  slot ``s >= res_start`` at ``s - res_start``; ``res_start (1,)`` int64 device tensor (the first
  slot not quantized), or ``(batch,)``: one per row (rows of a running batch that joined at other
  points, each flushing its window on its own schedule);
* ``key_pos (batch, kv_heads, capacity)`` int32 positions and ``query_pos (batch,)``: a slot is
  attended iff ``0 <= key_pos <= query_pos`` (and ``> query_pos - window``); slot indices past the
  capacity or past the window's buffer are skipped.

``slot_idx (batch, kv_heads, n_sel)`` (``-1`` = unused) or None (every slot), ``slot_count``, the
``group = q_heads // kv_heads`` GQA sharing, ``num_splits`` and ``return_lse`` are as in
:mod:`kvsift.kernels.sparse_decode_attention`. Returns ``(batch, q_heads, head_dim)`` in q's dtype.

``quant_decode_attention_ref`` gathers the selected slots' codes and scales block by block (``block``
table entries at a time), dequantizes them to fp32 and merges the blocks by log-sum-exp: memory
bounded by the block, never a dequantized copy of the cache. The Triton kernel reads the packed
codes and the scales of each block of slots straight from the cache and dequantizes in registers
(split-K, online softmax for the ``group`` query heads of a KV head, one ``tl.dot`` per block, as
the sparse kernel); ``kvsift.kernels.dispatch.quant_decode_attention`` picks. Over every slot (no
table) with one value scale per slot, it dequantizes no tile at all: a block of slots inside one key
group scores ``(q * k_scale) . codes + q . k_zero`` and adds ``(p * v_scale) @ codes + sum(p *
v_zero)`` to the output (``_fold_block``), so only the codes are unpacked. The dequantized keys are
then not rounded to bf16 as the reference rounds them: scores may differ from it by less than a
bf16 rounding.
"""

from __future__ import annotations

import torch

from kvsift.kernels._flash import group_offsets, online_softmax_step, store_split
from kvsift.kernels._triton import HAS_TRITON, tl, triton
from kvsift.kernels.sparse_decode_attention import (_LOG2E, SplitLaunch, _check_count, _check_pos, merge_attention,
                                                    slot_rows, weighted_sum_over_any_bits)

# launch settings (smaller slot blocks than the sparse kernel: codes, scales and the window are
# live at once); on the H200 the kernel took 0.34 ms at 128k, batch 1, int4, against 0.13 for SDPA
# over bf16. A bit-plane variant (q.k as a sum of per-plane dots, no unpacked tile) was 11-18% slower
# at every launch setting there (bench/results/gpu_kivi_planes_h200.json) and was removed.
# ``fold``: over every slot (no slot table) with one value scale per slot, blocks of slots sharing a
# key group skip the dequantized tiles (``_fold_block``), launched with the ``fold_*`` settings;
# ``splits_per_sm``: programs per multiprocessor the split-K plan aims for. On the H200 (128k,
# int4, bench/results/gpu_kivi_fold_h200.json) the folded kernel with blocks of 64 slots, 2 warps
# and 16 programs per SM took 0.261 / 1.85 ms at batch 1 / 8 against 0.343 / 3.90 for the
# dequantized tiles at the table path's settings (SDPA over bf16: 0.128 / 0.948).
# ``fold_halves``: how the folded dots round the scaled query and weights (``_split_dot``): one fp16
# dot (1) took 0.224 / 1.58 ms there against 0.259 / 1.86 for two bf16 halves (2); 4-bit codes as
# two planes of channels (no interleave) were slower, 0.307 / 2.06 ms, and 0.257 / 1.70 with one
# fp16 dot (bench/results/gpu_kivi_halves_h200.json), and were removed. ``fold_magic``: the folded
# path unpacks codes straight to fp16 (``_unpack16``: OR into 1024.0's bits, minus 1024; no
# int-to-float conversion, a quarter-rate instruction, nor the fp32 -> fp16 one after it); not yet
# timed on a GPU (False: through fp32, as before). A variant with the code tile as the score dot's
# left operand (no transpose of the tile) did not compile with Triton 3.6 on the H200 and was
# removed. ``fold_min_blocks``:
# splits of at least 32 blocks unless that leaves fewer than ``fold_floor_per_sm`` (4) programs per
# SM: the sweep's best at batch 1 was 4 programs per SM (0.219 ms, 64 splits of 32 blocks) and at
# batch 8 16 per SM (1.60 ms, 33 splits of 63 blocks), the plans this makes at both
# (gpu_kivi_merge_h200.json); not yet run as the default.
# ``fold_asm`` (4-bit codes, CUDA): the codes unpacked by inline PTX (two byte permutes, four
# three-input logic operations and two fp16x2 subtractions per 4 bytes: 8 codes) into two fp16 planes,
# the even and the odd channels, and each dot split over them (the query's channels split alike, the
# value planes' outputs interleaved once per block). The SASS of the default unpack spends about 10
# instructions per code, and its key codes reach the dot's operand layout one byte at a time through
# shared memory (bench/kernel_sass.py); the assembly is opaque to Triton's layout hoisting, so the
# planes go to the dots as fp16 tiles. On the H200 (2026-12-03, 128k, int4,
# bench/results/gpu_kivi_asm_h200.json) it took 0.162 / 1.186 ms at batch 1 / 8 against 0.206 /
# 1.508 for the unpack to fp16, and end to end kivi decoded at 10.64 against 12.22 ms/token
# (gpu_kivi_e2e_asm_default_h200.json), so it is the default for 4-bit codes (2-bit codes keep the
# unpack). ``fold_num_stages``: the folded loop's pipeline depth (``num_stages`` is the table path's);
# 3 took 0.159 / 1.164 ms in that sweep against 0.162 / 1.186 for 2 (4: 0.161 / 1.183). Computing a
# key group's query terms once per group (a loop-carried branch) instead of once per block was
# slower there: 0.173 / 1.276 ms (gpu_kivi_hoist_h200.json), and was dropped. ``i32``: slots, positions
# and window starts as int32 in the kernel (where every per-slot offset fits, ``_fits_i32``), so the
# per-element address arithmetic is 32-bit; the SASS of the default spent 579 of its 3,792
# instructions on integer multiply-adds (kernel_sass_asm_h200.json). On the H200 (2026-12-03, 128k,
# int4, bench/results/gpu_kivi_offset_i32_h200.json) it took 0.1375 / 0.978 ms at batch 1 / 8
# against 0.1606 / 1.164 without, and end to end kivi decoded at 9.97 against 10.69 ms/token
# (full: 10.18; gpu_kivi_e2e_i32_default_h200.json), so it is the default.
# ``fold_offset`` (with ``fold_asm``): the unpack leaves the fp16 planes offset (``1024 + code``,
# ``64 + code``: six instructions per 8 codes instead of twelve, no shift and no subtraction) and the
# block takes the offsets off its dots through the sums of their fp16 operands, inside the
# zero-point terms it adds anyway. CUDA-tested (``asm-offset``); no faster in that sweep (0.1629 /
# 1.168 ms alone, 0.1380 / 0.977 with ``i32``): the unpack is not what bounds the loop, so it stays off.
TUNING = {"block_s": 32, "num_warps": 4, "num_stages": 2, "splits_per_sm": 2,
          "fold": True, "fold_block_s": 64, "fold_num_warps": 2, "fold_splits_per_sm": 16, "fold_halves": 1,
          "fold_magic": True, "fold_min_blocks": 32, "fold_floor_per_sm": 4, "fold_asm": True,
          "fold_num_stages": 3, "i32": True, "fold_offset": False}


def _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, res_start, key_pos, query_pos,
           slot_idx, group) -> int:
    """Validate shapes; returns bits."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, q_heads, head_dim), got {tuple(q.shape)}")
    b, hq, d = q.shape
    if k_codes.dim() != 4 or v_codes.shape != k_codes.shape or k_codes.dtype != torch.uint8 \
            or v_codes.dtype != torch.uint8:
        raise ValueError(f"k_codes and v_codes must both be uint8 (batch, kv_heads, capacity, packed), got "
                         f"{k_codes.dtype} {tuple(k_codes.shape)} and {v_codes.dtype} {tuple(v_codes.shape)}")
    kb, hk, cap, dp = k_codes.shape
    if kb != b or hk == 0 or hq % hk:
        raise ValueError(f"q {tuple(q.shape)} and k_codes {tuple(k_codes.shape)} disagree on batch or heads")
    if dp == 0 or (8 * dp) % d or (8 * dp) // d not in (2, 4):
        raise ValueError(f"packed codes of width {dp} fit neither 4 nor 2 bits for head_dim {d}")
    bits = 8 * dp // d
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if k_scale.shape != k_zero.shape or k_scale.shape[:2] != (b, hk) or k_scale.shape[3] != d \
            or k_scale.shape[2] * group < cap:
        raise ValueError(f"k_scale/k_zero must be (batch, kv_heads, >= capacity / group, head_dim), got "
                         f"{tuple(k_scale.shape)}, {tuple(k_zero.shape)}")
    if v_scale.shape != v_zero.shape or v_scale.shape[:3] != (b, hk, cap) or d % v_scale.shape[3]:
        raise ValueError(f"v_scale/v_zero must be (batch, kv_heads, capacity, head_dim // vgroup), got "
                         f"{tuple(v_scale.shape)}, {tuple(v_zero.shape)}")
    if k_res.dim() != 4 or v_res.shape != k_res.shape or k_res.shape[:2] != (b, hk) or k_res.shape[3] != d:
        raise ValueError(f"k_res/v_res must be (batch, kv_heads, rcap, head_dim), got {tuple(k_res.shape)}")
    if tuple(res_start.shape) not in ((1,), (b,)) or res_start.is_floating_point():
        raise ValueError(f"res_start must be a (1,) or (batch,) integer tensor, got {res_start.dtype} "
                         f"{tuple(res_start.shape)}")
    if key_pos is None or query_pos is None:
        raise ValueError("quantized attention masks by position: key_pos and query_pos are required")
    if slot_idx is not None and (slot_idx.dim() != 3 or slot_idx.shape[:2] != (b, hk)
                                 or slot_idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"slot_idx must be int32/int64 (batch={b}, kv_heads={hk}, n_sel), got "
                         f"{slot_idx.dtype} {tuple(slot_idx.shape)}")
    ts = [q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, res_start, key_pos, query_pos]
    if slot_idx is not None:
        ts.append(slot_idx)
    if len({t.device for t in ts}) != 1:
        raise ValueError("every tensor must be on one device")
    return bits


def _unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes ``(..., d * bits // 8)`` uint8 -> ``(..., d)`` fp32, low bits first (as
    :mod:`kvsift.kernels.quantize_kv` packs them): each byte's ``8 // bits`` codes by a shift and a
    mask over the uint8 bytes, written straight into their strided lanes of the float output (one
    pass each, the conversion included). For 4,096 slots of 64 channels on the CPU: 0.08-0.15 ms at
    4 bits, against 0.27 for a lookup of each byte in a code table and 0.13-0.52 for stacking the
    uint8 codes then converting; 0.16 at 2 bits, as the table."""
    per, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(*packed.shape, per, dtype=torch.float32, device=packed.device)
    for i in range(per):   # the lowest code needs no shift, the highest no mask
        c = packed if i == 0 else packed >> (i * bits)
        out[..., i] = c if i == per - 1 else c & mask
    return out.view(*packed.shape[:-1], -1)


def _dequant_rows(codes, scale, zero, idx, bits, group, per_channel_groups: bool):
    """Codes at slots ``idx (batch, kv_heads, s)`` (>= 0) dequantized: ``(batch, kv_heads, s, d)`` fp32."""
    c, = slot_rows(codes, idx=idx)
    c = _unpack_codes(c, bits)
    if per_channel_groups:  # keys: one scale per channel for each group of slots
        s, z = slot_rows(scale, zero, idx=idx // group)
        return c * s.float() + z.float()
    vg = c.shape[-1] // scale.shape[-1]
    s, z = slot_rows(scale, zero, idx=idx)
    return c * s.float().repeat_interleave(vg, -1) + z.float().repeat_interleave(vg, -1)


def _dequant_slice(codes, scale, zero, a: int, c: int, bits: int, group: int, per_channel_groups: bool):
    """Codes of the slots ``a .. c - 1`` dequantized, read as slices (nothing indexed per slot):
    ``(batch, kv_heads, c - a, d)`` fp32, the values :func:`_dequant_rows` gives for those slots."""
    x = _unpack_codes(codes[:, :, a:c], bits)
    b, hk, n, d = x.shape
    if per_channel_groups:  # one scale per channel for each group of slots
        g0, g1 = a // group, -(-c // group)
        if a % group == 0 and n % group == 0:   # whole groups: the scales broadcast over their slots
            xg = x.view(b, hk, n // group, group, d)
            xg.mul_(scale[:, :, g0:g1, None].float()).add_(zero[:, :, g0:g1, None].float())
            return x
        s = scale[:, :, g0:g1].repeat_interleave(group, 2)[:, :, a - g0 * group: c - g0 * group]
        z = zero[:, :, g0:g1].repeat_interleave(group, 2)[:, :, a - g0 * group: c - g0 * group]
        return x.mul_(s.float()).add_(z.float())
    ng = scale.shape[-1]                        # values: one scale per slot and group of channels
    xg = x.view(b, hk, n, ng, d // ng)
    xg.mul_(scale[:, :, a:c, :, None].float()).add_(zero[:, :, a:c, :, None].float())
    return x


def _dense_block(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, rs: int, s0: int, e: int,
                 bits: int, group: int):
    """Every slot ``s0 .. e - 1`` as ``k, v (batch, kv_heads, e - s0, d)`` fp32 by slices: the
    quantized ones (``< rs``) dequantized and rounded to the window's dtype, the window's rows
    (``rs ..``) as they are, zeros past the window's buffer (masked by the caller)."""
    rcap = k_res.shape[2]
    ks, vs = [], []
    qc = min(e, rs)
    if qc > s0:
        ks.append(_dequant_slice(k_codes, k_scale, k_zero, s0, qc, bits, group, True).to(k_res.dtype).float())
        vs.append(_dequant_slice(v_codes, v_scale, v_zero, s0, qc, bits, group, False).to(v_res.dtype).float())
    ra, rc = max(s0, rs), min(e, rs + rcap)
    if rc > ra:
        ks.append(k_res[:, :, ra - rs: rc - rs].float())
        vs.append(v_res[:, :, ra - rs: rc - rs].float())
    past = e - max(s0, rc, qc)
    if past > 0:
        b, hk, _, d = k_res.shape
        ks.append(k_res.new_zeros(b, hk, past, d, dtype=torch.float32))
        vs.append(v_res.new_zeros(b, hk, past, d, dtype=torch.float32))
    return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2))


def quant_decode_attention_ref(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                               v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                               k_res: torch.Tensor, v_res: torch.Tensor, res_start: torch.Tensor,
                               key_pos: torch.Tensor, query_pos: torch.Tensor, slot_idx: torch.Tensor | None,
                               scale: float, group: int, window: int | None = None,
                               slot_count: torch.Tensor | None = None, num_splits: int | None = None,
                               return_lse: bool = False, block: int = 4096):
    """Reference (PyTorch): per block of ``block`` table entries, gather the codes and scales of the
    selected slots, dequantize (rounded to the window's dtype, as the kernel and a dequantized
    copy hold them), float32 softmax; blocks merged by log-sum-exp. On the CPU, every slot
    (``slot_idx`` None) with one window start is read by slices instead (:func:`_dense_block`, the
    same values). Shapes in the module docstring. ``num_splits`` is the Triton kernel's launch setting (ignored here)."""
    bits = _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, res_start, key_pos,
                  query_pos, slot_idx, group)
    _check_pos(k_codes, key_pos, query_pos, window)
    _check_count(slot_idx, slot_count)
    b, hq, d = q.shape
    hk, cap = k_codes.shape[1], k_codes.shape[2]
    rcap = k_res.shape[2]
    if slot_idx is None:
        idx_all = torch.arange(cap, device=q.device).expand(b, hk, cap)
    else:
        idx_all = slot_idx.to(torch.int64)
        if slot_count is not None:
            idx_all = torch.where(torch.arange(idx_all.shape[2], device=q.device) < slot_count[..., None], idx_all, -1)
    qg = q.float().reshape(b, hk, hq // hk, d)
    qp = query_pos.to(torch.int64)[:, None, None]
    rs = res_start.to(torch.int64).reshape(-1, 1, 1)                  # (1 or batch, 1, 1)
    # every slot with one window start for all rows, on the CPU: the slots read as slices, not
    # gathered (the window start is read on the host: never on CUDA, where a graph may be recording)
    dense = slot_idx is None and res_start.numel() == 1 and cap > 0 and q.device.type == "cpu"
    rs0 = int(res_start.reshape(-1)[0]) if dense else 0
    parts = []
    for s0 in range(0, max(1, idx_all.shape[2]), block):
        idx = idx_all[:, :, s0 : s0 + block]
        if dense:
            e = min(s0 + block, cap)
            kp = key_pos[:, :, s0:e].to(torch.int64)
        else:
            idx = torch.where((idx >= 0) & (idx < cap), idx, -1)
            kp = torch.where(idx >= 0, key_pos.gather(2, idx.clamp(min=0)).to(torch.int64), -1)
        ok = (kp >= 0) & (kp <= qp)
        if window is not None:
            ok &= kp > qp - window
        ok &= idx - rs < rcap                                             # past the window's buffer: none
        if dense:
            k, v = _dense_block(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, rs0, s0, e,
                                bits, group)
            w = torch.matmul(qg, k.transpose(-1, -2)) * scale
            w = w.masked_fill(~ok[:, :, None, :], float("-inf"))
            out, lse = weighted_sum_over_any_bits(w, v, ok[..., None])      # unused slots: any bits
            parts.append((out.reshape(b, hq, d), lse.reshape(b, hq)))
            continue
        safe = torch.where(ok, idx, 0)
        quant = safe < rs
        ri = torch.where(quant, 0, safe - rs)
        kq = _dequant_rows(k_codes, k_scale, k_zero, torch.where(quant, safe, 0), bits, group, True)
        vq = _dequant_rows(v_codes, v_scale, v_zero, torch.where(quant, safe, 0), bits, group, False)
        # dequantized to the KV dtype (what the kernel feeds its dot products, and what a
        # dequantized copy holds), then float32 math
        kq, vq = kq.to(k_res.dtype).float(), vq.to(v_res.dtype).float()
        kr, vr = slot_rows(k_res, v_res, idx=ri)
        k = torch.where(quant[..., None], kq, kr.float())                           # (b, hk, s, d)
        v = torch.where(quant[..., None], vq, vr.float())
        w = torch.matmul(qg, k.transpose(-1, -2)) * scale                           # (b, hk, g, s)
        w = w.masked_fill(~ok[:, :, None, :], float("-inf"))
        p = torch.softmax(w, dim=-1).nan_to_num(0.0)
        parts.append((torch.matmul(p, v).reshape(b, hq, d), torch.logsumexp(w, dim=-1).reshape(b, hq)))
    if len(parts) == 1:
        out, lse = parts[0]
        out = out.to(q.dtype)
    else:
        out = merge_attention(parts).to(q.dtype)
        lse = torch.logsumexp(torch.stack([x[1] for x in parts]), dim=0)
    return (out, lse) if return_lse else out


if HAS_TRITON:

    @triton.jit
    def _interleaved(b, BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr):
        """Packed bytes ``(S, D // PER)`` (int16 or int32) -> integer codes ``(S, D)`` of the same type
        (channel ``j*PER + i`` at bit ``i*BITS`` of byte ``j``): the per-bit-slot planes interleaved
        along the last axis."""
        if PER == 2:
            c = tl.interleave(b & LEVELS, (b >> BITS) & LEVELS)
        else:  # PER == 4: [c0, c2] and [c1, c3] interleaved, then the two interleaved
            c = tl.interleave(tl.interleave(b & LEVELS, (b >> (2 * BITS)) & LEVELS),
                              tl.interleave((b >> BITS) & LEVELS, (b >> (3 * BITS)) & LEVELS))
        return c

    @triton.jit
    def _unpack(b, BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr):
        """Packed bytes ``(S, D // PER)`` int32 -> codes ``(S, D)`` fp32 (:func:`_interleaved`)."""
        return _interleaved(b, BITS, PER, LEVELS).to(tl.float32)

    @triton.jit
    def _unpack16(b, BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr):
        """:func:`_unpack` to fp16 without an int-to-float conversion (a quarter-rate instruction, and
        the fp32 -> fp16 one after it): a code ``c`` OR-ed into the bits of fp16 1024.0 (``0x6400``)
        is the fp16 ``1024 + c`` exactly, minus 1024 is ``c``. ``b``: packed bytes as int16."""
        return (_interleaved(b, BITS, PER, LEVELS) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def _planes_asm(b, OFFSET: tl.constexpr = False):
        """Packed 4-bit bytes ``(S, D // 2)`` uint8 -> ``(low, high)`` fp16 ``(S, D // 2)`` each: the
        codes of channels ``2j`` and ``2j + 1`` (exact), by inline PTX on 4 bytes at a time: each
        byte pair spread into 16-bit lanes (``prmt``), a nibble OR-ed into fp16 1024.0's bits
        (``lop3``), 1024 subtracted (``sub.f16x2``). CUDA only.

        ``OFFSET``: nothing subtracted and no shift, six instructions per 8 codes instead of twelve:
        ``low`` is ``1024 + code`` (the low nibble in the mantissa of 1024.0, whose last place is 1)
        and ``high`` is ``64 + code`` (the high nibble, bits 4-7, in the mantissa of 64.0, whose
        last place is 1/16); the caller takes the offsets off the dot products (:func:`_fold_block`)."""
        if OFFSET:
            return tl.inline_asm_elementwise(
                """
                {
                .reg .b32 t0, t1, z;
                mov.b32 z, 0;
                prmt.b32 t0, $4, z, 0x4140;
                prmt.b32 t1, $4, z, 0x4342;
                lop3.b32 $0, t0, 0x000f000f, 0x64006400, 0xea;
                lop3.b32 $1, t1, 0x000f000f, 0x64006400, 0xea;
                lop3.b32 $2, t0, 0x00f000f0, 0x54005400, 0xea;
                lop3.b32 $3, t1, 0x00f000f0, 0x54005400, 0xea;
                }
                """,
                "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b32 t0, t1, m, z;
            mov.b32 m, 0x64006400;
            mov.b32 z, 0;
            prmt.b32 t0, $4, z, 0x4140;
            prmt.b32 t1, $4, z, 0x4342;
            lop3.b32 $0, t0, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 $1, t1, 0x000f000f, 0x64006400, 0xea;
            shr.b32 t0, t0, 4;
            shr.b32 t1, t1, 4;
            lop3.b32 $2, t0, 0x000f000f, 0x64006400, 0xea;
            lop3.b32 $3, t1, 0x000f000f, 0x64006400, 0xea;
            sub.f16x2 $0, $0, m;
            sub.f16x2 $1, $1, m;
            sub.f16x2 $2, $2, m;
            sub.f16x2 $3, $3, m;
            }
            """,
            "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)

    @triton.jit
    def _codes(b, BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr, MAGIC: tl.constexpr):
        """Loaded packed bytes ``(S, D // PER)`` -> exact codes ``(S, D)``: fp16 through
        :func:`_unpack16` (``MAGIC``), else fp32 through :func:`_unpack`."""
        if MAGIC:
            c = _unpack16(b.to(tl.int16), BITS, PER, LEVELS)
        else:
            c = _unpack(b.to(tl.int32), BITS, PER, LEVELS)
        return c

    @triton.jit
    def _round_bf16(x):
        """fp32 ``x`` rounded to the nearest bf16 (ties to even), kept in fp32."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _slot_block(it, stop, i_base, si_s, kp_base, sp_c, CAP, RCAP, WINDOW, qpos, rstart,
                    BLOCK_S: tl.constexpr, ALL: tl.constexpr, I32: tl.constexpr = False):
        """The ``BLOCK_S`` table entries from ``it`` (every slot when ``ALL``): their slots (0 where
        not valid), which are attended (in the table, the capacity, the window's buffer, and visible
        by position), and which of those are quantized (``isq``) or in the full-precision window.
        ``I32``: slots and positions as int32 (the launcher checks every per-slot offset fits), so
        the per-element address arithmetic is 32-bit."""
        offs_s = it + tl.arange(0, BLOCK_S)
        in_range = offs_s < stop
        if ALL:
            slot = offs_s
            valid = in_range
        else:
            slot = tl.load(i_base + offs_s * si_s, mask=in_range, other=-1)
            valid = slot >= 0
        if I32:
            slot = slot.to(tl.int32)
        else:
            slot = slot.to(tl.int64)
        valid = valid & (slot < CAP)
        kpos = tl.load(kp_base + tl.where(valid, slot, 0) * sp_c, mask=valid, other=-1)
        if I32:
            kpos = kpos.to(tl.int32)
        else:
            kpos = kpos.to(tl.int64)
        valid = valid & (kpos >= 0) & (kpos <= qpos)
        if WINDOW > 0:
            valid = valid & (kpos > qpos - WINDOW)
        valid = valid & (slot - rstart < RCAP)
        slot = tl.where(valid, slot, 0)
        isq = valid & (slot < rstart)                                       # quantized slots
        isr = valid & (slot >= rstart)                                      # full-precision window
        return slot, valid, isq, isr

    @triton.jit
    def _split_dot(a, codes, DT: tl.constexpr, HALVES: tl.constexpr, TRANS: tl.constexpr = False):
        """``a (M, K) fp32 @ codes (K, N)`` (small integers, exact in 16 bits) on the tensor cores with
        fp32 accumulation. The scaled operand ``a`` cancels against a zero-point term afterwards, so
        its rounding matters more than a rounding of dequantized KV does: ``HALVES == 2`` splits it
        into two ``DT`` halves (hi + lo, two dots, about 16 bits of mantissa); ``HALVES == 1`` rounds
        it once to fp16 (11 bits of mantissa, one dot; codes are exact in fp16 too). ``TRANS``: the
        codes are ``(N, K)``, transposed after their conversion."""
        if HALVES == 2:
            c = codes.to(DT)
            hi = a.to(DT)
            lo = (a - hi.to(tl.float32)).to(DT)
        else:
            c = codes.to(tl.float16)
            hi = a.to(tl.float16)
        if TRANS:
            c = tl.trans(c)
        r = tl.dot(hi, c)
        if HALVES == 2:
            r += tl.dot(lo, c)
        return r

    @triton.jit
    def _fold_block(qf, q, m_i, l_i, acc, it, slot, valid, isq, isr, rstart, qk_scale,
                    kc_base, skc_c, ks_base, kz_base, sks_g, vc_base, svc_c, vs_base, vz_base, svs_c,
                    rk_base, srk_c, rv_base, srv_c, offs_b, offs_d, mask_d,
                    BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr, KGROUP: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, HALVES: tl.constexpr, MAGIC: tl.constexpr,
                    ASM: tl.constexpr = False, OFFSET: tl.constexpr = False):
        """One block of ``BLOCK_S`` consecutive slots that share a key group (every slot, blocks
        aligned to the group), one value scale per slot, folded into the online softmax without
        dequantizing a tile: the scores are ``(q * k_scale) . codes + q . k_zero`` (one key group's
        scale and zero, ``(D,)`` each) and the output gains ``(p * v_scale) @ codes + sum(p *
        v_zero)``; only the codes are unpacked. Slots of the full-precision window (the tiles that
        reach it) read ``k_res``/``v_res``. ``MAGIC``: the codes unpacked to fp16 (:func:`_codes`).
        ``OFFSET`` (with ``ASM``): the code planes come as ``1024 + code`` (even channels) and ``64 +
        code`` (odd ones), and the offsets come off each dot as ``offset * sum`` of the very fp16
        operand that entered it (its rounding cancels exactly), folded into the zero-point terms
        the block adds anyway. Returns ``(m_i, l_i, acc)``."""
        kgi = it // KGROUP
        has_g = kgi * KGROUP < rstart           # the group was quantized (else its row may be garbage)
        ksr = tl.where(has_g, tl.load(ks_base + kgi * sks_g + offs_d, mask=mask_d, other=0.0).to(tl.float32), 0.0)
        kzr = tl.where(has_g, tl.load(kz_base + kgi * sks_g + offs_d, mask=mask_d, other=0.0).to(tl.float32), 0.0)
        # scores in log2 units from the start: the scaled query is then about 8x smaller (head_dim
        # 128), far from fp16's range where it is rounded to fp16 (HALVES == 1)
        qs = qf * (ksr * qk_scale)[None, :]                                  # (G_P, BLOCK_D)
        kb = tl.sum(qf * kzr[None, :], axis=1) * qk_scale                    # (G_P,)
        kraw = tl.load(kc_base + slot[:, None] * skc_c + offs_b[None, :], mask=isq[:, None], other=0)
        if ASM:   # two planes of channels (even, odd), the query's channels split alike
            klo, khi = _planes_asm(kraw, OFFSET)
            qse, qso = tl.split(tl.reshape(qs, (qs.shape[0], qs.shape[1] // 2, 2)))
            qse16 = qse.to(tl.float16)
            qso16 = qso.to(tl.float16)
            qk = tl.dot(qse16, tl.trans(klo)) + tl.dot(qso16, tl.trans(khi))
            if OFFSET:
                kb -= 1024.0 * tl.sum(qse16.to(tl.float32), axis=1) + 64.0 * tl.sum(qso16.to(tl.float32), axis=1)
        else:
            kcode = _codes(kraw, BITS, PER, LEVELS, MAGIC)                       # (BLOCK_S, BLOCK_D) exact
            if UPCAST or IEEE:
                qk = tl.dot(qs, tl.trans(kcode.to(tl.float32)), input_precision="ieee")
            else:
                qk = _split_dot(qs, kcode, q.dtype, HALVES, True)
        qk = qk + kb[:, None]
        any_r = tl.sum(isr.to(tl.int32), axis=0) > 0
        if any_r:
            ridx = tl.maximum(slot - rstart, 0)
            mr = isr[:, None] & mask_d[None, :]
            kr = tl.load(rk_base + ridx[:, None] * srk_c + offs_d[None, :], mask=mr, other=0.0)
            if UPCAST or IEEE:
                qk_r = tl.dot(qf, tl.trans(kr.to(tl.float32)), input_precision="ieee")
            else:
                qk_r = tl.dot(q, tl.trans(kr))
            qk = tl.where(isr[None, :], qk_r * qk_scale, qk)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])                                    # (G_P, BLOCK_S)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vsc = tl.load(vs_base + slot * svs_c, mask=isq, other=0.0).to(tl.float32)    # (BLOCK_S,)
        vzp = tl.load(vz_base + slot * svs_c, mask=isq, other=0.0).to(tl.float32)
        pq = tl.where(isq[None, :], p, 0.0)
        vraw = tl.load(vc_base + slot[:, None] * svc_c + offs_b[None, :], mask=isq[:, None], other=0)
        pv = pq * vsc[None, :]
        if ASM and OFFSET:   # the zero-point term and the planes' offsets added per plane, then interleaved
            vlo, vhi = _planes_asm(vraw, OFFSET)
            pv16 = pv.to(tl.float16)
            z = tl.sum(pq * vzp[None, :], axis=1)
            s16 = tl.sum(pv16.to(tl.float32), axis=1)
            o_even = tl.dot(pv16, vlo) + (z - 1024.0 * s16)[:, None]
            o_odd = tl.dot(pv16, vhi) + (z - 64.0 * s16)[:, None]
            o = tl.reshape(tl.join(o_even, o_odd), (pv.shape[0], vlo.shape[1] * 2))
        elif ASM:   # the even and the odd channels' outputs, interleaved back
            vlo, vhi = _planes_asm(vraw)
            pv16 = pv.to(tl.float16)
            o = tl.reshape(tl.join(tl.dot(pv16, vlo), tl.dot(pv16, vhi)), (pv.shape[0], vlo.shape[1] * 2))
        else:
            vcode = _codes(vraw, BITS, PER, LEVELS, MAGIC)
            if UPCAST or IEEE:
                o = tl.dot(pv, vcode.to(tl.float32), input_precision="ieee")
            else:  # the weights split too (the code sum cancels against sum(p * v_zero))
                o = _split_dot(pv, vcode, q.dtype, HALVES)
        if ASM and OFFSET:
            acc = acc * alpha[:, None] + o
        else:
            acc = acc * alpha[:, None] + o + tl.sum(pq * vzp[None, :], axis=1)[:, None]
        if any_r:
            ridx = tl.maximum(slot - rstart, 0)
            mr = isr[:, None] & mask_d[None, :]
            vr = tl.load(rv_base + ridx[:, None] * srv_c + offs_d[None, :], mask=mr, other=0.0)
            pr = tl.where(isr[None, :], p, 0.0)
            if UPCAST or IEEE:
                acc += tl.dot(pr, vr.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(pr.to(vr.dtype), vr)
        return m_new, l_i, acc

    @triton.jit
    def _quant_decode_split_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, rk_ptr, rv_ptr, rs_ptr,
                                   idx_ptr, out_ptr, po_ptr, plse_ptr,
                                   kp_ptr, qp_ptr, CAP, RCAP, WINDOW, sp_b, sp_h, sp_c,
                                   cnt_ptr, sc_b, sc_h, srs_b,
                                   S, split_size, qk_scale,
                                   sq_b, sq_h, sq_d,
                                   skc_b, skc_h, skc_c,
                                   sks_b, sks_h, sks_g,
                                   svc_b, svc_h, svc_c,
                                   svs_b, svs_h, svs_c,
                                   srk_b, srk_h, srk_c,
                                   srv_b, srv_h, srv_c,
                                   si_b, si_h, si_s,
                                   so_b, so_h,
                                   spo_bh, spo_s,
                                   HK: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                   BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr,
                                   KGROUP: tl.constexpr, VGROUP: tl.constexpr,
                                   DIRECT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                   ALL: tl.constexpr, HAS_CNT: tl.constexpr, FAST: tl.constexpr,
                                   NVG: tl.constexpr, ROUND_BF16: tl.constexpr, FOLD: tl.constexpr,
                                   HALVES: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr,
                                   I32: tl.constexpr = False, OFFSET: tl.constexpr = False):
        # one program: (batch, kv_head) x one split of the slot table; slot s < res_start is
        # dequantized from its codes (code * scale + zero), a later slot read from the window
        pid_s = tl.program_id(1)
        b, h, offs_g, offs_d, mask_g, mask_d = group_offsets(HK, G, G_P, D, BLOCK_D)
        byte_d = offs_d // PER                                              # byte of each channel
        shift = ((offs_d % PER) * BITS).to(tl.int32)                        # its bits in the byte
        vgrp = offs_d // VGROUP                                             # value scale of each channel
        offs_b = tl.arange(0, BLOCK_D // PER)                               # packed bytes of a row (FAST)
        offs_vg = tl.arange(0, NVG)                                         # value groups of a row (FAST)
        q = tl.load(q_ptr + b * sq_b + (h * G + offs_g[:, None]) * sq_h + offs_d[None, :] * sq_d,
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)      # (G_P, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
        kc_base = kc_ptr + b * skc_b + h * skc_h
        ks_base = ks_ptr + b * sks_b + h * sks_h
        kz_base = kz_ptr + b * sks_b + h * sks_h
        vc_base = vc_ptr + b * svc_b + h * svc_h
        vs_base = vs_ptr + b * svs_b + h * svs_h
        vz_base = vz_ptr + b * svs_b + h * svs_h
        rk_base = rk_ptr + b * srk_b + h * srk_h
        rv_base = rv_ptr + b * srv_b + h * srv_h
        i_base = idx_ptr + b * si_b + h * si_h
        kp_base = kp_ptr + b * sp_b + h * sp_h
        if I32:
            qpos = tl.load(qp_ptr + b).to(tl.int32)
            rstart = tl.load(rs_ptr + b * srs_b).to(tl.int32)
        else:
            qpos = tl.load(qp_ptr + b).to(tl.int64)
            rstart = tl.load(rs_ptr + b * srs_b).to(tl.int64)
        m_i = tl.full((G_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_P,), tl.float32)
        acc = tl.zeros((G_P, BLOCK_D), tl.float32)
        start = pid_s * split_size
        stop = tl.minimum(start + split_size, S)
        if HAS_CNT:
            stop = tl.minimum(stop, tl.load(cnt_ptr + b * sc_b + h * sc_h).to(tl.int32))
        if FOLD:
            qf = q.to(tl.float32)
        for it in range(start, stop, BLOCK_S):
            slot, valid, isq, isr = _slot_block(it, stop, i_base, si_s, kp_base, sp_c, CAP, RCAP, WINDOW, qpos,
                                                rstart, BLOCK_S, ALL, I32)
            if FOLD:
                m_i, l_i, acc = _fold_block(qf, q, m_i, l_i, acc, it, slot, valid, isq, isr, rstart, qk_scale,
                                            kc_base, skc_c, ks_base, kz_base, sks_g, vc_base, svc_c, vs_base,
                                            vz_base, svs_c, rk_base, srk_c, rv_base, srv_c, offs_b, offs_d,
                                            mask_d, BITS, PER, LEVELS, KGROUP, UPCAST, IEEE, HALVES, MAGIC, ASM,
                                            OFFSET)
            else:
                mq = isq[:, None] & mask_d[None, :]
                if FAST:
                    # BLOCK_D == D: each row's packed bytes load once, (BLOCK_S, D // PER), and unpack in
                    # registers (one load per byte, not one per channel); a value scale and zero load
                    # once per slot and channel group, then broadcast over the group's channels
                    cb = slot[:, None] * skc_c + offs_b[None, :]
                    kcode = _unpack(tl.load(kc_base + cb, mask=isq[:, None], other=0).to(tl.int32), BITS, PER, LEVELS)
                    vcode = _unpack(tl.load(vc_base + slot[:, None] * svc_c + offs_b[None, :], mask=isq[:, None],
                                            other=0).to(tl.int32), BITS, PER, LEVELS)
                    vs_off = slot[:, None] * svs_c + offs_vg[None, :]
                    vsc = tl.load(vs_base + vs_off, mask=isq[:, None], other=0.0).to(tl.float32)   # (BLOCK_S, NVG)
                    vzp = tl.load(vz_base + vs_off, mask=isq[:, None], other=0.0).to(tl.float32)
                    if NVG > 1:
                        vsc = tl.reshape(tl.broadcast_to(vsc[:, :, None], (BLOCK_S, NVG, VGROUP)), (BLOCK_S, BLOCK_D))
                        vzp = tl.reshape(tl.broadcast_to(vzp[:, :, None], (BLOCK_S, NVG, VGROUP)), (BLOCK_S, BLOCK_D))
                else:
                    kb = tl.load(kc_base + slot[:, None] * skc_c + byte_d[None, :], mask=mq, other=0).to(tl.int32)
                    kcode = ((kb >> shift[None, :]) & LEVELS).to(tl.float32)
                    vb = tl.load(vc_base + slot[:, None] * svc_c + byte_d[None, :], mask=mq, other=0).to(tl.int32)
                    vcode = ((vb >> shift[None, :]) & LEVELS).to(tl.float32)
                    vsc = tl.load(vs_base + slot[:, None] * svs_c + vgrp[None, :], mask=mq, other=0.0).to(tl.float32)
                    vzp = tl.load(vz_base + slot[:, None] * svs_c + vgrp[None, :], mask=mq, other=0.0).to(tl.float32)
                # keys: per-channel scale/zero of the slot's group (contiguous over the channels)
                kgi = slot // KGROUP
                ksc = tl.load(ks_base + kgi[:, None] * sks_g + offs_d[None, :], mask=mq, other=0.0).to(tl.float32)
                kzp = tl.load(kz_base + kgi[:, None] * sks_g + offs_d[None, :], mask=mq, other=0.0).to(tl.float32)
                k = kcode * ksc + kzp                                           # (BLOCK_S, BLOCK_D) fp32
                v = vcode * vsc + vzp
                # the full-precision window: read only by the tiles that reach it
                if tl.sum(isr.to(tl.int32), axis=0) > 0:
                    ridx = tl.maximum(slot - rstart, 0)                          # read only where isr (mask)
                    mr = isr[:, None] & mask_d[None, :]
                    kr = tl.load(rk_base + ridx[:, None] * srk_c + offs_d[None, :], mask=mr, other=0.0).to(tl.float32)
                    vr = tl.load(rv_base + ridx[:, None] * srv_c + offs_d[None, :], mask=mr, other=0.0).to(tl.float32)
                    k = tl.where(isr[:, None], kr, k)
                    v = tl.where(isr[:, None], vr, v)
                # rounded to the KV dtype (the reference's and a dequantized copy's values) for the dot
                # products; UPCAST (the CPU interpreter, whose bf16 cast does not round to nearest even)
                # rounds bf16 by hand and keeps fp32 math
                if not UPCAST:
                    k = k.to(q.dtype)
                    v = v.to(q.dtype)
                elif ROUND_BF16:
                    k = _round_bf16(k)
                    v = _round_bf16(v)
                elif rk_ptr.dtype.element_ty != tl.float32:
                    k = k.to(rk_ptr.dtype.element_ty).to(tl.float32)
                    v = v.to(rv_ptr.dtype.element_ty).to(tl.float32)
                m_i, l_i, acc = online_softmax_step(q, k, v, valid[None, :], qk_scale, m_i, l_i, acc, IEEE)
        store_split(out_ptr, po_ptr, plse_ptr, m_i, l_i, acc, b, h, pid_s, offs_g, offs_d, mask_g, mask_d,
                    so_b, so_h, spo_bh, spo_s, HK, G, DIRECT)


def _fits_i32(cap: int, rcap: int, s: int, key_pos, slot_idx, *tensors) -> bool:
    """Whether every per-slot offset of a launch fits int32: a slot (or a table entry) times its
    stride in each tensor, the per-(batch, head) bases staying int64. Positions are cast too; they
    are below the model's context length, far from 2**31. Host arithmetic only (no sync: the check
    runs inside CUDA-graph captures)."""
    lim = 2**31 - 1
    rows = max(cap, rcap, 1)
    if any(t.stride(2) * rows + t.shape[-1] > lim for t in (*tensors, key_pos)):
        return False
    return slot_idx is None or slot_idx.stride(2) * s <= lim


def quant_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                           v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor,
                           k_res: torch.Tensor, v_res: torch.Tensor, res_start: torch.Tensor,
                           key_pos: torch.Tensor, query_pos: torch.Tensor, slot_idx: torch.Tensor | None,
                           scale: float, group: int, window: int | None = None,
                           slot_count: torch.Tensor | None = None, num_splits: int | None = None,
                           return_lse: bool = False, block: int = 4096):
    """Triton kernel; same arguments and result as :func:`quant_decode_attention_ref` (``block`` is
    the reference's setting, ignored here). Needs unit strides on the last dimension of every KV
    tensor, and ``k_scale``/``k_zero`` (and ``v_scale``/``v_zero``) with equal strides."""
    if not HAS_TRITON:
        raise RuntimeError("quant_decode_attention needs Triton (pip install triton); use quant_decode_attention_ref")
    bits = _check(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, res_start, key_pos,
                  query_pos, slot_idx, group)
    _check_pos(k_codes, key_pos, query_pos, window)
    _check_count(slot_idx, slot_count)
    if any(t.stride(-1) != 1 for t in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)):
        raise ValueError("the quantized KV tensors need a unit stride on their last dimension")
    if k_scale.stride() != k_zero.stride() or v_scale.stride() != v_zero.stride():
        raise ValueError("scales and zeros must share strides")
    if k_res.dtype != q.dtype or v_res.dtype != q.dtype:
        raise TypeError(f"q and the full-precision window must share a dtype, got {q.dtype}, {k_res.dtype}")
    b, hq, d = q.shape
    hk, cap = k_codes.shape[1], k_codes.shape[2]
    g = hq // hk
    s = cap if slot_idx is None else slot_idx.shape[2]
    idx = slot_idx if slot_idx is not None else q
    si = slot_idx.stride() if slot_idx is not None else (0, 0, 0)
    cnt = slot_count if slot_count is not None else q
    sc = slot_count.stride() if slot_count is not None else (0, 0)
    if b == 0:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        return (out, torch.empty(b, hq, dtype=torch.float32, device=q.device)) if return_lse else out
    block_d = max(16, triton.next_power_of_2(d))
    # packed rows unpacked in registers: the head fills the block and the value groups are a power of two
    fast = block_d == d and v_scale.shape[3] & (v_scale.shape[3] - 1) == 0
    # every slot, one value scale per slot, blocks inside one key group: scales folded (_fold_block)
    fold = (TUNING["fold"] and fast and slot_idx is None and v_scale.shape[3] == 1
            and group % TUNING["fold_block_s"] == 0)
    pre = "fold_" if fold else ""
    bs = TUNING[pre + "block_s"]
    L = SplitLaunch.plan(q, hk, s, num_splits, return_lse, block_s=bs if block_d <= 128 else bs // 2,
                         splits_per_sm=TUNING[pre + "splits_per_sm"],
                         min_blocks=TUNING["fold_min_blocks"] if fold else 1, floor_per_sm=TUNING["fold_floor_per_sm"])
    sp = key_pos.stride()
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, res_start,
            idx, L.out, L.po, L.plse,
            key_pos, query_pos, cap, k_res.shape[2], int(window or 0), sp[0], sp[1], sp[2],
            cnt, sc[0], sc[1], res_start.stride(0) if res_start.shape[0] > 1 else 0,
            s, L.split_size, float(scale) * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
            k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
            v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
            v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
            k_res.stride(0), k_res.stride(1), k_res.stride(2),
            v_res.stride(0), v_res.stride(1), v_res.stride(2),
            si[0], si[1], si[2],
            L.out.stride(0), L.out.stride(1),
            L.spo_bh, L.spo_s)
    _quant_decode_split_kernel[(b * hk, L.splits)](
        *args, HK=hk, G=g, G_P=L.g_p, D=d, BLOCK_D=L.block_d, BLOCK_S=L.block_s, BITS=bits, PER=8 // bits,
        LEVELS=(1 << bits) - 1, KGROUP=group, VGROUP=d // v_scale.shape[3], DIRECT=L.direct, IEEE=L.ieee,
        UPCAST=L.upcast, ALL=slot_idx is None, HAS_CNT=slot_count is not None, FAST=fast,
        NVG=v_scale.shape[3] if fast else 1, ROUND_BF16=L.upcast and k_res.dtype == torch.bfloat16, FOLD=fold,
        HALVES=TUNING["fold_halves"], MAGIC=TUNING["fold_magic"],
        ASM=(asm := bool(TUNING["fold_asm"]) and fold and bits == 4 and q.is_cuda and not L.upcast and not L.ieee),
        OFFSET=asm and bool(TUNING["fold_offset"]),
        I32=bool(TUNING["i32"]) and _fits_i32(cap, k_res.shape[2], s, key_pos, slot_idx,
                                              k_codes, v_codes, k_scale, v_scale, k_res, v_res),
        num_warps=TUNING[pre + "num_warps"], num_stages=TUNING[pre + "num_stages"])
    return L.finish()
