"""Many questions over one reusable context: read by reference (``SiftCache.share``, the default
for ``full`` over a plain context) against a copy of the context per question (``clone``), in one
batch. Device KV bytes held by the generation, wall time, and whether the answers agree.
``--method sentencekv``: a context whose chunks live in a host store; "reference" reads the
context's host rows from every question's row (``ChunkStore.repeat_batch``), "copy" makes each
question's rows its own first (``own_host``, what a clone did before): host KV bytes and wall time.

A random-weight Llama-shaped model (on CUDA the Llama-3.1-8B shape, ``--layers`` of them; on the CPU a
narrow model with the 8B's KV heads and head_dim). Prints a table and writes JSON.

    PYTHONPATH=. python3 bench/shared_context.py --ctx 4096 --questions 1,4,16 --out bench/out/shared_context.json
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
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--questions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--method", default="full", choices=["full", "sentencekv"])
    p.add_argument("--budget", type=int, default=512, help="sentencekv's budget (tokens attended per step)")
    p.add_argument("--out", default="bench/out/shared_context.json")
    args = p.parse_args(argv)
    import kvsift.methods.full as full
    from kvsift.methods._offload import ChunkStore
    from bench._random_llama import random_llama
    from kvsift import LLM, SamplingParams

    model, dev = random_llama(args.layers, args.ctx + 4096)
    cfg = model.config
    llm = LLM.from_model(model, None, decode_mode="eager")
    g = torch.Generator().manual_seed(1)
    skv = args.method == "sentencekv"
    mkw = dict(method="sentencekv", budget=args.budget) if skv else {}
    ctx = llm.prefill_context(torch.randint(0, cfg.vocab_size, (args.ctx,), generator=g).tolist(), **mkw)
    ctx_bytes = ctx.cache.memory()["host" if skv else "device"]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    repeat = ChunkStore.repeat_batch

    def repeat_and_copy(self, times):  # the copy a repeated store made before it read by reference
        repeat(self, times)
        self.own_host()
        self.shared = True  # own rows, flagged as read-only: the questions stay on the device, as with references
    rows = []
    where = "host" if skv else "device"
    print(f"{args.method}: context {args.ctx} tokens ({ctx_bytes / 2**20:.1f} MiB {where} KV), "
          f"{args.question_tokens}-token questions, {args.new_tokens} new tokens, {args.layers} layers, {dev.type}")
    print(f"{'questions':>9} {'how':<10} {where + ' MiB':>11} {'x context':>9} {'wall s':>7} {'GPU peak GiB':>12}")
    orig = full.Full.reads_context_in_place
    llm.generate([[1] * args.question_tokens], SamplingParams(max_tokens=2, ignore_eos=True), context=ctx,
                 progress=False, **mkw)   # warm-up (first-call costs out of the first row)
    for n in args.questions:
        qs = [torch.randint(0, cfg.vocab_size, (args.question_tokens,), generator=g).tolist() for _ in range(n)]
        toks = {}
        for how in ("reference", "copy"):
            if skv:
                ChunkStore.repeat_batch = repeat if how == "reference" else repeat_and_copy
            else:
                full.Full.reads_context_in_place = orig if how == "reference" else (lambda self: False)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                out = llm.generate(qs, params, context=ctx, progress=False, **mkw)
            finally:
                full.Full.reads_context_in_place = orig
                ChunkStore.repeat_batch = repeat
            wall = time.perf_counter() - t0
            st = out[0].stats
            toks[how] = [o.token_ids for o in out]
            held = st.kv_host_bytes if skv else st.kv_device_bytes
            row = {"method": args.method, "questions": n, "how": how, "ctx": args.ctx,
                   "kv_device_bytes": st.kv_device_bytes, "kv_host_bytes": st.kv_host_bytes,
                   "context_bytes": ctx_bytes, "wall_s": wall,
                   "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
            rows.append(row)
            gp = f"{row['gpu_peak_gib']:12.2f}" if row["gpu_peak_gib"] is not None else f"{'-':>12}"
            print(f"{n:>9} {how:<10} {held / 2**20:11.1f} {held / ctx_bytes:9.2f} {wall:7.2f} {gp}")
        rows.append({"questions": n, "tokens_agree": toks["reference"] == toks["copy"]})
        print(f"{n:>9} answers agree: {toks['reference'] == toks['copy']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                          "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
