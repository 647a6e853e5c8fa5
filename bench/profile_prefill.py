"""Where a prefill's time goes: the wall time of one prompt's prefill and a table of the engine's
named ranges (``kvsift.prefill.plan`` / ``attend`` / ``after_attend``: a method's selection of
offloaded KV, the chunk's attention, the method's work after it, e.g. sentencekv's offload) and of
the top CUDA kernels, from ``torch.profiler``, on a random-weight Llama-shaped model (the 8B shape
on CUDA, ``--layers`` of its 32; a narrow model with its KV heads on the CPU). For the questions
issue #14 leaves open: why ``sentencekv`` prefills slower than ``full``, and what each prefill chunk
costs under ``prefill_offload``. Prints the tables and writes them (and JSON) under ``--out``.

    PYTHONPATH=. python3 bench/profile_prefill.py --ctx 131072 --methods full,sentencekv:2048 \\
        --out bench/out/profile_prefill
    PYTHONPATH=. python3 bench/profile_prefill.py --ctx 262144 --chunk 4096 \\
        --methods sentencekv+kivi:2048:prefill_offload=true:prefill_budget=4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench._random_llama, kvsift

RANGES = ("kvsift.prefill.plan", "kvsift.prefill.attend", "kvsift.prefill.after_attend")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk size")
    p.add_argument("--methods", default="full,sentencekv:2048",
                   help="comma list of method[:budget[:option=value...]]")
    p.add_argument("--top", type=int, default=15, help="kernels listed per method")
    p.add_argument("--out", default="bench/out/profile_prefill")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from bench._random_llama import random_llama
    from bench._systems import parse_system
    from kvsift import LLM, SamplingParams

    model, dev = random_llama(args.layers, args.ctx + 4096)
    llm = LLM.from_model(model, None, chunk_size=args.chunk)
    ids = torch.randint(0, model.config.vocab_size, (args.ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, text = [], []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for spec in args.methods.split(","):
        name, budget, opts = parse_system(spec)
        small = ids[: min(len(ids), 4 * args.chunk)]   # warm-up: kernels compiled, allocator warm
        llm.generate(small, one, method=name, budget=min(budget, len(small) // 2) if budget else None,
                     method_kwargs=opts or None, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            out = llm.generate(ids, one, method=name, budget=budget, method_kwargs=opts or None, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ev = prof.key_averages()
        spans = {e.key: {"cpu_ms": e.cpu_time_total / 1e3, "count": e.count} for e in ev if e.key in RANGES}
        dev_attr = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"
        kernels = sorted(((e.key, getattr(e, dev_attr, 0) / 1e3, e.count) for e in ev
                          if dev.type == "cuda" and getattr(e, dev_attr, 0) > 0 and not e.key.startswith("kvsift.")),
                         key=lambda t: -t[1])[: args.top]
        st = out[0].stats
        row = {"system": spec, "ctx": args.ctx, "layers": args.layers, "chunk": args.chunk,
               "prefill_s": st.prefill_s, "profiled_wall_s": wall, "spans": spans,
               "kernels": [{"name": k, "device_ms": t, "count": c} for k, t, c in kernels],
               "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
        rows.append(row)
        lines = [f"== {spec}: ctx {args.ctx}, {args.layers} layers, chunk {args.chunk}, {dev.type}; "
                 f"prefill {st.prefill_s:.2f} s (profiled: {wall:.2f} s wall)",
                 f"{'range':<30} {'calls':>7} {'CPU ms (incl. waits)':>22}"]
        for k in RANGES:
            if k in spans:
                lines.append(f"{k:<30} {spans[k]['count']:>7} {spans[k]['cpu_ms']:>22.1f}")
        if kernels:
            lines.append(f"{'kernel (device time)':<70} {'calls':>7} {'ms':>9}")
            lines += [f"{k[:70]:<70} {c:>7} {t:>9.1f}" for k, t, c in kernels]
        text += lines + [""]
        print("\n".join(lines), flush=True)
    (out_dir / "profile_prefill.txt").write_text("\n".join(text))
    (out_dir / "profile_prefill.json").write_text(json.dumps({"device": torch.cuda.get_device_name()
                                                              if dev.type == "cuda" else "cpu", "rows": rows}, indent=1))
    print(f"wrote {out_dir}/profile_prefill.txt and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
