"""Row-by-row vs whole-batch prefill on a random-weight Llama-8B-shaped model: prefill time, GPU
memory peak and KV on the device / host, then a few decode steps (the tokens must agree).

    PYTHONPATH=. python3 bench/prefill_rows.py --ctx 32768 --batch 4 --layers 8 --out bench/out/prefill_rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench._random_llama, kvsift


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--methods", default="sentencekv:2048,snapkv:2048")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--out", default="bench/out/prefill_rows.json")
    args = p.parse_args(argv)
    from bench._random_llama import CPU_TINY, random_llama
    from kvsift import LLM, SamplingParams

    model, dev = random_llama(args.layers, args.ctx + 1024, CPU_TINY)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx)).tolist()
    ids = [r[: args.ctx - 97 * i] for i, r in enumerate(ids)]  # different lengths: padding in batch mode
    rows = []
    print(f"{'method':<16} {'prefill':<6} {'prefill s':>9} {'GPU peak GiB':>12} {'dev KV GiB':>10} {'host GiB':>8}")
    for spec in [m for m in args.methods.split(",") if m]:
        name, _, budget = spec.partition(":")
        toks = {}
        for mode in ("batch", "rows"):
            llm = LLM.from_model(model, None, chunk_size=args.chunk, prefill_mode=mode)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                out = llm.generate(ids, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), method=name,
                                   budget=int(budget) if budget else None, progress=False)
            except torch.cuda.OutOfMemoryError as e:
                row = {"method": spec, "prefill_mode": mode, "error": str(e)[:200]}
                rows.append(row)
                print(f"{spec:<16} {mode:<6} out of GPU memory")
                continue
            st = out[0].stats
            toks[mode] = [o.token_ids for o in out]
            row = {"method": spec, "prefill_mode": mode, "batch": args.batch, "ctx": args.ctx, "layers": args.layers,
                   "prefill_s": st.prefill_s, "wall_s": time.perf_counter() - t0,
                   "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0,
                   "kv_device_gib": st.kv_device_bytes / 2**30, "kv_host_gib": st.kv_host_bytes / 2**30}
            rows.append(row)
            print(f"{spec:<16} {mode:<6} {row['prefill_s']:9.2f} {row['gpu_peak_gib']:12.2f} "
                  f"{row['kv_device_gib']:10.2f} {row['kv_host_gib']:8.2f}")
            del out, llm
        if len(toks) == 2:
            same = toks["batch"] == toks["rows"]
            rows.append({"method": spec, "tokens_agree": same})
            print(f"{spec}: rows and batch tokens agree: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
