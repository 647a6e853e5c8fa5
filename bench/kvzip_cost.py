"""The cost of KVzip's second prefill: prefill time of ``full``, ``snapkv`` and ``kvzip`` (with the
share of its reread passes, from ``method_stats``) over prompt lengths.

    PYTHONPATH=. python3 bench/kvzip_cost.py                              # default model, CPU
    PYTHONPATH=. python3 bench/kvzip_cost.py --model tiny --lengths 1024,2048,4096
    PYTHONPATH=. python3 bench/kvzip_cost.py --model smollm2 --device cuda --lengths 8192,32768

The prompt is the chat-template document prefix plus text from ``kvsift/data`` (repeated), cut to
each length, so the passes follow the chat template as in ``prefill_context``. Writes
``bench/results/kvzip_cost_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _llm(model: str | None, device: str):
    from kvsift import LLM

    if model != "tiny":
        return LLM(model, device=device)
    from transformers import AutoTokenizer

    from kvsift.models import tiny_model
    from kvsift.models.loader import _convert_gguf, default_model_path

    tok = AutoTokenizer.from_pretrained(_convert_gguf(default_model_path("smollm2")))
    m = tiny_model("llama", seed=1, max_positions=1 << 17).to(device)
    return LLM.from_model(m, tok, name="tiny-llama")


def _prompt(llm, n: int) -> list[int]:
    text = (ROOT / "kvsift/data/alice_ch1_3.txt").read_text()
    ids = llm.encode_document(text)
    while len(ids) < n:
        ids += ids[-(len(ids) // 2):]  # more text of the document (its second half again)
    return ids[:n]


def _device_tag(llm) -> str:
    if llm.device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(llm.device).lower()
    m = re.search(r"\b([a-z]\d{2,4})\b", name)
    return m.group(1) if m else re.sub(r"\W+", "-", name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model name / path, 'tiny' (random tiny llama); default: LLM()")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--budget", type=float, default=0.25, help="budget of snapkv and kvzip (ratio or tokens)")
    p.add_argument("--chunk", type=int, default=2048, help="kvzip's chunk (context tokens per reread pass)")
    p.add_argument("--repeats", type=int, default=1, help="runs per point (the fastest is reported)")
    p.add_argument("--out", default=None, help="default: bench/results/kvzip_cost_<device>.json")
    args = p.parse_args(argv)
    from kvsift import SamplingParams

    llm = _llm(args.model, args.device)
    budget = int(args.budget) if args.budget > 1 else args.budget
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(_prompt(llm, 64), one)  # warm-up
    methods = [("full", None, None), ("snapkv", budget, None), ("kvzip", budget, {"chunk": args.chunk})]
    rows = []
    print(f"model {llm.info.name} on {llm.device}, budget {budget}, kvzip chunk {args.chunk}")
    print(f"{'tokens':>7} {'full s':>8} {'snapkv s':>9} {'kvzip s':>8} {'reread s':>9} {'reread %':>8} "
          f"{'passes':>6} {'reread tok':>10} {'kvzip/full':>10}")
    for n in [int(x) for x in args.lengths.split(",") if x]:
        ids = _prompt(llm, n)
        row = {"tokens": len(ids)}
        for name, b, kw in methods:
            best = None
            for _ in range(args.repeats):
                st = llm.generate(ids, one, method=name, budget=b, method_kwargs=kw, progress=False)[0].stats
                if best is None or st.prefill_s < best.prefill_s:
                    best = st
            row[f"{name}_prefill_s"] = best.prefill_s
            row[f"{name}_kv_device_bytes"] = best.kv_device_bytes
            if name == "kvzip":
                ms = best.method_stats
                row.update(kvzip_reread_s=ms["reread_s"], kvzip_reread_passes=ms["reread_passes"],
                           kvzip_reread_tokens=ms["reread_tokens"],
                           kvzip_reread_share=ms["reread_s"] / best.prefill_s,
                           kvzip_over_full=best.prefill_s / row["full_prefill_s"])
        rows.append(row)
        print(f"{row['tokens']:>7} {row['full_prefill_s']:8.2f} {row['snapkv_prefill_s']:9.2f} "
              f"{row['kvzip_prefill_s']:8.2f} {row['kvzip_reread_s']:9.2f} {100 * row['kvzip_reread_share']:7.1f}% "
              f"{row['kvzip_reread_passes']:>6} {row['kvzip_reread_tokens']:>10} {row['kvzip_over_full']:10.2f}")
    tag = _device_tag(llm)
    out = Path(args.out or ROOT / f"bench/results/kvzip_cost_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from kvsift.methods.kvzip import chat_parts

    parts = chat_parts(llm.tokenizer)  # do the passes follow the chat template (a templated prompt)?
    templated = bool(parts and parts[0] and _prompt(llm, 64)[:len(parts[0])] == parts[0])
    meta = {"model": llm.info.name, "chat_template_passes": templated, "load_avg_end": os.getloadavg(), "device": str(llm.device), "device_tag": tag, "torch_threads": torch.get_num_threads(),
            "budget": budget, "chunk": args.chunk, "repeats": args.repeats, "chunk_size": llm.chunk_size}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
