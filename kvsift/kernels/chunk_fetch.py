"""Copy variable-length chunks of KV from (pinned) host memory into a device chunk cache.

``copy_chunks(host_k, host_v, host_pos, src_row, src_len, cache_k, cache_v, cache_pos, dst_row)``

* ``host_k, host_v`` ``(R, head_dim)`` and ``host_pos`` ``(R,)`` int32: the offloaded tokens, one
  row each (``sentencekv``'s :class:`~kvsift.methods._offload.ChunkStore` flat host view);
* ``src_row`` ``(M,)`` int64: first host row of chunk ``m``; ``src_len`` ``(M,)`` int: its length
  (``<= L``), or ``-1``: skip entry ``m`` (nothing is read nor written);
* ``cache_k, cache_v`` ``(C, L, head_dim)`` and ``cache_pos`` ``(C, L)`` int32 on the compute
  device, ``dst_row`` ``(M,)`` int64: the cache row that receives chunk ``m``: tokens
  ``0..src_len-1`` get the host rows, the rest of the row gets zeros (keys/values) and ``-1``
  (positions). Rows of entries that are not skipped must be distinct.
* ``host_k`` and ``cache_k`` both ``None``: values and positions only (``shadowkv``'s values-only
  store; its keys are rebuilt on the device).

``copy_chunks_dequant(host_kc, host_vc, host_s, host_pos, src_row, src_len, key_row, key_sz, cache_k,
cache_v, cache_pos, dst_row, bits)`` is the same copy from a quantized store (``sentencekv+kivi``'s
host chunks, :class:`~kvsift.methods._offload.ChunkStore` with ``bits``): ``host_kc, host_vc (R,
head_dim * bits // 8)`` uint8 packed codes (channel ``j * (8 // bits) + i`` at bit ``i * bits`` of
byte ``j``), ``host_s (R, 2 * groups)`` fp16 each row's value scales then zero points per group of
``head_dim // groups`` channels, ``key_sz (K, 2, head_dim)`` (device) key scales and zero points
per channel, row ``key_row[m]`` for chunk ``m``. Past a chunk's length the codes and value scales
count as 0, as the host path's padding row (keys: the chunk's zero points; values 0; position -1).
Tokens are dequantized as ``code * scale + zero``
in fp32 (a multiply, then an add: no fused multiply-add, so the kernel gives the reference's bits)
and written in the cache's dtype: the codes cross PCIe, the full-precision rows never exist
anywhere but in their cache row, and skipped entries cost nothing.

``copy_chunks_ref`` (PyTorch) moves the row indices to the host (a host sync), gathers there and
copies the result. ``copy_chunks`` (Triton, CUDA) is one launch with one program per entry that
reads the host rows **directly through unified virtual addressing** (the host tensors must be in
pinned, page-locked memory, which CUDA maps into the device's address space): no host sync, no
staging buffer, no host-side gather. Only the misses cross PCIe; skipped entries cost nothing.
"""

from __future__ import annotations

import torch

from kvsift.kernels._triton import HAS_TRITON, tl, triton


def _check_entries(cache_k, cache_v, cache_pos, **index) -> None:
    """The cache's shapes and the entries' ``(M,)`` index vectors (``index``: their names)."""
    if cache_k.dim() != 3 or cache_v.shape != cache_k.shape or cache_pos.shape != cache_k.shape[:2]:
        raise ValueError(f"cache_k/cache_v must be (C, L, head_dim) and cache_pos (C, L), got "
                         f"{tuple(cache_k.shape)}, {tuple(cache_v.shape)}, {tuple(cache_pos.shape)}")
    shapes = [t.shape for t in index.values()]
    if any(x != shapes[0] for x in shapes) or len(shapes[0]) != 1:
        raise ValueError(f"{', '.join(index)} must be (M,), got {', '.join(str(tuple(x)) for x in shapes)}")


def _check(host_k, host_v, host_pos, src_row, src_len, cache_k, cache_v, cache_pos, dst_row) -> None:
    if (host_k is None) != (cache_k is None):
        raise ValueError("host_k and cache_k must both be given, or both be None (values only)")
    if host_k is None:  # values only: the values stand in for the keys' shape checks
        host_k, cache_k = host_v, cache_v
    if host_k.dim() != 2 or host_v.shape != host_k.shape or host_pos.shape != host_k.shape[:1]:
        raise ValueError(f"host_k/host_v must be (R, head_dim) and host_pos (R,), got {tuple(host_k.shape)}, "
                         f"{tuple(host_v.shape)}, {tuple(host_pos.shape)}")
    _check_entries(cache_k, cache_v, cache_pos, src_row=src_row, src_len=src_len, dst_row=dst_row)
    if cache_k.shape[2] != host_k.shape[1]:
        raise ValueError(f"head_dim differs: host {host_k.shape[1]}, cache {cache_k.shape[2]}")
    if host_pos.dtype != torch.int32 or cache_pos.dtype != torch.int32:
        raise TypeError("host_pos and cache_pos must be int32")


