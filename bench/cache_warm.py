"""sentencekv's device chunk cache from a cold start, with and without ``warm_cache``: the chunks
copied host -> device at each decode step (the cache's misses, summed over layers, batch rows and
KV heads), the same prompt and greedy tokens both ways. Without it the first step fetches one
selection and the next steps fetch what their drifting selections miss (on the H200 a 29-row
batch's first inter-token gaps after a join ran 70, 58, 50 ms against a 37 ms median, warming up);
with it the first step fills the whole cache (``cache_chunks`` slots) with the chunks its query
scores best, so later steps mostly hit. Prints a table and writes JSON. Counts, not times: they
hold on any device (the CPU has no cache by default, so ``--cache-chunks`` sets one).

    PYTHONPATH=. python3 bench/cache_warm.py --model qwen2.5-coder-0.5b --prompt-file examples/village_report.txt \\
        --question "Where is the key to the old chapel kept?" --budget 512 --cache-chunks 64 \\
        --out bench/results/cache_warm_qwen05_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def misses_per_step(llm, ids: list[int], max_tokens: int, budget, opts: dict) -> tuple[list[int], list[int], list[int]]:
    """Greedy-generate ``ids`` with sentencekv and return ``(tokens, misses per decode step,
    lookups per decode step)`` (a step's ``warm_cache`` fill counted in it)."""
    import kvsift.kernels.chunk_cache as cc
    from kvsift import SamplingParams
    from kvsift.methods.sentencekv import SentenceKV

    misses, lookups = [], []
    real_plan = SentenceKV.plan
    real = {name: getattr(cc, name) for name in ("lru_plan", "lru_plan_ref")}

    def plan(self, run, layer, query, ctx):
        if ctx.decoding and layer.layer_idx == 0:
            misses.append(0)
            lookups.append(0)
        return real_plan(self, run, layer, query, ctx)

    def spy(fn):
        def wrapped(idx, *a, **k):
            out = fn(idx, *a, **k)
            if misses:
                misses[-1] += int((out[1] >= 0).sum())
                lookups[-1] += int((idx >= 0).sum())
            return out
        return wrapped

    SentenceKV.plan = plan
    for name, fn in real.items():
        setattr(cc, name, spy(fn))
    try:
        out = llm.generate([ids], SamplingParams(max_tokens=max_tokens), method="sentencekv", budget=budget,
                           method_kwargs=opts)[0]
    finally:
        SentenceKV.plan = real_plan
        for name, fn in real.items():
            setattr(cc, name, fn)
    return list(out.token_ids), misses, lookups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a named model, HF directory or .gguf (default: the default model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt-file", type=Path, required=True)
    ap.add_argument("--question", default=None, help="appended to the document (chat template on chat models)")
    ap.add_argument("--budget", default="512")
    ap.add_argument("--cache-chunks", type=int, default=64, help="device cache slots per (row, KV head), >= 1")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cache_chunks < 1 or args.max_tokens < 2:
        ap.error("--cache-chunks must be >= 1 and --max-tokens >= 2")
    if not args.prompt_file.is_file():
        ap.error(f"--prompt-file {args.prompt_file} not found")
    from kvsift import LLM
    from kvsift.methods import parse_budget

    budget = parse_budget(args.budget)
    llm = LLM(args.model, device=args.device, decode_mode="eager")   # counted per fetch: no graphs
    text = args.prompt_file.read_text()
    ids = llm.encode(text + (f"\n\nQuestion: {args.question}\nAnswer:" if args.question else ""))
    runs = {}
    for warm in (False, True):
        tokens, misses, lookups = misses_per_step(llm, ids, args.max_tokens, budget,
                                                  {"cache_chunks": args.cache_chunks, "warm_cache": warm})
        runs["warm" if warm else "cold"] = {"tokens": tokens, "misses": misses, "lookups": lookups}
    cold, warm = runs["cold"], runs["warm"]
    same = cold["tokens"] == warm["tokens"]
    n = min(len(cold["misses"]), len(warm["misses"]))
    print(f"{len(ids)}-token prompt, sentencekv budget {args.budget}, cache {args.cache_chunks} chunks per (row, KV "
          f"head), {llm.info.num_layers} layers; greedy tokens equal: {same}")
    print(f"{'step':>4}  {'cold misses':>11}  {'warm misses':>11}  {'lookups':>8}")
    for i in range(n):
        print(f"{i + 1:>4}  {cold['misses'][i]:>11}  {warm['misses'][i]:>11}  {cold['lookups'][i]:>8}")
    after = {k: sum(r["misses"][1:n]) for k, r in runs.items()}
    first = {k: r["misses"][0] for k, r in runs.items()}
    print(f"step 1: cold {first['cold']}, warm {first['warm']} chunks copied; steps 2-{n}: cold {after['cold']}, "
          f"warm {after['warm']}")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "model": args.model or "default", "device": str(llm.info.device), "prompt_tokens": len(ids),
            "budget": args.budget, "cache_chunks": args.cache_chunks, "layers": llm.info.num_layers,
            "tokens_equal": same, "first_step_misses": first, "later_misses": after, "runs": runs}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
