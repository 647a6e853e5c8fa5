"""Inter-token time of a running batch while a long prompt joins it (continuous batching): the
joining prompt prefilled a chunk per decode step (``LLM.join_chunks = 1``, the default) against
all at once (``join_chunks = 0``), in one run, same requests.

A batch of ``--running`` sequences decodes ``--max-tokens`` tokens; at its third step a request
with a ``--join-prompt``-token prompt joins (and decodes ``--max-tokens`` too). Reported per
setting: the running rows' inter-token time (p50, p99 and max over their steps), the joiner's time
to its first token after it joined, the wall time, and whether every answer equals the request's
alone (it must). Prints a table and writes JSON.

    PYTHONPATH=. python3 bench/join_latency.py --model qwen2.5-coder-0.5b --method snapkv --budget 256 \\
        --join-prompt 3072 --chunk-size 256 --out bench/results/join_latency_cpu.json

On a GPU, ``--random-8b LAYERS`` decodes a random-weight Llama-3.1-8B-shaped model (bf16) in
``--decode-mode graph``; ``--arena 0,1`` runs every setting without and with the runner's KV arenas
(``LLM(kv_arena=True)``), and each row reports the CUDA graphs recorded during it: the first gap
after a join is where a new batch shape records its graphs, unless an arena of that shape already
holds them. (In bf16 a batched row's greedy tokens may differ from the row alone by rounding: the
equality column is informative there.)

``--profile-gap`` times the joiner's own first gap (its first token to its second, where its rows
enter the running batch) and runs ``cProfile`` over it and over the join before it (the joiner
handed over to its first token: its prefill, what the running rows wait through): the top
functions of each by cumulative time are printed and written to the JSON. The join never reports
``idle()`` unless ``--idle-after-join`` (then it does once the joiner was handed over, as a
scheduler whose queue emptied, and the engine may record the new batch's graph before its first
tokens go out; see ``LLM.run_batch``).
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


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def top_functions(prof, n: int = 25) -> list[dict]:
    """The ``n`` functions of a ``cProfile`` run with the most cumulative time (file:line name)."""
    import pstats

    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_cc, calls, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line} {name}", "calls": calls,
                     "cum_ms": round(1e3 * ct, 2), "self_ms": round(1e3 * tt, 2)})
    return sorted(rows, key=lambda r: -r["cum_ms"])[:n]


def one(llm, join_chunks: int, running: list[list[int]], joiner: list[int], params, method, budget,
        profile: bool = False, idle: bool = False) -> dict:
    """One run. ``profile``: ``cProfile`` over the join (the joiner handed over to its first token:
    what the running rows wait through, its prefill included) and over the joiner's first gap (its
    first token to its second: where its rows enter the running batch), the top functions of each
    returned.
    ``idle``: the join says nobody waits once the joiner was handed over (``join.idle()``, as a
    scheduler whose queue emptied: the engine may then record a new batch's graph before its first
    tokens go out); without it, as a server with requests still arriving."""
    llm.join_chunks = join_chunks
    captures = llm.runner.graphs.stats.captures

    def arena_counts():   # batches loaded into arenas (a copy) and changes of rows made in place
        return llm.runner.arena_loads, llm.runner.arena_restacks

    loads0, restacks0 = arena_counts()
    reqs = [llm.request([p], params, method=method, budget=budget) for p in running]
    late = llm.request([joiner], params, method=method, budget=budget)
    stamps: dict[int, list[float]] = {r.id: [] for r in reqs + [late]}
    outs, asked = {}, []
    joined_at = None

    profs: dict[str, object] = {}

    def start(name: str) -> None:
        import cProfile

        profs[name] = cProfile.Profile()
        profs[name].enable()

    def join(group, rows):
        nonlocal joined_at
        asked.append(rows)
        if len(asked) == 3:
            joined_at = time.perf_counter()
            if profile:
                start("join")
            return [late]
        return []

    if idle:
        join.idle = lambda: len(asked) >= 3

    t0 = time.perf_counter()
    for r, ev in llm.run_batch(list(reqs), join=join):
        if ev.token_id is not None:
            stamps[r.id].append(time.perf_counter())
            if profile and r.id == late.id and len(stamps[r.id]) in (1, 2):
                if len(stamps[r.id]) == 1:
                    profs["join"].disable()
                    start("first_gap")
                else:
                    profs["first_gap"].disable()
        if ev.output is not None:
            outs[r.id] = ev.output
    wall = time.perf_counter() - t0
    for pr in profs.values():
        pr.disable()   # a joiner of one token: no gap (disabling twice is harmless)
    itl = [b - a for r in reqs for a, b in zip(stamps[r.id], stamps[r.id][1:])]
    return {"join_chunks": join_chunks, "wall_s": round(wall, 3),
            "itl_p50_ms": round(1e3 * statistics.median(itl), 1), "itl_p99_ms": round(1e3 * pct(itl, 0.99), 1),
            "itl_max_ms": round(1e3 * max(itl), 1),
            "joiner_ttft_ms": round(1e3 * (stamps[late.id][0] - joined_at), 1) if stamps[late.id] else None,
            "joiner_first_gap_ms": (round(1e3 * (stamps[late.id][1] - stamps[late.id][0]), 1)
                                    if len(stamps[late.id]) > 1 else None),
            **{f"{name}_profile": top_functions(pr) for name, pr in profs.items()},
            "graphs_recorded": llm.runner.graphs.stats.captures - captures,
            "arena_loads": arena_counts()[0] - loads0, "arena_restacks": arena_counts()[1] - restacks0,
            "tokens": {r.id: outs[r.id].token_ids for r in reqs + [late]}, "_order": [r.id for r in reqs + [late]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--method", default="full")
    p.add_argument("--budget", default=None)
    p.add_argument("--running", type=int, default=4, help="sequences already decoding")
    p.add_argument("--running-prompt", type=int, default=256)
    p.add_argument("--join-prompt", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--join-chunks", default="0,1")
    p.add_argument("--out", default="bench/out/join_latency.json")
    p.add_argument("--random-8b", type=int, default=None, metavar="LAYERS",
                   help="a random-weight Llama-3.1-8B-shaped model of LAYERS layers on CUDA (bf16), not --model")
    p.add_argument("--decode-mode", default="eager", choices=("eager", "static", "graph"))
    p.add_argument("--arena", default="0", help="comma-separated 0/1: without / with the runner's KV arenas")
    p.add_argument("--idle-after-join", action="store_true",
                   help="the join reports idle() once the joiner was handed over (a queue that emptied); "
                        "default: never idle, as with requests still arriving")
    p.add_argument("--profile-gap", action="store_true",
                   help="cProfile the join (to the joiner's first token) and the joiner's first gap (its first "
                        "token to its second) in every setting; their top functions by cumulative time "
                        "are printed and written to the JSON")
    args = p.parse_args(argv)
    arenas = [x.strip() for x in args.arena.split(",") if x.strip()]
    if not arenas or any(x not in ("0", "1") for x in arenas):
        p.error(f"--arena takes 0 and/or 1, got {args.arena!r}")
    if args.random_8b is not None and args.random_8b < 1:
        p.error("--random-8b takes a layer count >= 1")
    from kvsift import LLM, SamplingParams
    from kvsift.methods import parse_budget

    budget = parse_budget(args.budget) if args.budget else None
    if args.random_8b is not None:
        from bench.offload import random_8b

        model = random_8b(args.random_8b)
        llms = {a: LLM.from_model(model, None, name=f"llama-8b-shape-random-{args.random_8b}l",
                                  chunk_size=args.chunk_size, decode_mode=args.decode_mode, kv_arena=a == "1")
                for a in arenas}
        label = f"random Llama-3.1-8B shape, {args.random_8b} layers, bf16"
    else:
        llms = {a: LLM(args.model, chunk_size=args.chunk_size, decode_mode=args.decode_mode, kv_arena=a == "1")
                for a in arenas}
        label = args.model
    llm = llms[arenas[0]]
    rng = random.Random(0)
    vocab = min(len(llm.tokenizer), 30000) if llm.tokenizer is not None else 30000
    running = [[rng.randrange(100, vocab) for _ in range(args.running_prompt)] for _ in range(args.running)]
    joiner = [rng.randrange(100, vocab) for _ in range(args.join_prompt)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    alone = [llm.generate(x, params, method=args.method, budget=budget)[0].token_ids for x in running + [joiner]]
    rows = []
    for a in arenas:
        llm = llms[a]
        one(llm, 1, running[:1], joiner[:args.chunk_size], params, args.method, budget)   # warm-up
        for jc in (int(x) for x in args.join_chunks.split(",")):
            r = one(llm, jc, running, joiner, params, args.method, budget, profile=args.profile_gap,
                    idle=args.idle_after_join)
            got = [r["tokens"][i] for i in r.pop("_order")]
            r.pop("tokens")
            r["kv_arena"] = a == "1"
            r["idle_after_join"] = args.idle_after_join
            r["answers_equal_alone"] = got == alone
            rows.append(r)
    print(f"{label}, {args.method} {args.budget or ''}: {args.running} running x {args.running_prompt}-token "
          f"prompts, one {args.join_prompt}-token prompt joins at step 3, chunk {args.chunk_size}, "
          f"{args.max_tokens} tokens each, {args.decode_mode} decode, CPU threads {__import__('torch').get_num_threads()}")
    print(f"{'arena':>5} {'join chunks':>11} {'ITL p50 ms':>10} {'ITL p99 ms':>10} {'ITL max ms':>10} "
          f"{'joiner TTFT ms':>14} {'1st gap ms':>10} {'graphs':>6} {'loads':>5} {'in place':>8} {'wall s':>7} {'= alone':>7}")
    for r in rows:
        print(f"{'on' if r['kv_arena'] else 'off':>5} {('all' if r['join_chunks'] == 0 else r['join_chunks']):>11} "
              f"{r['itl_p50_ms']:>10} {r['itl_p99_ms']:>10} {r['itl_max_ms']:>10} {r['joiner_ttft_ms']:>14} "
              f"{r['graphs_recorded']:>6} {r['arena_loads']:>5} {r['arena_restacks']:>8} {r['wall_s']:>7} "
              f"{str(r['answers_equal_alone']):>7}")
    for r in rows:
        for name, what, ms in (("join", "the join (joiner handed over to its first token)", r["joiner_ttft_ms"]),
                               ("first_gap", "joiner's first gap", r["joiner_first_gap_ms"])):
            if r.get(f"{name}_profile"):
                print(f"{what}, arena {'on' if r['kv_arena'] else 'off'}, join chunks {r['join_chunks']}: "
                      f"{ms} ms; top functions by cumulative time")
                for f in r[f"{name}_profile"][:15]:
                    print(f"  {f['cum_ms']:>9.1f} ms cum {f['self_ms']:>8.1f} ms self {f['calls']:>6}x  {f['function']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "label": label, "results": rows}, indent=1))
    # bf16 on a GPU: batched rows may round differently from the row alone (reported, not an error)
    return 0 if args.random_8b is not None or all(r["answers_equal_alone"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
