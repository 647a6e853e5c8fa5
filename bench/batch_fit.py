"""How many long sequences decode together on one device, per method (issue #13: "batch that fits at
128k >= 3x that of full"): a random-weight Llama-3.1-8B-shaped model (bench/_random_llama.py) on
CUDA, a narrow one on the CPU.

For each method one prompt of ``--ctx`` tokens is prefilled once (``LLM.prefill_context``), then
``N`` sequences decode ``--new-tokens`` tokens over it, each over its own copy of that KV: for
``full``, which would read a reused context by reference, copies are forced
(:func:`copied_contexts`), so every row holds its own KV as a request of that length would. The
largest ``N`` that runs (no out-of-memory error on the device, no ``KVMemoryError`` from the
scheduler's admission) is found by doubling, then bisection; each try decodes for real. The table
gives the batch, its ratio to ``full``'s, the device KV per sequence, the decode time per token at
that batch and the device peak.

    PYTHONPATH=. python3 bench/batch_fit.py --ctx 131072 --methods full,kivi,sentencekv+kivi:2048 \\
        --out bench/results/batch_fit_h200.json
    PYTHONPATH=. python3 bench/batch_fit.py --ctx 512 --layers 2 --max-batch 8      # CPU smoke run

Prefilling ``N`` prompts would take ``N`` prefills (17 s each at 128k on the H200); copies of one
take the time of a device copy, so the search costs one prefill per method. What it does not show:
the prefill's own peak for ``N`` prompts at once (requests are prefilled on their own and join the
running batch, so the decode batch is the one that has to fit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@contextlib.contextmanager
def copied_contexts(llm):
    """Inside: every generation over a context copies its KV per row (``full`` included, which
    otherwise reads a context by reference). Restored on exit."""
    llm.runner.shares_context = lambda method, context: False
    try:
        yield llm
    finally:
        del llm.runner.shares_context


def _oom(e: BaseException) -> bool:
    from kvsift.errors import KVMemoryError

    return isinstance(e, (torch.cuda.OutOfMemoryError, KVMemoryError)) or "out of memory" in str(e).lower()


def largest_fitting(fits, max_batch: int) -> int:
    """The largest ``n`` in ``1 .. max_batch`` with ``fits(n)`` True, assuming fitting is monotone
    (doubling from 1, then bisection); 0 when not even one fits."""
    lo, hi = 0, max_batch + 1                # lo fits (0: trivially), hi does not
    n = 1
    while n < hi:
        if not fits(n):
            hi = n
            break
        lo = n
        if n == max_batch:
            return n
        n = min(2 * n, max_batch)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def measure(llm, spec: str, ctx: int, max_batch: int, new_tokens: int, log) -> dict:
    from bench._systems import parse_system
    from kvsift import SamplingParams

    name, budget, kw = parse_system(spec)
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(ctx)
    doc = torch.randint(0, vocab, (ctx,), generator=g).tolist()
    question = torch.randint(0, vocab, (16,), generator=g).tolist()
    t0 = time.perf_counter()
    context = llm.prefill_context(doc, method=name, budget=budget, method_kwargs=kw or None, progress=False)
    prefill_s = time.perf_counter() - t0
    tries: dict[int, dict] = {}
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def fits(n: int) -> bool:
        if n in tries:
            return tries[n]["fits"]
        if llm.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with copied_contexts(llm):
                outs = llm.generate([question] * n, params, context=context, method=name, budget=budget,
                                    method_kwargs=kw or None, progress=False)
        except Exception as e:  # noqa: BLE001 - out of memory (device or admission) is the answer "no"
            if not _oom(e):
                raise
            tries[n] = {"fits": False, "error": f"{type(e).__name__}: {e}"[:200]}
            log(f"  {spec:<24} batch {n:>4}: does not fit ({type(e).__name__})")
            return False
        st = outs[0].stats
        steps = max(1, st.decode_steps - (st.decode_setup_steps or 0))
        # a request's stats count the KV of all its rows (the n questions): per sequence, divided
        row = {"fits": True, "decode_ms_per_token": 1000.0 * (st.decode_s - st.decode_setup_s) / steps,
               "decode_mode": st.decode_mode, "kv_device_bytes_per_seq": st.kv_device_bytes // n,
               "kv_host_bytes_per_seq": st.kv_host_bytes // n,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if llm.device.type == "cuda" else None}
        tries[n] = row
        log(f"  {spec:<24} batch {n:>4}: fits, {row['decode_ms_per_token']:.2f} ms/token ({row['decode_mode']})")
        return True

    best = largest_fitting(fits, max_batch)
    del context
    if llm.device.type == "cuda":
        torch.cuda.empty_cache()
    at = tries.get(best, {})
    return {"method": spec, "ctx": ctx, "max_batch": best, "capped": best == max_batch,
            "context_prefill_s": prefill_s, **{k: v for k, v in at.items() if k != "fits"},
            "tries": {str(k): v for k, v in sorted(tries.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=131072)
    p.add_argument("--methods", default="full,kivi,sentencekv+kivi:2048")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the random model (32: the 8B's)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk size")
    p.add_argument("--kv-memory", default=None,
                   help="the scheduler's KV memory limit (e.g. 96GiB): admission, not the device, decides "
                        "(default: none, the device's memory decides)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("ctx", "layers", "max_batch", "new_tokens", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    from bench._random_llama import random_llama
    from kvsift import LLM

    model, dev = random_llama(args.layers, args.ctx + 4096)
    llm = LLM.from_model(model, None, name="llama-8b-shape-random", chunk_size=args.chunk)
    if args.kv_memory is not None:
        from kvsift.budget import parse_bytes
        from kvsift.engine.scheduler import Scheduler

        llm.scheduler = Scheduler(llm.scheduler_config(kv_memory=parse_bytes(args.kv_memory, "--kv-memory")))
    rows = []
    for spec in [s for s in args.methods.split(",") if s]:
        rows.append(measure(llm, spec, args.ctx, args.max_batch, args.new_tokens, print))
    base = next((r["max_batch"] for r in rows if r["method"] == "full"), None)
    print(f"\n{'method':<26}{'max batch':>10}{'vs full':>9}{'KV GiB/seq':>12}{'ms/token':>10}{'peak GiB':>10}")
    for r in rows:
        ratio = f"{r['max_batch'] / base:.2f}x" if base else "-"
        kv = (r.get("kv_device_bytes_per_seq") or 0) / 2**30
        ms = r.get("decode_ms_per_token")
        peak = r.get("peak_gib")
        print(f"{r['method']:<26}{r['max_batch']:>9}{'+' if r['capped'] else ' '}{ratio:>9}{kv:>12.2f}"
              f"{(f'{ms:.2f}' if ms else '-'):>10}{(f'{peak:.1f}' if peak else '-'):>10}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "args": vars(args) | {"out": str(args.out)}}
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
