"""Attention each key receives (H2O's and KVzip's prefill scores): the PyTorch reference against the
fused Triton kernels of ``kvsift/kernels/attention_received.py``.

One prefill chunk of ``L`` queries over ``n`` keys (the prompt's slots in order, the chunk's own last,
causal by position), batch 1, 12 q heads over 2 KV heads, head_dim 128, bf16 (a Qwen2.5-1.5B-like
layer). Per ``(n, mode)``: median ms of the reference and of the kernel, their ratio, the kernel's
relative error against the reference, and the peak memory each allocates beyond the inputs.
``mode`` is ``reduce:head_reduce`` (``sum:mean`` H2O, ``max:max`` KVzip). Needs CUDA and Triton
(exits 2 without them). Prints a table, writes JSON with ``--out``::

    PYTHONPATH=. python3 bench/attention_received.py --out bench/out/attention_received_h200.json
    PYTHONPATH=. python3 bench/attention_received.py --tune      # also sweep the kernels' block sizes
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without an install (the GPU machine)

import torch  # noqa: E402


def _timed(fn, reps: int) -> tuple[float, float, torch.Tensor]:
    """(median ms of ``reps`` calls after one warm-up call, peak MiB allocated beyond what was
    allocated before, the last output)."""
    out = fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return sorted(times)[len(times) // 2], peak, out


def _case(n: int, L: int, batch: int, hq: int, hk: int, d: int):
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(batch, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, hk, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kpos = torch.arange(n, device="cuda", dtype=torch.int32).expand(batch, hk, n).contiguous()
    qpos = torch.arange(n - L, n, device="cuda", dtype=torch.int32).expand(batch, L).contiguous()
    return q, k, kpos, qpos


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TUNE_GRID = {"lse_block_m": (64, 128), "lse_block_n": (32, 64, 128), "lse_warps": (4, 8),
             "recv_block_m": (64, 128), "recv_block_n": (64, 128), "recv_warps": (4, 8)}


def tune(q, k, kpos, qpos, scale, reps: int) -> list[dict]:
    """Time each pass's settings (the other pass at its current settings): rows sorted by ms."""
    from kvsift.kernels import attention_received as ar

    saved = dict(ar.TUNING)
    rows = []
    try:
        for prefix in ("lse", "recv"):
            keys = [key for key in TUNE_GRID if key.startswith(prefix)]
            for vals in itertools.product(*(TUNE_GRID[key] for key in keys)):
                ar.TUNING.clear()
                ar.TUNING.update(saved)
                ar.TUNING.update(dict(zip(keys, vals)))
                try:
                    ms, _, _ = _timed(lambda: ar.attention_received(q, k, kpos, qpos, scale), reps)
                except Exception as e:   # e.g. out of shared memory for a large block
                    rows.append({"pass": prefix, **dict(zip(keys, vals)), "error": str(e).splitlines()[0][:120]})
                    continue
                rows.append({"pass": prefix, **dict(zip(keys, vals)), "ms": ms})
                print(f"tune {prefix}: {dict(zip(keys, vals))} {ms:.3f} ms", flush=True)
    finally:
        ar.TUNING.clear()
        ar.TUNING.update(saved)
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="8192,30000", help="key counts n")
    ap.add_argument("--L", type=int, default=2048, help="queries per chunk")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", default="12,2,128", help="q_heads,kv_heads,head_dim")
    ap.add_argument("--modes", default="sum:mean,max:max", help="reduce:head_reduce pairs")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tune", action="store_true", help="also sweep the kernels' block sizes at the largest n")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from kvsift.kernels._triton import HAS_TRITON

    if not torch.cuda.is_available() or not HAS_TRITON:
        print("bench/attention_received.py: needs a CUDA GPU and Triton (found "
              f"cuda={torch.cuda.is_available()}, triton={HAS_TRITON}); nothing was timed", file=sys.stderr)
        return 2
    from kvsift.kernels import attention_received as ar

    hq, hk, d = (int(x) for x in a.heads.split(","))
    modes = [tuple(m.split(":")) for m in a.modes.split(",") if m]
    ns = [int(x) for x in a.ns.split(",") if x]
    scale = d ** -0.5
    rows = []
    print(f"batch {a.batch}, {hq} q heads / {hk} kv heads, head_dim {d}, bf16, L={a.L}")
    print(f"{'n':>7} {'mode':<9} {'ref ms':>9} {'kernel ms':>10} {'ratio':>7} {'rel err':>9} "
          f"{'ref MiB':>8} {'kern MiB':>9}")
    for n in ns:
        q, k, kpos, qpos = _case(n, a.L, a.batch, hq, hk, d)
        for red, hr in modes:
            ref_ms, ref_mb, ref = _timed(lambda: ar.attention_received_ref(q, k, kpos, qpos, scale, None, red, hr),
                                         a.reps)
            ker_ms, ker_mb, got = _timed(lambda: ar.attention_received(q, k, kpos, qpos, scale, None, red, hr),
                                         a.reps)
            row = {"n": n, "L": a.L, "batch": a.batch, "q_heads": hq, "kv_heads": hk, "head_dim": d,
                   "reduce": red, "head_reduce": hr, "ref_ms": ref_ms, "kernel_ms": ker_ms,
                   "ratio": ref_ms / ker_ms, "rel_err": _rel(got, ref), "ref_peak_mib": ref_mb,
                   "kernel_peak_mib": ker_mb}
            rows.append(row)
            print(f"{n:>7} {red + ':' + hr:<9} {ref_ms:>9.3f} {ker_ms:>10.3f} {row['ratio']:>7.1f} "
                  f"{row['rel_err']:>9.1e} {ref_mb:>8.0f} {ker_mb:>9.0f}", flush=True)
            del ref, got
        del q, k
        torch.cuda.empty_cache()
    result = {"rows": rows, "tuning": dict(ar.TUNING), "torch": torch.__version__,
              "device": torch.cuda.get_device_name()}
    if a.tune:
        q, k, kpos, qpos = _case(max(ns), a.L, a.batch, hq, hk, d)
        result["tune"] = tune(q, k, kpos, qpos, scale, a.reps)
        best = {p: next((r for r in result["tune"] if r["pass"] == p and "ms" in r), None) for p in ("lse", "recv")}
        print(f"best: {best}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
