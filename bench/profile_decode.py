"""Where a decode step's time goes, per method: the device time of each CUDA kernel over ``--steps``
decode steps (``torch.profiler``), after ``--warm`` steps, on a random-weight Llama-shaped model (the
8B shape on CUDA, ``--layers`` of its 32; a narrow model on the CPU, where the table lists CPU ops).
Static decode mode by default (the steps a CUDA graph would replay, each kernel visible; a graph
replay hides them). For issue #13's questions: what a ``kivi`` step spends beside the quantized
attention kernel, and why ``sentencekv+kivi`` decodes slower than ``sentencekv``.

    PYTHONPATH=. python3 bench/profile_decode.py --ctx 131072 --methods full,kivi,sentencekv:2048,sentencekv+kivi:2048 \\
        --out bench/out/profile_decode.json
    PYTHONPATH=. python3 bench/profile_decode.py --ctx 512 --layers 2 --steps 3 --methods full,kivi   # CPU smoke run

Per method: the step's wall time (host, synchronised, unprofiled steps), the summed kernel time
per step, and the top kernels by device time per step (name, calls per step, us per step, share).
Kernels are grouped by name with launch-specific suffixes kept (Triton kernels carry their name).
The prompt is prefilled once per method (random tokens); only the decode steps are profiled.
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
def profiled_steps(warm: int, steps: int, activities):
    """Inside: ``DecodeRunner.step`` runs ``warm`` steps unprofiled (timed, synchronised), then
    ``steps`` steps under ``torch.profiler``; yields a dict that gets ``prof`` and ``wall_ms`` (the
    unprofiled steps' mean). The method is restored on exit."""
    from kvsift.engine import decode

    orig = decode.DecodeRunner.step
    seen = {"n": 0, "prof": None, "wall": [], "first": None}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step(self, tok, pos):
        i = seen["n"]
        seen["n"] += 1
        if i == warm:
            sync()
            seen["prof"] = torch.profiler.profile(activities=activities)
            seen["prof"].__enter__()
        if i < warm:
            sync()
            t0 = time.perf_counter()
            out = orig(self, tok, pos)
            sync()
            if i > 0:   # the first step sets things up (its kernels compiled, graphs recorded): apart
                seen["wall"].append(time.perf_counter() - t0)
            else:
                seen["first"] = time.perf_counter() - t0
            return out
        out = orig(self, tok, pos)
        if i == warm + steps - 1:
            sync()
            seen["prof"].__exit__(None, None, None)
        return out

    decode.DecodeRunner.step = step
    try:
        yield seen
    finally:
        decode.DecodeRunner.step = orig


def kernel_table(prof, steps: int, device: bool, top: int) -> tuple[float, list[dict]]:
    """``(total us per step, rows)``: the profiler's events grouped by name, device time (CPU time
    of the ops on the CPU) per step, largest first."""
    rows = []
    for ev in prof.key_averages():
        if device:
            us = getattr(ev, "self_device_time_total", None)
            if us is None:
                us = getattr(ev, "self_cuda_time_total", 0.0)
            if not us or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = ev.self_cpu_time_total
            if not us or not ev.key.startswith("aten::"):
                continue
        rows.append({"name": ev.key[:90], "calls_per_step": ev.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else 0.0
    return total, rows[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=131072)
    p.add_argument("--methods", default="full,kivi,sentencekv:2048,sentencekv+kivi:2048")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warm", type=int, default=6, help="unprofiled steps first (timed: the wall column)")
    p.add_argument("--steps", type=int, default=8, help="profiled steps")
    p.add_argument("--mode", default="static", choices=["static", "eager"], help="decode mode")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk size")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("ctx", "layers", "batch", "warm", "steps", "chunk", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    from bench._random_llama import random_llama
    from bench._systems import parse_system
    from kvsift import LLM, SamplingParams

    model, dev = random_llama(args.layers, args.ctx + args.warm + args.steps + 64)
    llm = LLM.from_model(model, None, name="llama-8b-shape-random", chunk_size=args.chunk, decode_mode=args.mode)
    cuda = dev.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    vocab = model.config.vocab_size
    results = []
    for spec in [s for s in args.methods.split(",") if s]:
        name, budget, kw = parse_system(spec)
        g = torch.Generator().manual_seed(args.ctx)
        prompt = torch.randint(0, vocab, (args.ctx,), generator=g).tolist()
        params = SamplingParams(max_tokens=args.warm + args.steps + 1, ignore_eos=True)
        with profiled_steps(args.warm, args.steps, acts) as seen:
            out = llm.generate([prompt] * args.batch, params, method=name, budget=budget,
                               method_kwargs=kw or None, progress=False)[0]
        total, rows = kernel_table(seen["prof"], args.steps, cuda, args.top)
        wall = 1000 * sum(seen["wall"]) / max(1, len(seen["wall"]))
        first = 1000 * seen["first"] if seen["first"] is not None else None
        res = {"method": spec, "ctx": args.ctx, "batch": args.batch, "mode": out.stats.decode_mode,
               "wall_ms_per_step": wall, "first_step_ms": first,
               "warm_steps_ms": [1000 * w for w in seen["wall"]], "prefill_s": out.stats.prefill_s,
               "kernel_us_per_step": total, "top": rows, "method_stats": out.stats.method_stats}
        results.append(res)
        print(f"\n{spec}  ctx={args.ctx} batch={args.batch} mode={res['mode']}  wall {wall:.2f} ms/step  "
              f"{'kernels' if cuda else 'CPU ops'} {total / 1000:.2f} ms/step  first step "
              f"{'-' if first is None else f'{first:.1f} ms'}  prefill {out.stats.prefill_s:.2f} s")
        print(f"  {'us/step':>9} {'share':>6} {'calls':>6}  name")
        for r in rows:
            print(f"  {r['us_per_step']:>9.1f} {100 * r['share']:>5.1f}% {r['calls_per_step']:>6.1f}  {r['name']}")
        del out
        if cuda:
            torch.cuda.empty_cache()
        if args.out is not None:   # after each method: a cut call keeps what finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "args": vars(args) | {"out": str(args.out)}}
            args.out.write_text(json.dumps({"info": info, "rows": results}, indent=1))
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
