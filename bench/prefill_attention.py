"""Dense attention of one prefill chunk over a long prompt, per SDPA backend and split.

A chunk of ``L`` queries whose keys are the ``n`` slots of the layer so far (its own ``L`` last):
the mask is causal aligned to the bottom right. One SDPA call takes that mask
(``causal_lower_right``) through the flash and memory-efficient kernels only; cuDNN takes only
unmasked or square causal calls, so the other variants split the chunk into its past keys (no
mask) and its own keys (square causal) and merge the halves by their log-sum-exps
(``kvsift.engine.attention.split_chunk_attention``):

* ``flash_lr``: one call, flash, bottom-right causal bias (the engine's dense prefill before cuDNN);
* ``flash_split``: the two halves through ``aten._scaled_dot_product_flash_attention``;
* ``cudnn_split``: the two halves through ``aten._scaled_dot_product_cudnn_attention``;
* ``cudnn_whole`` / ``flash_whole`` (first chunk only, ``L == n``): one causal call per kernel;
* ``_gqa`` / ``_expanded``: GQA without repeating the KV heads / with them repeated;
* ``engine``: ``kvsift.engine.attention.causal_chunk_attention``, what the engine runs now (cuDNN
  for large chunks, flash for the rest; ``KVSIFT_PREFILL_CUDNN=0``: flash).

Random-weight Llama-3.1-8B shape per layer (32 q heads, 8 KV heads, head_dim 128, bf16), batch 1.
Per ``(n, L)``: median ms of one layer's call, the first call's ms (a new shape: cuDNN builds
its plan then), TFLOP/s (causal FLOPs), and the largest absolute difference from ``flash_lr``'s
output. Cases of nearby lengths show what each new shape's plan costs. Prints a table, writes JSON:

    PYTHONPATH=. python3 bench/prefill_attention.py --out bench/out/prefill_attention_h200.json
    PYTHONPATH=. python3 bench/prefill_attention.py --cases 512:128 --reps 2   # CPU smoke run (math backend)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without an install (the GPU machine)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _timed(fn, reps: int) -> tuple[float, float, torch.Tensor]:
    """(median ms of ``reps`` calls, the first call's ms: a new shape's setup included, e.g. cuDNN's
    plan; the last output)."""
    times = []
    for _ in range(reps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    rest = sorted(times[1:])
    return rest[len(rest) // 2], times[0], out


def _gqa(k: torch.Tensor, hq: int, native: bool) -> torch.Tensor:
    return k if native else k.repeat_interleave(hq // k.shape[1], dim=1)


def flash_half(native: bool):
    """A ``half`` for :func:`kvsift.engine.attention.split_chunk_attention` through SDPA's flash
    kernel (its log-sum-exp); ``native``: GQA without repeating the KV heads."""
    def half(q, k, v, causal, scale, lse=True):
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, _gqa(k, q.shape[1], native),
                                                                _gqa(v, q.shape[1], native), 0.0, causal, False,
                                                                scale=scale)
        return r[0], r[1].reshape(q.shape[:3]).float()
    return half


def cudnn_half(native: bool):
    """The same through cuDNN's fused attention."""
    def half(q, k, v, causal, scale, lse=True):
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, _gqa(k, q.shape[1], native),
                                                                _gqa(v, q.shape[1], native), None, True, 0.0, causal,
                                                                False, scale=scale)
        return r[0], r[1].reshape(q.shape[:3]).float()
    return half


def math_half(q, k, v, causal, scale, lse=True):
    """The same in float32 matmuls (the CPU, where no fused kernel gives a log-sum-exp)."""
    g = q.shape[1] // k.shape[1]
    s = (q.float() @ k.repeat_interleave(g, 1).float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v.repeat_interleave(g, 1).float()).to(q.dtype), torch.logsumexp(s, -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="4096:4096,4160:4160,8192:4096,8256:4160,32768:4096,32832:4096,"
                                       "131072:4096,131072:2048,131072:128,131200:128,16384:1024,16448:1024",
                    help="comma-separated n:L (keys so far : chunk queries)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--heads", default="32,8,128", help="q_heads,kv_heads,head_dim")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hq, hk, d = (int(x) for x in a.heads.split(","))
    scale = d ** -0.5
    rows = []
    from kvsift.engine.attention import causal_chunk_attention, split_chunk_attention

    print(f"{'n':>7} {'L':>5} {'variant':<22} {'ms':>9} {'first ms':>9} {'TFLOP/s':>8} {'max |diff|':>11}")
    for case in a.cases.split(","):
        n, L = (int(x) for x in case.split(":"))
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, hq, L, d, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, hk, n, d, device=dev, dtype=dtype, generator=g)
        flops = 4 * hq * d * L * (n - L + (L + 1) / 2)

        def lr():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                if L == n:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, n), scale=scale,
                                                      enable_gqa=True)

        variants = {"flash_lr": lr, "engine": lambda: causal_chunk_attention(q, k, v, scale)}
        if dev.type == "cuda":
            for native in (True, False):
                tag = "gqa" if native else "expanded"
                kind = "split" if L < n else "whole"   # a first chunk (L == n): one causal call
                for name, half in (("flash", flash_half(native)), ("cudnn", cudnn_half(native))):
                    variants[f"{name}_{kind}_{tag}"] = (
                        lambda half=half: split_chunk_attention(q, k, v, scale, half))
            variants["sdpa_default"] = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                               enable_gqa=True)) if L == n else None
        else:
            variants["math_split"] = lambda: split_chunk_attention(q, k, v, scale, math_half)
        ref = None
        for name, fn in variants.items():
            if fn is None:
                continue
            row = {"n": n, "L": L, "variant": name, "q_heads": hq, "kv_heads": hk, "head_dim": d,
                   "dtype": str(dtype).replace("torch.", ""), "device": dev.type}
            try:
                ms, first, out = _timed(fn, a.reps)
            except Exception as e:  # a backend that does not take this call here: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                print(f"{n:>7} {L:>5} {name:<22} {'-':>9} {'-':>9} {'-':>8}  {row['error']}")
                rows.append(row)
                continue
            if ref is None:
                ref = out
            diff = float((out.float() - ref.float()).abs().max())
            row.update(ms=round(ms, 4), first_ms=round(first, 3), tflops=round(flops / ms / 1e9, 1), max_abs_diff=diff)
            print(f"{n:>7} {L:>5} {name:<22} {ms:>9.3f} {first:>9.2f} {row['tflops']:>8.1f} {diff:>11.2e}")
            rows.append(row)
            del out
        del q, k, v, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"},
                                          indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