def _rows_ref(src_row: torch.Tensor, src_len: torch.Tensor, L: int):
    """The references' plan (host sync): ``None`` when every entry is skipped, else ``(keep, ok,
    rows)``: the entries copied, which of each one's ``L`` token rows are real ``(m, L)``, and the
    host row of each (row 0 past a chunk's length, masked by ``ok``) ``(m * L,)``."""
    keep = (src_len >= 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return None
    start, ln = src_row[keep].cpu(), src_len[keep].cpu().long()
    if int(ln.max()) > L:
        raise ValueError(f"a chunk is longer than the cache row ({int(ln.max())} > {L})")
    ar = torch.arange(L)
    ok = ar < ln[:, None]
    return keep, ok, torch.where(ok, start[:, None] + ar, 0).reshape(-1)


def _write_rows(cache_k, cache_v, cache_pos, dst: torch.Tensor, k, v, p) -> None:
    """Rows ``k, v (m * L, head_dim)`` (``k`` None: values only) and ``p (m * L,)`` into the cache
    rows ``dst (m,)``."""
    L, d = cache_v.shape[1], cache_v.shape[2]
    dev = cache_v.device
    dst = dst.to(dev)
    if k is not None:
        cache_k.view(-1, L * d).index_copy_(0, dst, k.view(-1, L * d).to(dev, cache_k.dtype))
    cache_v.view(-1, L * d).index_copy_(0, dst, v.view(-1, L * d).to(dev, cache_v.dtype))
    cache_pos.index_copy_(0, dst, p.view(-1, L).to(dev))


def copy_chunks_ref(host_k: torch.Tensor | None, host_v: torch.Tensor, host_pos: torch.Tensor, src_row: torch.Tensor,
                    src_len: torch.Tensor, cache_k: torch.Tensor | None, cache_v: torch.Tensor, cache_pos: torch.Tensor,
                    dst_row: torch.Tensor) -> None:
    """Reference (PyTorch; host sync): writes the cache rows in place, returns nothing."""
    _check(host_k, host_v, host_pos, src_row, src_len, cache_k, cache_v, cache_pos, dst_row)
    plan = _rows_ref(src_row, src_len, cache_v.shape[1])
    if plan is None:
        return
    keep, ok, rows = plan
    okf = ok.reshape(-1, 1)
    k = None if host_k is None else torch.where(okf, host_k.index_select(0, rows), 0)
    v = torch.where(okf, host_v.index_select(0, rows), 0)
    _write_rows(cache_k, cache_v, cache_pos, dst_row[keep], k, v,
                torch.where(ok.reshape(-1), host_pos.index_select(0, rows), -1))


def dequantize_chunk_rows(k_codes: torch.Tensor, v_codes: torch.Tensor, v_sz: torch.Tensor, k_sz: torch.Tensor,
                          bits: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of a quantized chunk store in fp32: ``k_codes, v_codes (m, head_dim * bits / 8)``
    uint8, ``v_sz (m, 2, groups)`` each row's value scales and zero points, ``k_sz (m / L, 2,
    head_dim)`` each chunk's (of ``L`` rows) key scales and zero points -> ``k, v (m, head_dim)`` as
    ``code * scale + zero`` (a multiply, then an add: the kernel's order). The host path
    (``ChunkStore``) and :func:`copy_chunks_dequant_ref` both decode through it."""
    from kvsift.cache.quant import unpack

    d = k_sz.shape[-1]
    k = unpack(k_codes, bits).float().view(-1, L, d) * k_sz[:, None, 0].float() + k_sz[:, None, 1].float()
    vs = v_sz.float().repeat_interleave(d // v_sz.shape[-1], -1)                  # (m, 2, d)
    return k.view(-1, d), unpack(v_codes, bits).float() * vs[:, 0] + vs[:, 1]


def _check_quant(host_kc, host_vc, host_s, host_pos, src_row, src_len, key_row, key_sz, cache_k, cache_v, cache_pos,
                 dst_row, bits) -> int:
    """Validate a quantized copy's arguments; returns the value channel group."""
    if bits not in (2, 4):
        raise ValueError(f"bits must be 4 or 2, got {bits!r}")
    _check_entries(cache_k, cache_v, cache_pos, src_row=src_row, src_len=src_len, key_row=key_row, dst_row=dst_row)
    d = cache_k.shape[2]
    if host_kc.dim() != 2 or host_kc.shape[1] * 8 != d * bits or host_vc.shape != host_kc.shape \
            or host_kc.dtype != torch.uint8 or host_vc.dtype != torch.uint8:
        raise ValueError(f"host codes must be uint8 (R, {d * bits // 8}), got {host_kc.dtype} "
                         f"{tuple(host_kc.shape)} and {host_vc.dtype} {tuple(host_vc.shape)}")
    r = host_kc.shape[0]
    if host_s.dim() != 2 or host_s.shape[0] != r or host_s.shape[1] % 2 or d % (host_s.shape[1] // 2):
        raise ValueError(f"host_s must be (R, 2 * groups) with groups dividing {d}, got {tuple(host_s.shape)}")
    if host_pos.shape != (r,) or host_pos.dtype != torch.int32 or cache_pos.dtype != torch.int32:
        raise TypeError("host_pos must be (R,) int32 and cache_pos int32")
    if key_sz.dim() != 3 or key_sz.shape[1:] != (2, d):
        raise ValueError(f"key_sz must be (K, 2, {d}), got {tuple(key_sz.shape)}")
    return d // (host_s.shape[1] // 2)


def copy_chunks_dequant_ref(host_kc: torch.Tensor, host_vc: torch.Tensor, host_s: torch.Tensor, host_pos: torch.Tensor,
                            src_row: torch.Tensor, src_len: torch.Tensor, key_row: torch.Tensor, key_sz: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, cache_pos: torch.Tensor, dst_row: torch.Tensor,
                            bits: int) -> None:
    """Reference (PyTorch; host sync): gathers the codes on the host, dequantizes on the cache's
    device (:func:`dequantize_chunk_rows`), writes the cache rows in place; returns nothing."""
    vg = _check_quant(host_kc, host_vc, host_s, host_pos, src_row, src_len, key_row, key_sz, cache_k, cache_v,
                      cache_pos, dst_row, bits)
    L, d = cache_v.shape[1], cache_v.shape[2]
    plan = _rows_ref(src_row, src_len, L)
    if plan is None:
        return
    keep, ok, rows = plan
    dev = cache_v.device
    okd = ok.reshape(-1, 1).to(dev)
    # past a chunk's length: codes and value scales 0 (keys = the chunk's zero points, values 0)
    kc = torch.where(okd, host_kc.index_select(0, rows).to(dev), 0)
    vc = torch.where(okd, host_vc.index_select(0, rows).to(dev), 0)
    vs = torch.where(okd, host_s.index_select(0, rows).to(dev), 0).view(-1, 2, d // vg)
    k, v = dequantize_chunk_rows(kc, vc, vs, key_sz[key_row[keep].to(key_sz.device)].to(dev), bits, L)
    _write_rows(cache_k, cache_v, cache_pos, dst_row[keep], k, v,
                torch.where(ok.reshape(-1), host_pos.index_select(0, rows), -1))


if HAS_TRITON:

    @triton.jit
    def _entry(src_row_ptr, src_len_ptr, dst_row_ptr, L: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr,
               BLOCK_D: tl.constexpr):
        """A copy program's entry ``m``: ``(m, live, j, dd, md, ok, row_out, src, dst)``: its token rows
        ``j`` and channels ``dd`` (``md`` within the head), the rows read from the host (``ok``) and
        written to the cache (``row_out``), their host rows ``src`` and its cache row ``dst``. A
        skipped entry (length -1) reads no row (``j < n`` never holds) and writes none (its row count
        is 0; no block & scalar masks: the CPU interpreter refuses them)."""
        m = tl.program_id(0)
        n = tl.load(src_len_ptr + m).to(tl.int64)
        start = tl.load(src_row_ptr + m).to(tl.int64)
        dst = tl.load(dst_row_ptr + m).to(tl.int64)
        j = tl.arange(0, BLOCK_L)
        dd = tl.arange(0, BLOCK_D)
        live = n >= 0
        return m, live, j, dd, dd < D, j < n, j < tl.where(live, L, 0), (start + j).to(tl.int64), dst

    @triton.jit
    def _copy_chunks_dequant_kernel(hk_ptr, hv_ptr, hs_ptr, hp_ptr, src_row_ptr, src_len_ptr, krow_ptr, ksz_ptr,
                                    ck_ptr, cv_ptr, cp_ptr, dst_row_ptr,
                                    L: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                                    W: tl.constexpr, NG: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                                    PER: tl.constexpr, LEVELS: tl.constexpr):
        # one program per entry: its host rows' codes, value scales and positions read through UVA,
        # dequantized in registers, written to its cache row (zeros and -1 past its length)
        m, live, j, dd, md, ok, row_out, src, dst = _entry(src_row_ptr, src_len_ptr, dst_row_ptr, L, D, BLOCK_L,
                                                            BLOCK_D)
        krow = tl.load(krow_ptr + m).to(tl.int64)
        m2 = ok[:, None] & md[None, :]
        w2 = row_out[:, None] & md[None, :]
        byte = (dd // PER)[None, :]
        shift = ((dd % PER) * BITS).to(tl.int32)[None, :]
        kb = tl.load(hk_ptr + src[:, None] * W + byte, mask=m2, other=0).to(tl.int32)
        vb = tl.load(hv_ptr + src[:, None] * W + byte, mask=m2, other=0).to(tl.int32)
        mk = dd < tl.where(live, D, 0)
        ks = tl.load(ksz_ptr + krow * (2 * D) + dd, mask=mk, other=0.0).to(tl.float32)
        kz = tl.load(ksz_ptr + krow * (2 * D) + D + dd, mask=mk, other=0.0).to(tl.float32)
        grp = (dd // VG)[None, :]
        vs = tl.load(hs_ptr + src[:, None] * (2 * NG) + grp, mask=m2, other=0.0).to(tl.float32)
        vz = tl.load(hs_ptr + src[:, None] * (2 * NG) + NG + grp, mask=m2, other=0.0).to(tl.float32)
        # past the chunk's length the codes and value scales load as 0: keys = zero points, values 0
        k = ((kb >> shift) & LEVELS).to(tl.float32) * ks[None, :] + kz[None, :]
        v = ((vb >> shift) & LEVELS).to(tl.float32) * vs + vz
        p = tl.load(hp_ptr + src, mask=ok, other=-1)
        off_out = dst * (L * D) + j[:, None].to(tl.int64) * D + dd[None, :]
        tl.store(ck_ptr + off_out, k.to(ck_ptr.dtype.element_ty), mask=w2)
        tl.store(cv_ptr + off_out, v.to(cv_ptr.dtype.element_ty), mask=w2)
        tl.store(cp_ptr + dst * L + j, p, mask=row_out)

    @triton.jit
    def _copy_chunks_kernel(hk_ptr, hv_ptr, hp_ptr, src_row_ptr, src_len_ptr, ck_ptr, cv_ptr, cp_ptr, dst_row_ptr,
                            L: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_K: tl.constexpr):
        _, _, j, dd, md, ok, row_out, src, dst = _entry(src_row_ptr, src_len_ptr, dst_row_ptr, L, D, BLOCK_L, BLOCK_D)
        m2 = ok[:, None] & md[None, :]
        w2 = row_out[:, None] & md[None, :]
        off_in = src[:, None] * D + dd[None, :]
        off_out = dst * (L * D) + j[:, None].to(tl.int64) * D + dd[None, :]
        if HAS_K:  # values only (HAS_K False): the key pointers are the value ones, never read
            k = tl.load(hk_ptr + off_in, mask=m2, other=0.0)
            tl.store(ck_ptr + off_out, k.to(ck_ptr.dtype.element_ty), mask=w2)
        v = tl.load(hv_ptr + off_in, mask=m2, other=0.0)
        p = tl.load(hp_ptr + src, mask=ok, other=-1)
        tl.store(cv_ptr + off_out, v.to(cv_ptr.dtype.element_ty), mask=w2)
        tl.store(cp_ptr + dst * L + j, p, mask=row_out)


class _HostPtr:
    """A pinned host tensor seen as a device pointer (UVA: the same address works on the device)."""

    __slots__ = ("_t", "dtype")

    def __init__(self, t: torch.Tensor):
        self._t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self._t.data_ptr()


def copy_chunks(host_k: torch.Tensor | None, host_v: torch.Tensor, host_pos: torch.Tensor, src_row: torch.Tensor,
                src_len: torch.Tensor, cache_k: torch.Tensor | None, cache_v: torch.Tensor, cache_pos: torch.Tensor,
                dst_row: torch.Tensor) -> None:
    """Triton (CUDA; the CPU interpreter with every tensor on the CPU): host tensors pinned and
    contiguous, everything else on the device. No host sync."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    _check(host_k, host_v, host_pos, src_row, src_len, cache_k, cache_v, cache_pos, dst_row)
    has_k = host_k is not None
    if not has_k:  # values only: the kernel gets the value tensors in the key slots and never reads them
        host_k, cache_k = host_v, cache_v
    hosts = {"host_k": host_k, "host_v": host_v, "host_pos": host_pos}
    interp = _check_memory(hosts, {"cache_k": cache_k, "cache_v": cache_v, "cache_pos": cache_pos})
    M = src_row.shape[0]
    if M == 0:
        return
    L, D = cache_k.shape[1], cache_k.shape[2]
    rest = (src_row.contiguous(), src_len.contiguous(), cache_k, cache_v, cache_pos, dst_row.contiguous())
    meta = dict(L=L, D=D, BLOCK_L=triton.next_power_of_2(L), BLOCK_D=triton.next_power_of_2(D), HAS_K=has_k,
                num_warps=4)
    _launch(_copy_chunks_kernel, M, tuple(hosts.values()), rest, meta, interp)


_WRAP: bool | None = None


def copy_chunks_dequant(host_kc: torch.Tensor, host_vc: torch.Tensor, host_s: torch.Tensor, host_pos: torch.Tensor,
                        src_row: torch.Tensor, src_len: torch.Tensor, key_row: torch.Tensor, key_sz: torch.Tensor,
                        cache_k: torch.Tensor, cache_v: torch.Tensor, cache_pos: torch.Tensor, dst_row: torch.Tensor,
                        bits: int) -> None:
    """Triton (CUDA; the CPU interpreter with every tensor on the CPU): host tensors pinned and
    contiguous, everything else on the device. One launch, no host sync (a CUDA graph holds it)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    vg = _check_quant(host_kc, host_vc, host_s, host_pos, src_row, src_len, key_row, key_sz, cache_k, cache_v,
                      cache_pos, dst_row, bits)
    hosts = {"host_kc": host_kc, "host_vc": host_vc, "host_s": host_s, "host_pos": host_pos}
    interp = _check_memory(hosts, {"cache_k": cache_k, "cache_v": cache_v, "cache_pos": cache_pos, "key_sz": key_sz})
    M = src_row.shape[0]
    if M == 0:
        return
    L, D = cache_k.shape[1], cache_k.shape[2]
    rest = (src_row.contiguous(), src_len.contiguous(), key_row.contiguous(), key_sz, cache_k, cache_v, cache_pos,
            dst_row.contiguous())
    # no fused multiply-add: code * scale, then + zero, as the reference (and the host path) round them
    meta = dict(L=L, D=D, BLOCK_L=triton.next_power_of_2(L), BLOCK_D=triton.next_power_of_2(D), W=D * bits // 8,
                NG=D // vg, VG=vg, BITS=bits, PER=8 // bits, LEVELS=(1 << bits) - 1, num_warps=4,
                enable_fp_fusion=False)
    _launch(_copy_chunks_dequant_kernel, M, tuple(hosts.values()), rest, meta, interp)


def _check_memory(hosts: dict, devices: dict) -> bool:
    """``ValueError`` unless the host tensors are contiguous and pinned (or on the device) and the
    device ones contiguous; returns whether this is the CPU interpreter (the caches on the CPU)."""
    interp = not devices["cache_v"].is_cuda   # the interpreter reads CPU tensors as they are
    for name, t in hosts.items():
        if not (t.is_cuda or interp or t.is_pinned()):
            raise ValueError(f"{name} must be in pinned host memory (or on the device) for the kernel")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    for name, t in devices.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return interp


def _launch(kernel, M: int, hosts: tuple, rest: tuple, meta: dict, interp: bool) -> None:
    """``kernel`` over ``M`` entries, the host tensors passed as this Triton takes a host pointer
    (a wrapper or the tensor itself: found on the first launch, then fixed)."""
    global _WRAP
    if interp:
        kernel[(M,)](*hosts, *rest, **meta)
        return
    if _WRAP is None:
        err = None
        for wrap in (True, False):
            try:
                kernel[(M,)](*_wrapped(hosts, wrap), *rest, **meta)
                _WRAP = wrap
                return
            except Exception as e:  # noqa: BLE001 - Triton refused the pointer (its error types vary)
                err = e
        raise RuntimeError(f"Triton cannot read pinned host memory here: {err}")
    kernel[(M,)](*_wrapped(hosts, _WRAP), *rest, **meta)


def _wrapped(hosts, wrap: bool) -> tuple:
    return tuple(_HostPtr(t) if wrap and not t.is_cuda else t for t in hosts)
