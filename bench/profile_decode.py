"""Where a decode step's GPU time goes: kernel-time table of kvsift decode steps (static mode run
eagerly, so each kernel shows) on a random-weight Llama-8B-shaped model.

    PYTHONPATH=. python3 bench/profile_decode.py --ctx 32768 --method full --out bench/out/profile.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--method", default="full", help="method or method:budget")
    p.add_argument("--decode", default="static", help="decode mode profiled (static shows each kernel)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="bench/out/profile_decode.txt")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvsift import LLM, SamplingParams

    cfg = LlamaConfig(num_hidden_layers=args.layers, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=args.ctx + 4096, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    llm = LLM.from_model(model, None, chunk_size=1024, decode_mode=args.decode)
    name, _, budget = args.method.partition(":")
    ids = torch.randint(0, cfg.vocab_size, (args.ctx,)).tolist()
    llm.generate(ids[:2048], SamplingParams(max_tokens=3, ignore_eos=True), method=name,
                 budget=int(budget) // 4 if budget else None)  # warm-up
    # the engine calls ``cancel`` once per decode step: it advances the profiler's schedule, so the
    # active window holds decode steps only (prefill and the first steps are skipped)
    sched = torch.profiler.schedule(wait=1, warmup=1, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        def tick() -> bool:
            torch.cuda.synchronize()
            prof.step()
            return False

        llm.generate(ids, SamplingParams(max_tokens=args.steps + 4, ignore_eos=True), method=name,
                     budget=int(budget) if budget else None, cancel=tick)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    total = sum(e.self_device_time_total for e in prof.key_averages()
                if not e.key.startswith("ProfilerStep")) / 1e3  # kernels only (steps would count twice)
    head = f"{args.method} ctx {args.ctx} layers {args.layers} decode {args.decode}: {args.steps} steps, " \
           f"GPU kernel time {total / args.steps:.2f} ms/step"
    print(head)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(head + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
