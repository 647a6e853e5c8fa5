#!/usr/bin/env python3
"""Decode speed per method on the CPU over a stored context: the same document prefilled once per
method (``LLM.prefill_context``), then questions answered over it in interleaved rounds, so every
method's decode steps are timed under the same machine load.

    OMP_WAIT_POLICY=PASSIVE python bench/cpu_decode.py                 # default model, README document
    python bench/cpu_decode.py --methods full,sentencekv,kivi,quest --length 5000 --rounds 5

Per method: the context's prefill seconds, the question's prefill (over the stored context) and the
decode ms/token of each round, their medians, and the ratio of ``full``'s median decode ms/token to
the method's (above 1: faster than ``full``). Every answer is greedy; the table says whether each
method's answer equals ``full``'s. Prints a table and writes JSON (default
``bench/results/cpu_decode_MODEL.json``). A decode step of a small model on the CPU is mostly its
weights (the 0.5B's LM head alone is 0.5 GB in fp32), so what this shows is each method's own
per-step overhead (scoring, fetching, masks) next to an attention that is a small part of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="named model, HF directory or .gguf (default: the default model)")
    ap.add_argument("--prompt-file", type=Path, default=ROOT / "examples" / "village_report.txt")
    ap.add_argument("--question", default="Where is the key to the old chapel kept?")
    ap.add_argument("--length", type=int, default=5000, help="document tokens (the document is cut at a paragraph)")
    ap.add_argument("--methods", default="full,sentencekv,snapkv,quest,kivi")
    ap.add_argument("--budget", default="0.25", help="budget of the methods that take one")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3, help="questions per method, interleaved across methods")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/cpu_decode_MODEL.json)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 2 or args.length < 16:
        ap.error("--rounds must be >= 1, --max-tokens >= 2 and --length >= 16")
    if not args.prompt_file.is_file():
        ap.error(f"--prompt-file {args.prompt_file}: no such file")
    from kvsift.errors import UnknownMethodError
    from kvsift.methods.base import spec_classes

    for m in args.methods.split(","):
        try:
            spec_classes(m.strip())    # an unknown name: a clear error before the model loads
        except UnknownMethodError as e:
            ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from cpu_vs_hf import cut_document
    from kvsift import LLM, SamplingParams
    from kvsift.budget import parse_budget
    from kvsift.eval.runner import budgetless
    from kvsift.models import DEFAULT_MODEL

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "full" not in methods:
        methods.insert(0, "full")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = parse_budget(args.budget)
    name = args.model or DEFAULT_MODEL
    llm = LLM(name)
    doc = cut_document(llm, args.prompt_file.read_text(encoding="utf-8"), "", args.length)
    params = SamplingParams(max_tokens=args.max_tokens)

    ctxs, rows = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        ctxs[m] = llm.prefill_context(doc, method=m, budget=None if budgetless(m) else budget)
        rows[m] = {"method": m, "budget": None if budgetless(m) else args.budget,
                   "context_prefill_s": time.perf_counter() - t0, "question_prefill_s": [], "decode_ms_per_token": [],
                   "new_tokens": [], "answer": None}
    for _ in range(args.rounds):
        for m in methods:
            out = llm.generate(args.question, params, context=ctxs[m], progress=False)[0]
            r = rows[m]
            r["question_prefill_s"].append(out.stats.prefill_s)
            r["decode_ms_per_token"].append(out.stats.decode_ms_per_token)
            r["new_tokens"].append(len(out.token_ids))
            r["answer"] = out.text
    base = statistics.median(rows["full"]["decode_ms_per_token"])
    for r in rows.values():
        r["decode_median"] = statistics.median(r["decode_ms_per_token"])
        r["question_prefill_median"] = statistics.median(r["question_prefill_s"])
        r["ratio_vs_full"] = base / r["decode_median"]
        r["same_answer_as_full"] = r["answer"] == rows["full"]["answer"]
    meta = {"model": name,
            "document_tokens": len(doc), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.machine(), "torch": torch.__version__, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "load_avg": list(os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["cpu_decode.py", *(argv or sys.argv[1:])])}
    print(f"\n{len(doc)}-token document, {args.rounds} rounds of {args.max_tokens} tokens, "
          f"{meta['threads']} threads, load {meta['load_avg'][0]:.1f}\n")
    print("| method | budget | context prefill s | question prefill s | decode ms/token (rounds) | median | "
          "full / method | same answer |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | --- |")
    for r in rows.values():
        print(f"| {r['method']} | {r['budget'] or '-'} | {r['context_prefill_s']:.1f} | {r['question_prefill_median']:.2f} | "
              + ", ".join(f"{x:.0f}" for x in r["decode_ms_per_token"])
              + f" | {r['decode_median']:.0f} | {r['ratio_vs_full']:.2f} | {'yes' if r['same_answer_as_full'] else 'no'} |")
    stem = Path(name).name.removesuffix(".gguf")   # a named model's name keeps its dots (qwen2.5-coder-0.5b)
    out = args.out or ROOT / "bench" / "results" / f"cpu_decode_{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1) + "\n")
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
