#!/usr/bin/env python3
"""kvsift against ``transformers`` ``model.generate`` on the CPU: same model, same prompt, greedy.

    python bench/cpu_vs_hf.py                                     # default model, README document
    python bench/cpu_vs_hf.py --model smollm2 --lengths 1700,5000 --methods full,snapkv,sentencekv

For each prompt length (the README's document cut to about that many tokens, plus its question, in
the chat template), it times HF ``generate`` (its own SDPA attention and ``DynamicCache``, one
prefill pass) and kvsift with ``full`` (asserted to produce the same tokens) and with compressed
methods at ``--budget``. Prints a table of seconds and ratios (HF time / kvsift time: above 1 means
kvsift is faster; wall time, and the process's CPU time, which other load disturbs less) and
writes JSON under ``bench/results/``.

Each timing is the best of ``--repeat`` runs after a short warm-up run; the machine's load average
is recorded, since other processes on a shared 2-core machine change the numbers a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="named model, HF directory or .gguf (default: the default model)")
    ap.add_argument("--prompt-file", type=Path, default=ROOT / "examples" / "village_report.txt")
    ap.add_argument("--question", default="Where is the key to the old chapel kept?")
    ap.add_argument("--lengths", default="1700,5000", help="prompt lengths in tokens (the document is cut)")
    ap.add_argument("--methods", default="full,snapkv,sentencekv")
    ap.add_argument("--budget", default="0.25", help="budget of the compressed methods")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=None, help="kvsift prefill chunk (default: the engine's)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each engine, interleaved; the fastest is kept")
    ap.add_argument("--compare-chunk", type=int, default=None, metavar="N",
                    help="also time kvsift full with a uniform prefill chunk of N tokens (e.g. 512, the old default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/cpu_vs_hf_MODEL.json)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of timing: torch.profiler over one HF and one kvsift full run at the first "
                         "length, the top N ops by self CPU time of each (written beside the JSON)")
    return ap.parse_args(argv)


def cut_document(llm, text: str, question: str, length: int) -> list[int]:
    """Chat-template token ids of the document cut (at a paragraph) to ~``length`` tokens + question."""
    paras = text.split("\n\n")
    lo, hi = 1, len(paras)
    while lo < hi:  # the most paragraphs that fit
        mid = (lo + hi + 1) // 2
        if len(llm.encode("\n\n".join(paras[:mid]) + "\n\n" + question)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return llm.encode("\n\n".join(paras[:lo]) + "\n\n" + question)


def time_hf(llm, ids: list[int], max_tokens: int) -> dict:
    """HF ``generate`` (greedy); the prefill ends when the first logits reach the processors."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([ids], device=llm.device)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = llm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=llm.pad_id)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    new = out[0, len(ids):].tolist()
    while new and new[-1] in llm.eos_ids:  # kvsift does not return the EOS token
        new = new[:-1]
    steps = max(len(stamps) - 1, 1)
    return {"tokens": new, "total_s": total, "cpu_s": cpu, "prefill_s": stamps[0] - t0,
            "decode_ms_per_token": 1000 * (stamps[-1] - stamps[0]) / steps}


