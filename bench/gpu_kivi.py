"""Decode attention over KIVI-quantized KV on a GPU: the Triton kernel that dequantizes in registers
(``quant_decode_attention``) vs the bf16 sparse kernel over every slot and dense SDPA, per layer.

Llama-3.1-8B attention shape (32 q heads, 8 kv heads, head_dim 128), bf16. For each batch and
context length: the kernel's time (CUDA-graph replays, median of ``--reps``), the KV bytes it reads
(codes, scales, zeros, the window) against bf16, and its largest difference from the PyTorch
reference (which dequantizes block by block). Also the static step's window flush
(``QuantKV._append_static`` with ``flush=True``: quantize ``residual`` tokens) and a plain append.

    PYTHONPATH=. python3 bench/gpu_kivi.py --out bench/out/gpu_kivi.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_decode import time_cuda  # noqa: E402
from kvsift.cache.quant import QuantKV, default_group  # noqa: E402
from kvsift.kernels import dispatch  # noqa: E402
from kvsift.kernels.quant_decode_attention import quant_decode_attention, quant_decode_attention_ref  # noqa: E402

HQ, HK, D = 32, 8, 128
# launch settings timed beside the default (``quant_decode_attention.TUNING`` overrides): the slot
# block and warps, the folded scales (``fold``, its own ``fold_*`` settings) or dequantized tiles,
# and the programs per SM
VARIANTS = [dict(fold=False),
            dict(fold=False, block_s=32, num_warps=2, splits_per_sm=16),
            # 32-bit slot offsets and positions (the default's SASS is heavy in integer multiply-adds)
            dict(i32=True), dict(i32=True, fold_num_stages=2), dict(i32=True, fold=False),
            # the unpack leaving its planes offset (6 instructions per 8 codes, not 12), alone and with i32
            dict(fold_offset=True), dict(fold_offset=True, i32=True), dict(fold_offset=True, fold_num_stages=2),
            dict(fold_offset=True, fold_num_warps=4),
            # the folded path without the inline-PTX unpack (codes straight to fp16, the default
            # before 2026-12-03; 4-bit), at its old pipeline depth too, and its ways of rounding
            dict(fold_asm=False), dict(fold_asm=False, fold_num_stages=2),
            dict(fold_asm=False, fold_halves=2), dict(fold_asm=False, fold_magic=False),
            # block, warps, programs per SM and pipeline depth around the default
            dict(fold_num_stages=2), dict(fold_num_stages=4),
            dict(fold_block_s=32, fold_splits_per_sm=16),
            dict(fold_num_warps=4), dict(fold_splits_per_sm=8), dict(fold_splits_per_sm=32),
            dict(fold_min_blocks=1), dict(fold_min_blocks=16), dict(fold_min_blocks=64),
            dict(fold_block_s=128, fold_num_warps=4, fold_splits_per_sm=8),
            dict(fold_block_s=128, fold_num_warps=8, fold_splits_per_sm=8)]
# ``--variants offset``: the offset planes and 32-bit slot arithmetic, alone, together and around them
OFFSET_VARIANTS = [dict(fold_offset=True), dict(i32=True), dict(fold_offset=True, i32=True),
                   dict(fold_offset=True, fold_num_stages=2), dict(fold_offset=True, fold_num_warps=4),
                   dict(fold_offset=True, fold_splits_per_sm=8), dict(fold_offset=True, fold_splits_per_sm=32)]
# the sweep of 2026-12-03 (``--variants asm``, bench/results/gpu_kivi_asm_h200.json) ran these over
# the then default (the fp16 unpack); its JSON names the folded loop's depth ``num_stages``, which
# both paths shared then
ASM_VARIANTS = [dict(fold_asm=True), dict(fold_asm=True, fold_num_stages=3), dict(fold_asm=True, fold_num_stages=4),
                dict(fold_asm=True, fold_block_s=32, fold_splits_per_sm=16),
                dict(fold_asm=True, fold_num_warps=4), dict(fold_asm=True, fold_num_warps=4, fold_num_stages=3),
                dict(fold_asm=True, fold_splits_per_sm=8), dict(fold_asm=True, fold_splits_per_sm=32),
                dict(fold_asm=True, fold_min_blocks=16), dict(fold_asm=True, fold_min_blocks=64),
                dict(fold_asm=True, fold_block_s=128, fold_num_warps=4, fold_num_stages=3),
                dict(fold_asm=True, fold_block_s=128, fold_num_warps=8, fold_splits_per_sm=8)]


def bench(batch: int, n: int, bits: int, reps: int, variants: list[dict] = VARIANTS) -> dict:
    dev = "cuda"
    g = default_group(D, bits)
    k = torch.randn(batch, HK, n, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(batch, HK, n, D, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(n, device=dev, dtype=torch.int32).expand(batch, HK, n).contiguous()
    with torch.inference_mode():
        st = QuantKV.from_dense(k, v, pos, bits, g, g, room=64)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    qp = torch.full((batch,), n, device=dev)
    args = st.kernel_args()
    scale = D ** -0.5
    row = {"batch": batch, "context": n, "bits": bits, "group": g}
    out = quant_decode_attention(q, query_pos=qp, slot_idx=None, scale=scale, group=g, **args)
    ref = quant_decode_attention_ref(q, query_pos=qp, slot_idx=None, scale=scale, group=g, **args)
    row["max_abs_diff_vs_ref"] = float((out.float() - ref.float()).abs().max())
    row["quant_ms"] = time_cuda(lambda: quant_decode_attention(q, query_pos=qp, slot_idx=None, scale=scale, group=g,
                                                               **args), reps, graph=True)
    # the kernel at a few slot-block sizes and warp counts (results/gpu_kivi_planes_h200.json also
    # holds the removed bit-plane kernel's times)
    from kvsift.kernels import quant_decode_attention as qmod
    saved = dict(qmod.TUNING)
    row["variants_ms"] = {}
    for var in variants:
        qmod.TUNING.clear()
        qmod.TUNING.update(saved, **var)
        key = "/".join(f"{k}={v}" for k, v in var.items())
        try:
            got = quant_decode_attention(q, query_pos=qp, slot_idx=None, scale=scale, group=g, **args)
            err = float((got.float() - ref.float()).abs().max())
            ms = time_cuda(lambda: quant_decode_attention(q, query_pos=qp, slot_idx=None, scale=scale, group=g,
                                                          **args), reps, graph=True)
            row["variants_ms"][key] = {"ms": ms, "max_abs_diff_vs_ref": err}
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is reported, not fatal
            row["variants_ms"][key] = {"error": f"{type(e).__name__}: {e}"[:200]}
    qmod.TUNING.clear()
    qmod.TUNING.update(saved)
    row["bf16_sparse_ms"] = time_cuda(lambda: dispatch.sparse_decode_attention(q, k, v, None, scale, key_pos=pos,
                                                                               query_pos=qp), reps, graph=True)
    qd = q[:, :, None]
    row["sdpa_ms"] = time_cuda(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True),
                               reps, graph=True)
    t = st.tensors()
    quant_bytes = sum(x.numel() * x.element_size() for name, x in t.items() if name not in ("positions", "meta"))
    row["kv_bytes_ratio"] = quant_bytes / (2 * k.numel() * 2)
    with torch.inference_mode():
        st.begin_static(4 * g)
        kn, vn, pn = k[:, :, :1], v[:, :, :1], torch.full((batch, 1), n, device=dev, dtype=torch.int32)
        q0, r = st.qtok, st.residual                                     # the window starts at q0
        row["append_ms"] = time_cuda(lambda: (st.wslot.fill_(q0 + 1), st._append_static(kn, vn, pn, False)),
                                     reps, graph=False)
        row["flush_append_ms"] = time_cuda(
            lambda: (st.wslot.fill_(q0 + r), st.qstart.fill_(q0), st._append_static(kn, vn, pn, True)),
            reps, graph=False)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768, 131072])
    p.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--variants", choices=("all", "asm", "offset"), default="all",
                   help="the launch settings timed beside the default: all, those around the inline-PTX unpack (asm), "
                        "or the offset planes and 32-bit slot arithmetic (offset)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for b in args.batches:
        for n in args.contexts:
            for bits in args.bits:
                try:
                    row = bench(b, n, bits, args.reps, {"asm": ASM_VARIANTS, "offset": OFFSET_VARIANTS}.get(args.variants, VARIANTS))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
