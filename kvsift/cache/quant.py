"""Quantized KV (KIVI, Liu et al., 2024, arXiv 2402.02750): 4- or 2-bit asymmetric codes packed in
uint8, with a full-precision window of the newest tokens.

Layout of one layer (:class:`QuantKV`), slots ``0 .. capacity-1`` in the layer's order (a slot
never moves: a method's slot indices stay valid when its token is quantized; except in rows joined
at other points, below, which only the methods that name no slots reach):

* keys are quantized **per channel**: the ``group`` slots ``g*group .. g*group+group-1`` share one
  scale and zero point per channel, ``k_scale``/``k_zero (batch, kv_heads, capacity // group,
  head_dim)`` fp16; values **per token**: each slot's channels in groups of ``value_group(group,
  head_dim)`` share one, ``v_scale``/``v_zero (batch, kv_heads, capacity, head_dim // vgroup)``;
* codes ``k_codes``/``v_codes (batch, kv_heads, capacity, head_dim * bits // 8)`` uint8, packed
  along head_dim: byte ``j`` holds channels ``j*per .. j*per+per-1`` (``per = 8 // bits``), channel
  ``j*per + i`` in bits ``i*bits .. i*bits+bits-1``; ``x ~ code * scale + zero``;
* slots ``qtok ..`` (up to ``residual`` of them, the newest tokens) are kept in full precision in
  ``k_res``/``v_res (batch, kv_heads, rcap, head_dim)`` (residual index ``slot - qtok``) until the
  window is full; the next append then quantizes the window's whole groups (``qtok`` moves on);
* ``positions (batch, kv_heads, capacity)`` int32 (-1 = empty, padding or hole);
* ``qstart (1,)`` int64: ``qtok`` on the device (what the decode kernel reads), ``wslot (1,)``
  int64: the next write slot during static decode (CUDA graphs: no host state changes). Which
  static steps quantize the window is known on the host (:meth:`QuantKV.flush_at`): a step that
  does is a different kind of step (``SiftCache.decode_variant``, one CUDA graph each), the others
  only write the new token.
* rows at other points (a running batch that requests joined, :meth:`QuantKV.join`): each row's
  quantized groups at slots ``0 .. rows_q[i]-1``, its window the batch's last slots ``rows_s[i] ..``
  (``qstart (batch,)``), holes between; each row flushes on its own schedule, into its next aligned
  slots (:meth:`QuantKV._flush_row`: its window's tokens move there), so each row holds what it
  holds alone.

Quantization is asymmetric min/max over the real tokens of a group (position >= 0): ``zero`` is the
minimum rounded down to fp16, ``scale = (max - zero) / (2**bits - 1)`` rounded up, so every element
is within ``scale / 2`` of its dequantized value. Bytes per token and KV head:
``2 * head_dim * bits / 8`` (codes) ``+ 4 * head_dim / group`` (key scales and zeros) ``+ 4 *
head_dim / vgroup`` (value scales and zeros) (:func:`kv_bytes_per_token`): with ``group = 128``
and head_dim 128, 0.266x bf16 at 4 bits and 0.141x at 2 bits; head_dim 64 needs ``group = 256``
at 4 bits (0.270x). :func:`default_group` picks the smallest group within :data:`BYTE_TARGET`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
_FP16_MAX = 60000.0  # values past it saturate (fp16 scales and zeros)


def value_group(group: int, head_dim: int) -> int:
    """Channels sharing a value scale: ``group``, at most the whole head."""
    return min(group, head_dim)


def coded_token_bytes(head_dim: int, bits: int, vgroup: int) -> float:
    """Bytes of one token's packed K and V codes per KV head plus its fp16 value scales and zeros
    (one pair per ``vgroup`` channels): all of a quantized token but the key scales, which are
    shared by a group of tokens (a host chunk store keeps exactly this per token)."""
    return 2 * head_dim * bits / 8 + 2 * 2 * head_dim / vgroup


def kv_bytes_per_token(head_dim: int, bits: int, group: int) -> float:
    """Bytes of one token's quantized K and V per KV head, scales and zeros amortised over their
    group (the full-precision window and positions not counted); compare with ``4 * head_dim`` at
    bf16."""
    return coded_token_bytes(head_dim, bits, value_group(group, head_dim)) + 2 * 2 * head_dim / group


BYTE_TARGET = {4: 0.27, 2: 0.15}
"""Quantized bytes per token (codes, scales, zeros) as a fraction of bf16 that :func:`default_group`
keeps within."""


def default_group(head_dim: int, bits: int) -> int:
    """The smallest group (a power of two from 128 up to 1024) whose bytes per token are within
    :data:`BYTE_TARGET` of bf16 for this head_dim; 128 where none is (tiny heads)."""
    for group in (128, 256, 512, 1024):
        if kv_bytes_per_token(head_dim, bits, group) <= BYTE_TARGET[bits] * 4 * head_dim:
            return group
    return 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- codes ----------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes (..., d)`` integers in ``[0, 2**bits)`` -> ``(..., d * bits // 8)`` uint8 (byte ``j``:
    channels ``j*per ..``, channel ``j*per + i`` at bit ``i*bits``)."""
    per = 8 // bits
    c = codes.to(torch.int32).unflatten(-1, (codes.shape[-1] // per, per))
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., d * bits // 8)`` uint8 -> ``(..., d)`` int32 codes."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _params(x: torch.Tensor, valid: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` of ``x`` (fp32) reduced over ``dim`` (kept), over the ``valid``
    elements only (a group with none gets 0, 0): zero rounded down, scale rounded up."""
    x = x.clamp(-_FP16_MAX, _FP16_MAX)
    lo = torch.where(valid, x, float("inf")).amin(dim, keepdim=True)
    hi = torch.where(valid, x, float("-inf")).amax(dim, keepdim=True)
    return range_params(lo, hi, bits)


def range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` of groups whose real values span ``[lo, hi]`` (fp32, any shape; ``inf``
    where a group holds nothing: 0, 0): zero rounded down, scale rounded up, so ``code * scale +
    zero`` is within ``scale / 2`` of every value of the group."""
    levels = (1 << bits) - 1
    empty = ~torch.isfinite(lo)
    lo = lo.masked_fill(empty, 0.0).clamp(-_FP16_MAX, _FP16_MAX)
    hi = hi.masked_fill(empty, 0.0).clamp(-_FP16_MAX, _FP16_MAX)
    z = lo.to(SCALE_DTYPE)
    z = torch.where(z.float() > lo, torch.nextafter(z, torch.full_like(z, float("-inf"))), z)
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its rounded reciprocal, which
    # is not IEEE division (and not the quantize kernel's ``div_rn``) for levels 3 and 15
    want = (hi - z.float()) / torch.full_like(hi, levels)
    s = want.to(SCALE_DTYPE)
    s = torch.where(s.float() < want, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s, z


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s = scale.float()
    c = ((x - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))).round_()
    return c.clamp_(0, (1 << bits) - 1).nan_to_num_(0.0)


def codes_of(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed codes ``(..., d * bits // 8)`` uint8 of ``x (..., d)`` with ``scale, zero`` broadcast to it."""
    return pack(_codes(x.float(), scale, zero, bits), bits)


def quantize_keys(keys: torch.Tensor, positions: torch.Tensor, bits: int, group: int):
    """Per-channel codes of ``keys (batch, kv_heads, n, head_dim)`` (``n`` a multiple of ``group``)
    over groups of ``group`` slots, min/max over the slots whose ``positions (batch, kv_heads, n)``
    are >= 0. Returns ``codes (batch, kv_heads, n, head_dim * bits // 8)`` uint8, ``scale, zero
    (batch, kv_heads, n // group, head_dim)`` fp16. No host sync."""
    b, h, n, d = keys.shape
    x = keys.float().reshape(b, h, n // group, group, d)
    valid = (positions >= 0).view(b, h, n // group, group, 1)
    s, z = _params(x, valid, 3, bits)
    codes = pack(_codes(x, s, z, bits).view(b, h, n, d), bits)
    return codes, s.squeeze(3), z.squeeze(3)


def quantize_values(values: torch.Tensor, positions: torch.Tensor, bits: int, group: int):
    """Per-token codes of ``values (batch, kv_heads, n, head_dim)``, channels in groups of
    ``value_group(group, head_dim)``. Returns ``codes (batch, kv_heads, n, head_dim * bits // 8)``
    uint8, ``scale, zero (batch, kv_heads, n, head_dim // vgroup)`` fp16. No host sync."""
    b, h, n, d = values.shape
    vg = value_group(group, d)
    x = values.float().reshape(b, h, n, d // vg, vg)
    valid = (positions >= 0)[..., None, None]
    s, z = _params(x, valid, 4, bits)
    codes = pack(_codes(x, s, z, bits).view(b, h, n, d), bits)
    return codes, s.squeeze(4), z.squeeze(4)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group: int) -> torch.Tensor:
    """``codes (batch, kv_heads, n, head_dim * bits // 8)``, ``scale, zero (batch, kv_heads, >= n /
    group, head_dim)`` (slot ``i`` uses group ``i // group``) -> keys ``(batch, kv_heads, n,
    head_dim)`` fp32."""
    c = unpack(codes, bits).float()
    n = c.shape[2]
    g = -(-n // group)
    s = scale[:, :, :g].float().repeat_interleave(group, 2)[:, :, :n]
    z = zero[:, :, :g].float().repeat_interleave(group, 2)[:, :, :n]
    return c * s + z


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes (batch, kv_heads, n, head_dim * bits // 8)``, ``scale, zero (batch, kv_heads, n,
    head_dim // vgroup)`` -> values ``(batch, kv_heads, n, head_dim)`` fp32."""
    c = unpack(codes, bits).float()
    vg = c.shape[-1] // scale.shape[-1]
    return c * scale.float().repeat_interleave(vg, -1) + zero.float().repeat_interleave(vg, -1)


# ---- one layer's store ----------------------------------------------------------------------------
@dataclass
class QuantKV:
    """A layer's quantized KV (see the module docstring for the layout)."""

    k_codes: torch.Tensor     # (batch, kv_heads, capacity, head_dim * bits // 8) uint8
    k_scale: torch.Tensor     # (batch, kv_heads, capacity // group, head_dim) fp16
    k_zero: torch.Tensor
    v_codes: torch.Tensor     # (batch, kv_heads, capacity, head_dim * bits // 8) uint8
    v_scale: torch.Tensor     # (batch, kv_heads, capacity, head_dim // vgroup) fp16
    v_zero: torch.Tensor
    k_res: torch.Tensor       # (batch, kv_heads, rcap, head_dim) model dtype: slots qtok ..
    v_res: torch.Tensor
    positions: torch.Tensor   # (batch, kv_heads, capacity) int32
    qstart: torch.Tensor      # (1,) int64 = qtok, on the device
    bits: int = 4
    group: int = 128
    residual: int = 128
    qtok: int = 0             # slots below are quantized (a multiple of ``group``)
    length: int = 0           # used slots
    wslot: torch.Tensor | None = None   # static decode: next write slot (1,) int64
    r0: int = 0               # static decode: window slots used when it began
    # rows at other points (a running batch that requests joined, :meth:`join`): row ``i``'s quantized
    # groups are slots ``0 .. rows_q[i]-1``, its window slots ``rows_s[i] .. length-1`` (``qstart``
    # then holds ``rows_s`` on the device, ``(batch,)``), holes between; None: one layout for all
    rows_q: list[int] | None = None
    rows_s: list[int] | None = None
    qtokd: torch.Tensor | None = None   # static decode, per row: rows_q on the device (b,) int64
    ftab: torch.Tensor | None = None    # static decode, per row: (steps + 1, b) bool, rows flushing at a step
    r0s: list[int] | None = None        # static decode, per row: window slots used when it began
    w0: int = 0                          # static decode: the length when it began

    # ---- building -----------------------------------------------------------------------------
    @staticmethod
    def check_options(bits: int, group: int, residual: int, head_dim: int | None = None) -> None:
        """``ValueError`` naming the option at fault."""
        if bits not in (2, 4):
            raise ValueError(f"bits must be 4 or 2, got {bits!r}")
        if not (isinstance(group, int) and 8 <= group <= 1024 and group & (group - 1) == 0):
            raise ValueError(f"group must be a power of two in [8, 1024], got {group!r}")
        if not (isinstance(residual, int) and residual >= group and residual % group == 0):
            raise ValueError(f"residual must be a positive multiple of group ({group}), got {residual!r}")
        if head_dim is not None and (head_dim % value_group(group, head_dim) or head_dim % (8 // bits)):
            raise ValueError(f"head_dim {head_dim} is not a multiple of the value group {value_group(group, head_dim)}")

    @classmethod
    def empty(cls, b: int, h: int, d: int, capacity: int, rcap: int, dtype, device, bits: int, group: int,
              residual: int) -> "QuantKV":
        cls.check_options(bits, group, residual, d)
        capacity = _round_up(max(capacity, group), group)
        dp, vg = d * bits // 8, value_group(group, d)
        z16 = dict(dtype=SCALE_DTYPE, device=device)
        return cls(torch.zeros(b, h, capacity, dp, dtype=torch.uint8, device=device),
                   torch.zeros(b, h, capacity // group, d, **z16), torch.zeros(b, h, capacity // group, d, **z16),
                   torch.zeros(b, h, capacity, dp, dtype=torch.uint8, device=device),
                   torch.zeros(b, h, capacity, d // vg, **z16), torch.zeros(b, h, capacity, d // vg, **z16),
                   torch.zeros(b, h, rcap, d, dtype=dtype, device=device),
                   torch.zeros(b, h, rcap, d, dtype=dtype, device=device),
                   torch.full((b, h, capacity), -1, dtype=torch.int32, device=device),
                   torch.zeros(1, dtype=torch.int64, device=device), bits, group, residual)

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, bits: int = 4,
                   group: int = 128, residual: int = 128, room: int = 0) -> "QuantKV":
        """Quantize ``keys/values (batch, kv_heads, n, head_dim)`` at ``positions (batch, kv_heads,
        n)``: the state after appending them one by one, i.e. every whole window of ``residual``
        slots but the newest one quantized, the newest 1 .. ``residual`` slots in full precision.
        ``room``: free slots for what comes next (decode)."""
        b, h, n, d = keys.shape
        qtok = (n - 1) // residual * residual if n > 0 else 0
        st = cls.empty(b, h, d, n + room, residual, keys.dtype, keys.device, bits, group, residual)
        st.positions[:, :, :n] = positions
        if qtok:
            st._write(0, keys[:, :, :qtok], values[:, :, :qtok], positions[:, :, :qtok])
        st.k_res[:, :, : n - qtok] = keys[:, :, qtok:]
        st.v_res[:, :, : n - qtok] = values[:, :, qtok:]
        st.qtok, st.length = qtok, n
        st.qstart.fill_(qtok)
        return st

    def _write(self, start: int, keys, values, positions, rows: slice = slice(None)) -> None:
        """Quantize ``(batch, kv_heads, f, head_dim)`` (``f`` whole groups) into slots ``start ..``
        of the batch rows ``rows``."""
        from kvsift.kernels.dispatch import quantize_kv

        f, g = keys.shape[2], self.group
        kc, ks, kz, vc, vs, vz = quantize_kv(keys, values, positions, self.bits, g)   # Triton on CUDA
        self.k_codes[rows, :, start : start + f] = kc
        self.k_scale[rows, :, start // g : (start + f) // g] = ks
        self.k_zero[rows, :, start // g : (start + f) // g] = kz
        self.v_codes[rows, :, start : start + f] = vc
        self.v_scale[rows, :, start : start + f] = vs
        self.v_zero[rows, :, start : start + f] = vz

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.positions.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_res.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_res.dtype

    def _ensure(self, needed: int, exact: bool = False) -> None:
        """Room for ``needed`` slots (host side: grows the buffers, copying the used part): by half
        the capacity at least, or (``exact``: the caller knows every slot it will need) to ``needed``."""
        cap = self.capacity
        if needed <= cap:
            return
        new = _round_up(needed if exact else max(needed, int(math.ceil(cap * 1.5)) + self.group), self.group)
        b, h, _, d = self.k_res.shape
        st = QuantKV.empty(b, h, d, new, 0, self.dtype, self.k_res.device, self.bits, self.group, self.residual)
        g = cap // self.group
        st.k_codes[:, :, :cap], st.v_codes[:, :, :cap] = self.k_codes, self.v_codes
        st.k_scale[:, :, :g], st.k_zero[:, :, :g] = self.k_scale, self.k_zero
        st.v_scale[:, :, :cap], st.v_zero[:, :, :cap] = self.v_scale, self.v_zero
        st.positions[:, :, :cap] = self.positions
        for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "positions"):
            setattr(self, name, getattr(st, name))

    def _flush(self, f: int) -> None:
        """Quantize the window's oldest ``f`` slots (whole groups; host side)."""
        self._quantize_window(slice(None), self.qtok, self.qtok, f)
        self.qtok += f
        self.qstart.fill_(self.qtok)

    def _quantize_window(self, rows: slice, q0: int, s0: int, f: int) -> None:
        """The batch rows ``rows``' oldest ``f`` window slots (``s0 ..``, whole groups) quantized into
        slots ``q0 ..`` (the same slots when ``q0 == s0``; else those slots' positions move there and
        the window slots become holes), the rest of the window shifted to its start."""
        if q0 == s0:
            pos = self.positions[rows, :, q0 : q0 + f]
        else:
            pos = self.positions[rows, :, s0 : s0 + f].clone()
            self.positions[rows, :, s0 : s0 + f] = -1
            self.positions[rows, :, q0 : q0 + f] = pos
        self._write(q0, self.k_res[rows, :, :f], self.v_res[rows, :, :f], pos, rows=rows)
        rest = self.length - s0 - f
        self.k_res[rows, :, :rest] = self.k_res[rows, :, f : f + rest].clone()
        self.v_res[rows, :, :rest] = self.v_res[rows, :, f : f + rest].clone()

    # ---- appends --------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, step: int = 0) -> None:
        """Append ``keys/values (batch, kv_heads, q, head_dim)`` at token ``positions (batch, q)``
        after the used slots. When the window would pass ``residual`` slots, its whole groups are
        quantized first (so a new token is always attended in full precision). During static decode
        (:meth:`begin_static`) this is :meth:`_append_static` for static step ``step`` (0-based):
        device-side, no host sync."""
        if self.wslot is not None:
            return self._append_static(keys, values, positions, self.flush_at(step))
        if self.rows_q is not None:
            return self._append_rows(keys, values, positions)
        b, h, q, d = keys.shape
        n = self.length
        if n + q > self.qtok + self.residual:
            f = (n - self.qtok) // self.group * self.group
            if f:
                self._flush(f)
        self._ensure(n + q)
        need = n + q - self.qtok
        rcap = self.k_res.shape[2]
        if need > rcap or (rcap > self.residual and need <= self.residual):  # grow, or back to the window
            size = max(need, self.residual)
            used = n - self.qtok
            k, v = self.k_res.new_zeros(b, h, size, d), self.v_res.new_zeros(b, h, size, d)
            k[:, :, :used], v[:, :, :used] = self.k_res[:, :, :used], self.v_res[:, :, :used]
            self.k_res, self.v_res = k, v
        r = n - self.qtok
        self.k_res[:, :, r : r + q] = keys
        self.v_res[:, :, r : r + q] = values
        self.positions[:, :, n : n + q] = positions[:, None, :].to(torch.int32)
        self.length = n + q

    def begin_static(self, steps: int) -> None:
        """Fixed shapes for ``steps`` one-token appends: the flush the next append would do happens
        now, the buffers get room for every step, writes go to the device slot ``wslot``."""
        if self.rows_q is not None:
            return self._begin_static_rows(steps)
        with torch.inference_mode():  # the store's tensors were made in inference mode (prefill)
            if self.length + 1 > self.qtok + self.residual:
                self._flush((self.length - self.qtok) // self.group * self.group)
            # the steps' slots, exactly: static decode reads every slot of the capacity (and a larger
            # buffer would hold memory a batch of long sequences needs)
            self._ensure(self.length + steps, exact=True)
            if self.k_res.shape[2] < self.residual:
                raise RuntimeError("the full-precision window is smaller than residual")
            self.wslot = torch.tensor([self.length], dtype=torch.int64, device=self.k_res.device)
            self.r0 = self.length - self.qtok

    def flush_at(self, step: int) -> bool:
        """Whether static step ``step`` (0-based, one token per step) quantizes the window first: the
        window is full then (host arithmetic, the same rule as the host path); rows at other points:
        whether any row's does."""
        if self.wslot is None or step < 1:
            return False
        if self.r0s is not None:
            return any((r0 + step) % self.residual == 0 for r0 in self.r0s)
        return (self.r0 + step) % self.residual == 0

    def _append_static(self, keys, values, positions, flush: bool) -> None:
        """One token per row at ``wslot``; ``flush``: first quantize the full window into the slots it
        occupies and move ``qstart`` past it. Same result as the host path, no host sync, fixed
        shapes (CUDA-graph safe; a flushing step is its own kind of step)."""
        from kvsift.kernels.dispatch import quantize_kv

        if self.rows_q is not None:
            return self._append_static_rows(keys, values, positions, flush)
        R, g = self.residual, self.group
        if flush:
            ar = torch.arange(R, device=keys.device)
            slots = self.qstart + ar                                              # (R,)
            pos = self.positions.index_select(2, slots)
            kc, ks, kz, vc, vs, vz = quantize_kv(self.k_res[:, :, :R], self.v_res[:, :, :R], pos, self.bits, g)
            groups = self.qstart // g + ar[: R // g]
            self.k_codes.index_copy_(2, slots, kc)
            self.k_scale.index_copy_(2, groups, ks)
            self.k_zero.index_copy_(2, groups, kz)
            self.v_codes.index_copy_(2, slots, vc)
            self.v_scale.index_copy_(2, slots, vs)
            self.v_zero.index_copy_(2, slots, vz)
            self.qstart.add_(R)
        r = self.wslot - self.qstart
        self.k_res.index_copy_(2, r, keys)
        self.v_res.index_copy_(2, r, values)
        b, h = keys.shape[:2]
        self.positions.index_copy_(2, self.wslot, positions.to(torch.int32)[:, None, :].expand(b, h, 1))
        self.wslot.add_(1)

    def end_static(self, steps: int) -> None:
        """The host counters catch up with ``steps`` static appends (no device read)."""
        if self.rows_q is not None:
            for _ in range(steps):
                for i, s0 in enumerate(self.rows_s):
                    if self.length - s0 >= self.residual:
                        self.rows_q[i] += self.residual
                        self.rows_s[i] += self.residual
                self.length += 1
            self.qtok = min(self.rows_q)
            self.wslot = self.qtokd = self.ftab = self.r0s = None
            return
        for _ in range(steps):
            if self.length - self.qtok >= self.residual:
                self.qtok += self.residual
            self.length += 1
        self.wslot = None

    def written_slots(self, q: int) -> torch.Tensor:
        """``(q,)`` int64 device slots the last append wrote."""
        if self.wslot is not None:
            return self.wslot - 1 if q == 1 else self.wslot - q + torch.arange(q, device=self.wslot.device)
        return torch.arange(self.length - q, self.length, device=self.k_res.device)

    # ---- reads ----------------------------------------------------------------------------------
    def used(self, static: bool = False) -> int:
        """Slots to read: the used ones, or (static decode) the whole capacity."""
        return self.capacity if static or self.wslot is not None else self.length

    def dense(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``(batch, kv_heads, n, head_dim)`` in the model dtype (quantized slots
        dequantized, the window as it is) and ``positions (batch, kv_heads, n)`` of slots ``0 .. n-1``
        (default: the used ones). A copy, for prefill over the layer and summaries (not decode)."""
        n = self.used() if n is None else n
        keys = dequantize_keys(self.k_codes[:, :, :n], self.k_scale, self.k_zero, self.bits, self.group)
        values = dequantize_values(self.v_codes[:, :, :n], self.v_scale[:, :, :n], self.v_zero[:, :, :n], self.bits)
        quant, kr, vr = self._window_at(torch.arange(n, device=keys.device))
        keys = torch.where(quant, keys, kr)
        values = torch.where(quant, values, vr)
        return keys.to(self.dtype), values.to(self.dtype), self.positions[:, :, :n]

    def _window_at(self, slots: torch.Tensor):
        """For ``slots (s,)``: ``(quantized (rows, 1, s, 1) bool, window keys, window values)``, the
        window's ``(batch, kv_heads, s, head_dim)`` fp32 where a slot is in it (the row's own window
        start: ``qstart`` is ``(1,)`` or ``(batch,)``)."""
        b, h, rcap, d = self.k_res.shape
        qs = self.qstart.view(-1, 1)                                         # (1 or batch, 1)
        r = slots[None, :] - qs
        ri = torch.where((r >= 0) & (r < rcap), r, 0)                        # (1 or batch, s)
        gi = ri[:, None, :, None].expand(b, h, slots.shape[0], d)
        quant = (slots[None, :] < qs)[:, None, :, None]
        return quant, self.k_res.gather(2, gi).float(), self.v_res.gather(2, gi).float()

    def source(self):
        """The used slots dequantized as a :class:`~kvsift.methods.base.SlotSource` (prefill)."""
        from kvsift.methods.base import SlotSource

        k, v, p = self.dense()
        b, h, n = p.shape
        return SlotSource(k, v, p, torch.arange(n, device=p.device).expand(b, h, n), dense=True)

    def slot_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """Keys at ``slots (s,)`` int64 (device) ``(batch, kv_heads, s, head_dim)``, model dtype."""
        g = self.group
        kc = self.k_codes.index_select(2, slots)
        ks, kz = self.k_scale.index_select(2, slots // g), self.k_zero.index_select(2, slots // g)
        deq = unpack(kc, self.bits).float() * ks.float() + kz.float()
        quant, kr, _ = self._window_at(slots)
        return torch.where(quant, deq, kr).to(self.dtype)

    def kernel_args(self, static: bool = False) -> dict:
        """Keyword arguments of :func:`kvsift.kernels.dispatch.quant_decode_attention` for this store
        (its first ``used(static)`` slots)."""
        n = self.used(static)
        return dict(k_codes=self.k_codes[:, :, :n], k_scale=self.k_scale, k_zero=self.k_zero,
                    v_codes=self.v_codes[:, :, :n], v_scale=self.v_scale[:, :, :n], v_zero=self.v_zero[:, :, :n],
                    k_res=self.k_res, v_res=self.v_res, res_start=self.qstart, key_pos=self.positions[:, :, :n])

    def head_lengths(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64 tokens held per head."""
        return (self.positions[:, :, : self.length] >= 0).sum(-1)

    # ---- LayerState-like protocol ---------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"k_codes": self.k_codes, "k_scale": self.k_scale, "k_zero": self.k_zero, "v_codes": self.v_codes,
                "v_scale": self.v_scale, "v_zero": self.v_zero, "k_res": self.k_res, "v_res": self.v_res,
                "positions": self.positions, "qstart": self.qstart}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def used_bytes(self) -> int:
        """Bytes of the used slots' K/V: codes, scales and zeros of the quantized slots, the window
        in full precision."""
        b, h, _, d = self.k_res.shape
        per_q = self.k_codes.shape[-1] + self.v_codes.shape[-1] + self.v_scale.shape[-1] * 2 * 2 + d * 2 * 2 / self.group
        per_w = 2 * d * self.k_res.element_size()
        if self.rows_q is not None:   # each row's own groups and window
            return int(h * sum(q * per_q + (self.length - s0) * per_w for q, s0 in zip(self.rows_q, self.rows_s)))
        return int(b * h * (self.qtok * per_q + (self.length - self.qtok) * per_w))

    def clone(self, batch_repeat: int = 1, room: int | None = None) -> "QuantKV":
        """A copy; ``batch_repeat``: each row repeated (rows ``i*n .. i*n+n-1`` copy row ``i``);
        ``room``: free slots after the used ones (None: the same capacity as this store)."""
        rep = (lambda t: t.repeat_interleave(batch_repeat, 0)) if batch_repeat > 1 else (lambda t: t.clone())
        if room is not None:   # the used part only, into buffers of exactly that room
            return QuantKV.from_tensors({k: v if k == "meta" else rep(v) for k, v in self.tensors().items()},
                                        room=room)
        t = {k: (v.clone() if k == "qstart" and v.shape[0] == 1 else rep(v)) for k, v in self._tensors().items()}
        rows = (lambda x: None if x is None else [v for v in x for _ in range(batch_repeat)])
        return QuantKV(**t, bits=self.bits, group=self.group, residual=self.residual, qtok=self.qtok,
                       length=self.length, rows_q=rows(self.rows_q), rows_s=rows(self.rows_s))

    @classmethod
    def stack(cls, rows: list["QuantKV"], room: int = 0) -> "QuantKV":
        """One store of the rows of ``rows`` (each a store of its own, batch 1 or more; prompts of one
        length, so the same quantized and window slots), with ``room`` free slots: sequences
        prefilled and quantized one at a time, stacked into their batch."""
        ts = [r.tensors() for r in rows]
        if any(not torch.equal(t["meta"], ts[0]["meta"]) for t in ts):
            raise ValueError("quantized rows of different layouts (bits, group, residual, qtok, length) cannot "
                             "be stacked")
        return cls.from_tensors({k: ts[0][k] if k == "meta" else torch.cat([t[k] for t in ts]) for k in ts[0]},
                                room=room)

    # ---- rows at other points: a running batch that requests join -----------------------------------
    def row(self, i: int) -> "QuantKV":
        """Row ``i`` alone (batch 1, one layout): its quantized groups, its window, their positions, as
        it would hold them had it run alone (no holes between; what :meth:`join` stacks)."""
        if self.wslot is None:   # the host counters are current
            n = self.length
            q, s0 = (self.qtok, self.qtok) if self.rows_q is None else (self.rows_q[i], self.rows_s[i])
        else:   # during static decode (a preemption between steps): the device counters (a sync)
            n = int(self.wslot)
            s0 = int(self.qstart[i if self.qstart.shape[0] > 1 else 0])
            q = s0 if self.qtokd is None else int(self.qtokd[i])
        return QuantKV.from_tensors(self._used(slice(i, i + 1), q, s0, n))

    @classmethod
    def join(cls, rows: list["QuantKV"], room: int = 0) -> "QuantKV":
        """One store of ``rows`` (batch-1 stores of one bits, group and residual; :meth:`row`), whatever
        their lengths: a running batch and the requests joining it (continuous batching). Rows of one
        layout are :meth:`stack`-ed. Otherwise each row keeps its quantized groups at slots ``0 ..``
        (aligned to the groups) and its window as the batch's last slots, holes between, and then
        flushes its window on its own schedule (:meth:`_flush_row`: the window's groups go to the
        row's next aligned slots, which are always free), so each row's codes, scales and window are
        at every step what they are alone."""
        ts = [r.tensors() for r in rows]
        metas = [t["meta"].tolist() for t in ts]
        if all(m == metas[0] for m in metas):
            return cls.stack(rows, room)
        if any(m[:3] != metas[0][:3] for m in metas) or any(t["k_res"].shape[0] != 1 for t in ts):
            raise ValueError("quantized rows of other bits, group or residual, or of more than one row, cannot be joined")
        bits, g, R = metas[0][:3]
        qs, ns = [m[3] for m in metas], [m[4] for m in metas]
        ws = [n - q for q, n in zip(qs, ns)]
        N = max(ns)
        kr = ts[0]["k_res"]
        st = cls.empty(len(rows), kr.shape[1], kr.shape[3], N + room, max(R, max(ws)), kr.dtype, kr.device,
                       bits, g, R)
        for i, (t, q, w) in enumerate(zip(ts, qs, ws)):
            st.k_codes[i, :, :q], st.v_codes[i, :, :q] = t["k_codes"][0], t["v_codes"][0]
            st.k_scale[i, :, : q // g], st.k_zero[i, :, : q // g] = t["k_scale"][0], t["k_zero"][0]
            st.v_scale[i, :, :q], st.v_zero[i, :, :q] = t["v_scale"][0], t["v_zero"][0]
            st.k_res[i, :, :w], st.v_res[i, :, :w] = t["k_res"][0], t["v_res"][0]
            st.positions[i, :, :q] = t["positions"][0, :, :q]
            st.positions[i, :, N - w : N] = t["positions"][0, :, q:]
        st.length, st.qtok = N, min(qs)
        st.rows_q, st.rows_s = qs, [N - w for w in ws]
        st.qstart = torch.tensor(st.rows_s, dtype=torch.int64, device=kr.device)
        return st

    def _flush_row(self, i: int, f: int) -> None:
        """Quantize row ``i``'s oldest ``f`` window slots (whole groups; host side) into its next
        aligned slots ``rows_q[i] ..`` (holes, or those same window slots); the window slots they
        leave become holes."""
        q0, s0 = self.rows_q[i], self.rows_s[i]
        self._quantize_window(slice(i, i + 1), q0, s0, f)
        self.rows_q[i], self.rows_s[i] = q0 + f, s0 + f
        self.qstart[i] = s0 + f
        self.qtok = min(self.rows_q)

    def _append_rows(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """:meth:`append` for rows at other points: each row's window flushes by its own length (the
        rule of the one-layout path), the new tokens go to the common next slots."""
        b, h, q, d = keys.shape
        n = self.length
        for i, s0 in enumerate(self.rows_s):
            if n - s0 + q > self.residual and (n - s0) // self.group:
                self._flush_row(i, (n - s0) // self.group * self.group)
        self._ensure(n + q)
        need = max(n + q - s0 for s0 in self.rows_s)
        if need > self.k_res.shape[2]:
            k, v = self.k_res.new_zeros(b, h, need, d), self.v_res.new_zeros(b, h, need, d)
            k[:, :, : self.k_res.shape[2]], v[:, :, : self.v_res.shape[2]] = self.k_res, self.v_res
            self.k_res, self.v_res = k, v
        for i, s0 in enumerate(self.rows_s):
            self.k_res[i, :, n - s0 : n - s0 + q] = keys[i]
            self.v_res[i, :, n - s0 : n - s0 + q] = values[i]
        self.positions[:, :, n : n + q] = positions[:, None, :].to(torch.int32)
        self.length = n + q

    def _begin_static_rows(self, steps: int) -> None:
        """:meth:`begin_static` for rows at other points: each row's pending flush now, and the table
        of which rows flush at each static step (read on the device by the step's own index)."""
        with torch.inference_mode():
            for i, s0 in enumerate(self.rows_s):
                if self.length - s0 + 1 > self.residual:
                    self._flush_row(i, (self.length - s0) // self.group * self.group)
            self._ensure(self.length + steps, exact=True)
            if self.k_res.shape[2] < self.residual:
                raise RuntimeError("the full-precision window is smaller than residual")
            dev = self.k_res.device
            self.r0s = [self.length - s0 for s0 in self.rows_s]
            self.ftab = torch.tensor([[t >= 1 and (r0 + t) % self.residual == 0 for r0 in self.r0s]
                                      for t in range(steps + 1)], dtype=torch.bool, device=dev)
            self.qtokd = torch.tensor(self.rows_q, dtype=torch.int64, device=dev)
            self.wslot = torch.tensor([self.length], dtype=torch.int64, device=dev)
            self.w0 = self.length

    def _append_static_rows(self, keys, values, positions, flush: bool) -> None:
        """:meth:`_append_static` for rows at other points: on a flushing step every row's window is
        quantized and only the rows whose window is full (``ftab``) write it, to their own aligned
        slots (:meth:`_flush_row`'s result, on the device); then each row writes its token into its
        own window. Fixed shapes, no host sync."""
        from kvsift.kernels.dispatch import quantize_kv

        R, g = self.residual, self.group
        b, h, _, d = keys.shape
        if flush:
            mask = self.ftab.index_select(0, self.wslot - self.w0)[0]                    # (b,) rows flushing
            ar = torch.arange(R, device=keys.device)
            # a row that does not flush may have fewer than R window slots left in the capacity: its
            # indices are clamped (it only writes back what is there)
            cap = self.capacity - 1
            src = (self.qstart[:, None] + ar).clamp(max=cap)                              # (b, R) window slots
            dst = (self.qtokd[:, None] + ar).clamp(max=cap)                               # (b, R) aligned slots
            pos = self.positions.gather(2, src[:, None, :].expand(b, h, R))
            kc, ks, kz, vc, vs, vz = quantize_kv(self.k_res[:, :, :R], self.v_res[:, :, :R], pos, self.bits, g)

            def put(buf, idx, new):   # new where the row flushes, what is there elsewhere
                ii = idx[:, None, :, None].expand(b, h, idx.shape[1], buf.shape[-1])
                buf.scatter_(2, ii, torch.where(mask[:, None, None, None], new, buf.gather(2, ii)))

            put(self.k_codes, dst, kc)
            put(self.v_codes, dst, vc)
            put(self.v_scale, dst, vs)
            put(self.v_zero, dst, vz)
            grp = (self.qtokd[:, None] // g + ar[: R // g]).clamp(max=self.k_scale.shape[2] - 1)
            put(self.k_scale, grp, ks)
            put(self.k_zero, grp, kz)
            si, di = src[:, None, :].expand(b, h, R), dst[:, None, :].expand(b, h, R)
            m3 = mask[:, None, None]
            self.positions.scatter_(2, si, torch.where(m3, -1, self.positions.gather(2, si)))
            self.positions.scatter_(2, di, torch.where(m3, pos, self.positions.gather(2, di)))
            self.qstart.add_(mask.to(torch.int64) * R)
            self.qtokd.add_(mask.to(torch.int64) * R)
        ri = (self.wslot - self.qstart)[:, None, None, None].expand(b, h, 1, d)
        self.k_res.scatter_(2, ri, keys)
        self.v_res.scatter_(2, ri, values)
        self.positions.index_copy_(2, self.wslot, positions.to(torch.int32)[:, None, :].expand(b, h, 1))
        self.wslot.add_(1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a persisted context stores: the used part only (quantized slots' codes, scales and
        zeros, the window, positions) and ``meta = [bits, group, residual, qtok, length]``."""
        if self.rows_q is not None:
            raise NotImplementedError("a batch of rows at other points is stored row by row (QuantKV.row)")
        return self._used(slice(None), self.qtok, self.qtok, self.length)

    def _used(self, rows: slice, q: int, s0: int, n: int) -> dict[str, torch.Tensor]:
        """:meth:`tensors` of the batch rows ``rows`` whose quantized groups are slots ``0 .. q-1`` and
        window slots ``s0 .. n-1`` (``s0 == q``: one layout, no holes between)."""
        g = self.group
        pos = self.positions[rows, :, :n] if s0 == q else \
            torch.cat([self.positions[rows, :, :q], self.positions[rows, :, s0:n]], 2)
        return {"k_codes": self.k_codes[rows, :, :q], "k_scale": self.k_scale[rows, :, : q // g],
                "k_zero": self.k_zero[rows, :, : q // g], "v_codes": self.v_codes[rows, :, :q],
                "v_scale": self.v_scale[rows, :, :q], "v_zero": self.v_zero[rows, :, :q],
                "k_res": self.k_res[rows, :, : n - s0], "v_res": self.v_res[rows, :, : n - s0],
                "positions": pos,
                "meta": torch.tensor([self.bits, g, self.residual, q, q + n - s0], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], device=None, room: int = 0) -> "QuantKV":
        """Rebuild from :meth:`tensors` (persisted), checking the layout, with ``room`` free slots."""
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res", "positions", "meta")
        missing = [x for x in names if x not in t]
        if missing:
            raise ValueError(f"quantized KV is missing {missing}")
        meta = t["meta"]
        if meta.dtype != torch.int64 or tuple(meta.shape) != (5,):
            raise ValueError("quantized KV: meta must be 5 int64 values")
        bits, group, residual, q, n = (int(x) for x in meta.tolist())
        kr = t["k_res"]
        if kr.dim() != 4 or not kr.is_floating_point():
            raise ValueError(f"quantized KV: unexpected window {kr.dtype} {tuple(kr.shape)}")
        b, h, _, d = kr.shape
        cls.check_options(bits, group, residual, d)
        dp, vg = d * bits // 8, value_group(group, d)
        want = {"k_codes": ((b, h, q, dp), torch.uint8), "v_codes": ((b, h, q, dp), torch.uint8),
                "k_scale": ((b, h, q // group, d), SCALE_DTYPE), "k_zero": ((b, h, q // group, d), SCALE_DTYPE),
                "v_scale": ((b, h, q, d // vg), SCALE_DTYPE), "v_zero": ((b, h, q, d // vg), SCALE_DTYPE),
                "k_res": ((b, h, n - q, d), kr.dtype), "v_res": ((b, h, n - q, d), kr.dtype),
                "positions": ((b, h, n), torch.int32)}
        if not (0 <= q <= n and q % group == 0):
            raise ValueError(f"quantized KV: inconsistent counts qtok={q}, length={n}")
        for name, (shape, dtype) in want.items():
            x = t[name]
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise ValueError(f"quantized KV: {name} is {x.dtype} {tuple(x.shape)}, expected {dtype} {shape}")
        device = kr.device if device is None else device
        st = cls.empty(b, h, d, n + room, max(residual, n - q), kr.dtype, device, bits, group, residual)
        g = q // group
        st.k_codes[:, :, :q], st.v_codes[:, :, :q] = t["k_codes"].to(device), t["v_codes"].to(device)
        st.k_scale[:, :, :g], st.k_zero[:, :, :g] = t["k_scale"].to(device), t["k_zero"].to(device)
        st.v_scale[:, :, :q], st.v_zero[:, :, :q] = t["v_scale"].to(device), t["v_zero"].to(device)
        st.k_res[:, :, : n - q], st.v_res[:, :, : n - q] = kr.to(device), t["v_res"].to(device)
        st.positions[:, :, :n] = t["positions"].to(device)
        st.qtok, st.length = q, n
        st.qstart.fill_(q)
        return st