def time_kvsift(llm, ids: list[int], max_tokens: int, method: str, budget) -> dict:
    from kvsift import SamplingParams

    c0, t0 = time.process_time(), time.perf_counter()
    out = llm.generate(ids, SamplingParams(max_tokens=max_tokens), method=method,
                       budget=None if method == "full" else budget, progress=False)[0]
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = out.stats
    return {"tokens": list(out.token_ids), "total_s": total, "cpu_s": cpu, "prefill_s": st.prefill_s,
            "decode_ms_per_token": st.decode_ms_per_token, "kv_kept_bytes": st.kv_kept_bytes,
            "kv_full_bytes": st.kv_full_bytes}


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["total_s"])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kvsift import LLM
    from kvsift.methods import parse_budget
    from kvsift.models import DEFAULT_MODEL

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = parse_budget(args.budget)
    kw = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    t0 = time.perf_counter()
    llm = LLM(args.model, device="cpu", **kw)
    load_s = time.perf_counter() - t0
    name = llm.info.name
    text = args.prompt_file.read_text(encoding="utf-8")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"[bench] {name} on CPU ({torch.get_num_threads()} threads), loaded in {load_s:.1f}s, "
          f"kvsift chunk {llm.chunk_size} (first {llm.first_chunk}), load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    warm = llm.encode("Say hello.")
    time_hf(llm, warm, 4)
    time_kvsift(llm, warm, 4, "full", None)

    if args.profile:
        return profile(llm, cut_document(llm, text, args.question, int(args.lengths.split(",")[0])), args, name)
    engines = [("hf generate", "full", None)] + [("kvsift", m, llm) for m in methods]
    if args.compare_chunk:
        uniform = LLM.from_model(llm.model, llm.tokenizer, name=name, chunk_size=args.compare_chunk)
        engines.insert(2 if "full" in methods else 1, (f"kvsift chunk {args.compare_chunk}", "full", uniform))
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = cut_document(llm, text, args.question, length)
        load = [os.getloadavg()[0]]
        runs: dict[int, list[dict]] = {i: [] for i in range(len(engines))}
        for _ in range(args.repeat):  # interleaved, so that a burst of other load hits every engine alike
            for i, (engine, m, target) in enumerate(engines):
                r = time_hf(llm, ids, args.max_tokens) if target is None else \
                    time_kvsift(target, ids, args.max_tokens, m, budget)
                runs[i].append(r)
                print(f"[bench] {len(ids)} tokens: {engine} {m} {r['total_s']:.1f}s wall, {r['cpu_s']:.1f}s cpu",
                      file=sys.stderr)
        load.append(os.getloadavg()[0])
        hf = best(runs[0])
        for i, (engine, m, target) in enumerate(engines):
            r = best(runs[i])
            same = r["tokens"] == hf["tokens"]
            if m == "full" and not same:
                raise SystemExit(f"{engine} full differs from HF generate at {len(ids)} tokens:\n"
                                 f"  hf:     {hf['tokens']}\n  kvsift: {r['tokens']}")
            rows.append({"length": len(ids), "engine": engine, "method": m if m == "full" else f"{m}@{args.budget}",
                         **_public(r), "new_tokens": len(r["tokens"]), "same_tokens_as_hf": same,
                         "ratio": hf["total_s"] / r["total_s"], "cpu_ratio": hf["cpu_s"] / r["cpu_s"],
                         "answer": llm.decode(r["tokens"]), "runs_total_s": [x["total_s"] for x in runs[i]],
                         "load_avg": load})

    print(f"\n{name}, CPU, {torch.get_num_threads()} threads, {args.max_tokens} new tokens max, greedy; "
          f"ratio = HF s / kvsift s (> 1: kvsift faster)\n")
    print("| prompt tokens | engine | method | new tokens | prefill s | decode ms/token | total s | ratio | "
          "CPU s | CPU ratio |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['length']} | {r['engine']} | {r['method']} | {r['new_tokens']} | {r['prefill_s']:.1f} | "
              f"{r['decode_ms_per_token']:.0f} | {r['total_s']:.1f} | {r['ratio']:.2f} | {r['cpu_s']:.1f} | "
              f"{r['cpu_ratio']:.2f} |")
    out = args.out or ROOT / "bench" / "results" / f"cpu_vs_hf_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "model_default": DEFAULT_MODEL, "device": "cpu", "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "kvsift_chunk_size": llm.chunk_size, "budget": args.budget, "max_tokens": args.max_tokens,
            "repeat": args.repeat, "load_s": load_s, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n[bench] -> {out}", file=sys.stderr)
    return 0


def profile(llm, ids: list[int], args, name: str) -> int:
    """Top ops (self CPU time) of HF generate and kvsift full on the same prompt."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    report = [f"{name}, {len(ids)} prompt tokens, {args.max_tokens} new tokens, CPU\n"]
    for label, run in (("hf generate", lambda: time_hf(llm, ids, args.max_tokens)),
                       ("kvsift full", lambda: time_kvsift(llm, ids, args.max_tokens, "full", None))):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            r = run()
        report.append(f"== {label}: total {r['total_s']:.1f}s, prefill {r['prefill_s']:.1f}s, "
                      f"decode {r['decode_ms_per_token']:.0f} ms/token\n")
        report.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    text = "\n".join(report)
    print(text)
    out = ROOT / "bench" / "results" / f"cpu_vs_hf_{name}_profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] -> {out}", file=sys.stderr)
    return 0


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


if __name__ == "__main__":
    sys.exit(main())
