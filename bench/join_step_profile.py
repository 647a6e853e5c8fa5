"""What one narrow prefill forward costs: the host's time to issue it against the device's time to
run it (issue #16: the forwards that prefill prompts joining a running batch).

A request that joins a running batch is prefilled ``--join-chunk-size`` tokens a step, shared by
the prompts joining at once, with the running rows' decode between those forwards. On the H200 a
512-token joining forward took 25-34 ms in the load bench's traces, where its matrix products need
about 5 ms (docs/server.md, "From 1 to 64 clients"). This bench prefills ``--rows`` prompts of
``--prompt`` tokens ``--width`` tokens a forward, as joiners are prefilled (``full``'s as one padded
batch, each prompt ``width // rows`` tokens a forward and at least 16; a compressing method's one
prompt at a time at the whole width), and one of them alone in ``--chunk-size`` chunks, as the FIFO
server prefills a prompt. Per forward it reports the
host time to issue it (from a synced start to the call's return) and the wall time to a sync after
it. With ``--profile`` it also reports, over ``--profile-steps`` narrow forwards from the middle of
the largest ``--rows``' prefill, the device time of their kernels (torch profiler) and the ops with
the most device and host time. A forward whose host time is close to its wall time is
host-bound. Prints a table and writes JSON.

    PYTHONPATH=. python3 bench/join_step_profile.py --random-8b 16 --rows 1,7,31 --prompt 4096 \\
        --width 512 --profile --out bench/results/join_step_profile_h200.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prefill_forwards(llm, ids: list[list[int]], method, width: int | None,
                     profile: range | None = None) -> tuple[list[tuple[float, float]], object | None]:
    """Prefill the prompts ``ids`` together through ``llm.runner.prefill_steps`` (``width``: tokens a
    forward over all of them; None: the runner's chunk size per prompt). Returns each forward's
    ``(host_s, wall_s)`` (from a synced start to the forward's return, and to a sync after it) and,
    with ``profile`` (the forwards' indices), a ``torch.profiler`` over those forwards (None without)."""
    import torch

    from kvsift.engine.runner import sync

    run = method.start(max(len(x) for x in ids), llm.info.num_layers)
    gen = llm.runner.prefill_steps(ids, method, run, None, False, width=width)
    dev = llm.device
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof, on = None, False
    times: list[tuple[float, float]] = []
    try:
        done = False
        while not done:
            if profile is not None and len(times) == profile.start:
                prof, on = torch.profiler.profile(activities=acts), True
                prof.__enter__()
            sync(dev)
            t0 = time.perf_counter()
            try:
                next(gen)
            except StopIteration:   # the last forward runs before the generator returns
                done = True
            t1 = time.perf_counter()
            sync(dev)
            t2 = time.perf_counter()
            times.append((t1 - t0, t2 - t0))
            if on and len(times) == profile.stop:
                prof.__exit__(None, None, None)
                on = False
    finally:
        if on:
            prof.__exit__(None, None, None)
        gen.close()
    return times, prof


def _device_ms(evt) -> float:
    """An op's own device time (ms) in a profiler's averages, whatever this torch calls the field."""
    us = getattr(evt, "self_device_time_total", None)
    if us is None:
        us = getattr(evt, "self_cuda_time_total", 0.0)
    return us / 1e3


def summarize_profile(prof, steps: int, top: int = 12) -> dict:
    """The profiled forwards' device time per forward (their kernels' own times summed) and the
    ops with the most own device time and host time."""
    avgs = list(prof.key_averages())
    device = sum(_device_ms(e) for e in avgs)
    by_dev = sorted(avgs, key=_device_ms, reverse=True)[:top]
    by_cpu = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]

    def row(e) -> dict:
        return {"op": e.key, "calls": e.count, "self_device_ms": round(_device_ms(e), 3),
                "self_host_ms": round(e.self_cpu_time_total / 1e3, 3)}

    return {"forwards": steps, "device_ms_per_forward": round(device / steps, 3) if device > 0 else None,
            "launches_per_forward": round(sum(e.count for e in avgs if "launch" in e.key.lower()) / steps, 1),
            "top_device": [row(e) for e in by_dev if _device_ms(e) > 0], "top_host": [row(e) for e in by_cpu]}


def measure(llm, method, rows: int, prompt: int, width: int, profile_steps: int, seed: int = 0) -> dict:
    """One setting: ``rows`` prompts of ``prompt`` tokens prefilled ``width`` tokens a forward
    (joiners), then the first of them alone at the chunk size (FIFO); ``profile_steps`` > 0 profiles
    that many narrow forwards from the middle of the narrow prefill (their times, in the medians,
    include the profiler's own)."""
    rng = random.Random(seed)
    vocab = min(len(llm.tokenizer), 30000) if llm.tokenizer is not None else 30000
    ids = [[rng.randrange(100, vocab) for _ in range(prompt)] for _ in range(rows)]
    # the profiled forwards: about the middle of the narrow prefill (its count is rounded per prompt)
    n_narrow = max(1, -(-rows * prompt // width))
    first = max(0, n_narrow // 2 - profile_steps // 2)
    narrow, prof = prefill_forwards(llm, ids, method, width,
                                    range(first, first + profile_steps) if profile_steps > 0 else None)
    fifo, _ = prefill_forwards(llm, ids[:1], method, None)   # one prompt alone, at the chunk size
    host = [h for h, _ in narrow]
    wall = [w for _, w in narrow]
    out = {
        "rows": rows, "prompt": prompt, "width": width, "forwards": len(narrow),
        "tokens_per_forward": round(rows * prompt / len(narrow), 1),
        "host_ms_p50": round(1e3 * statistics.median(host), 3), "wall_ms_p50": round(1e3 * statistics.median(wall), 3),
        "host_share": round(sum(host) / sum(wall), 3),
        "us_per_token": round(1e6 * sum(wall) / (rows * prompt), 2),
        "fifo_forwards": len(fifo), "fifo_us_per_token": round(1e6 * sum(w for _, w in fifo) / prompt, 2),
        "fifo_host_share": round(sum(h for h, _ in fifo) / sum(w for _, w in fifo), 3),
    }
    out["narrow_over_fifo"] = round(out["us_per_token"] / out["fifo_us_per_token"], 2)
    if prof is not None:
        profiled = min(profile_steps, len(narrow) - first)
        out["profile"] = summarize_profile(prof, profiled)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--random-8b", type=int, default=None, metavar="LAYERS",
                   help="a random-weight Llama-3.1-8B-shaped model of LAYERS layers, bf16, on CUDA")
    p.add_argument("--method", default="full")
    p.add_argument("--budget", default=None)
    p.add_argument("--rows", default="1,7,31", help="comma-separated: prompts prefilled together")
    p.add_argument("--prompt", type=int, default=4096, help="tokens per prompt")
    p.add_argument("--width", type=int, default=512, help="tokens a narrow forward, over all the rows")
    p.add_argument("--chunk-size", type=int, default=4096, help="the FIFO prefill's chunk per prompt")
    p.add_argument("--profile", action="store_true", help="torch-profile narrow forwards of the largest --rows")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--out", default="bench/out/join_step_profile.json")
    args = p.parse_args(argv)
    try:
        rows = [int(x) for x in args.rows.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rows takes comma-separated whole numbers, got {args.rows!r}")
    if not rows or min(rows) < 1:
        p.error(f"--rows takes whole numbers >= 1, got {args.rows!r}")
    for name in ("prompt", "width", "chunk_size", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} takes a whole number >= 1")
    if args.random_8b is not None and args.random_8b < 1:
        p.error("--random-8b takes a layer count >= 1")
    from kvsift import LLM
    from kvsift.methods import build_method, parse_budget

    budget = parse_budget(args.budget) if args.budget else None
    method = build_method(args.method, budget)
    if not method.chunk_invariant():
        p.error(f"{args.method} is prefilled at the chunk size when it joins, not narrow "
                "(KVMethod.chunk_invariant): nothing to compare")
    if args.random_8b is not None:
        from bench.offload import random_8b

        llm = LLM.from_model(random_8b(args.random_8b), None, name=f"llama-8b-shape-random-{args.random_8b}l",
                             chunk_size=args.chunk_size)
        label = f"random Llama-3.1-8B shape, {args.random_8b} layers, bf16"
    else:
        llm = LLM(args.model, chunk_size=args.chunk_size)
        label = args.model
    measure(llm, method, 1, min(args.prompt, 2 * args.width), args.width, 0)   # warm-up: kernels, allocator
    results = [measure(llm, method, r, args.prompt, args.width, args.profile_steps if args.profile and r == max(rows) else 0)
               for r in rows]
    print(f"{label}, {args.method} {args.budget or ''}, {args.prompt}-token prompts, narrow forwards of "
          f"{args.width} tokens against one prompt at a time in chunks of {args.chunk_size}, device {llm.device}")
    print(f"{'rows':>4} {'forwards':>8} {'tokens/fwd':>10} {'host ms p50':>11} {'wall ms p50':>11} {'host share':>10} "
          f"{'us/token':>9} {'FIFO us/token':>13} {'narrow/FIFO':>11} {'device ms/fwd':>13}")
    for r in results:
        dev = (r.get("profile") or {}).get("device_ms_per_forward")
        print(f"{r['rows']:>4} {r['forwards']:>8} {r['tokens_per_forward']:>10} {r['host_ms_p50']:>11} "
              f"{r['wall_ms_p50']:>11} {r['host_share']:>10} {r['us_per_token']:>9} {r['fifo_us_per_token']:>13} "
              f"{r['narrow_over_fifo']:>11} {dev if dev is not None else '-':>13}")
    for r in results:
        if "profile" in r:
            pr = r["profile"]
            print(f"profile, {r['rows']} rows, {pr['forwards']} narrow forwards: "
                  f"{pr['launches_per_forward']} launches a forward; top ops by own device time")
            for e in pr["top_device"][:8]:
                print(f"  {e['self_device_ms']:>9.3f} ms device {e['self_host_ms']:>9.3f} ms host {e['calls']:>6}x  {e['op']}")
            print("  top ops by own host time")
            for e in pr["top_host"][:8]:
                print(f"  {e['self_host_ms']:>9.3f} ms host {e['self_device_ms']:>9.3f} ms device {e['calls']:>6}x  {e['op']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "label": label, "device": str(llm.device),
                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
